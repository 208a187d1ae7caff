"""``evaluate``: one task on one model (or on every stage of a run), as a JSON-able dict.

Runs and samples: each of ``runs`` runs scores a sample of ``limit`` items (all of them when
``limit`` is None) drawn with its own seeded RNG (``numpy.random.default_rng([seed, run])``); the
reported score is the mean over runs with ``ci95 = 1.96·σ/√runs`` (population σ, as the paper).
Greedy decoding and log-likelihood scoring are deterministic, so ``runs`` defaults to 1 and every
distinct item is scored once however many runs reuse it; ``sample=True`` (temperature-1.0 sampling
seeded per run, the paper's stochastic runs) defaults to the paper's 10 runs.

Scales: ``accuracy``, ``accuracy_norm``, ``exact_match``, ``f1`` and ``invalid_rate`` are fractions
in [0, 1]; ``bleu`` is sacrebleu's 0–100; ``loss`` is nats per token.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from growlm.errors import GrowlmError
from growlm.evaluation import LM, model_device
from growlm.evaluation.protocols import PROTOCOLS, mean_ci95, progress_units, run_protocol, select
from growlm.evaluation.readers import load_items
from growlm.evaluation.task import DataArg, Item, Options, Outcome, Task, get_task
from growlm.loading import fingerprint_of, load_any
from growlm.store import RunDir, resolve, stages
from growlm.store.model import read_meta

SAMPLE_TEMPERATURE = 1.0
PAPER_RUNS = 10


def default_runs(sample: bool) -> int:
    """10 stochastic runs as the paper; a single run when decoding is deterministic."""
    return PAPER_RUNS if sample else 1


def evaluate(model_path: str | Path, task: str, *, data: DataArg = None, protocol: str = "paper",
             limit: int | None = None, runs: int | None = None, seed: int = 0, sample: bool = False,
             progress: bool = True) -> dict:
    """Evaluate the model at ``model_path`` on ``task`` (a name registered in :data:`~growlm.evaluation.task.TASKS`).

    ``data``: path(s) to the task's data (for ``ppl``: UTF-8 text files, required); default: the
    offline benchmark packages. ``limit``: items per run (``ppl``: the first ``limit`` files).
    ``runs``: default 1, or 10 with ``sample=True``. Returns one JSON-able dict (see the module doc).
    """
    spec, options = _check(task, protocol, limit, runs, sample, seed, data, progress)
    source = _read(task, spec, data, protocol)
    return _evaluate_path(Path(model_path), task, spec, source, options)


def evaluate_model(model: LM, tokenizer, task: str, *, name: str, fingerprint: str | None, data: DataArg = None,
                   protocol: str = "paper", limit: int | None = None, runs: int | None = None, seed: int = 0,
                   sample: bool = False, progress: bool = True) -> dict:
    """:func:`evaluate` of a model already in memory, scored as it is now (nothing is read from its dir).

    ``name`` and ``fingerprint`` become the result's ``model`` and ``model_fingerprint``: the caller
    vouches that the weights are those of the model with that fingerprint, or passes None.
    """
    spec, options = _check(task, protocol, limit, runs, sample, seed, data, progress)
    source = _read(task, spec, data, protocol)
    return _score(model, tokenizer, {"task": task, "model": name, "model_fingerprint": fingerprint}, spec, source,
                  options)


def evaluate_per_stage(run_dir: str | Path, task: str, *, data: DataArg = None, protocol: str = "paper",
                       limit: int | None = None, runs: int | None = None, seed: int = 0, sample: bool = False,
                       progress: bool = True) -> list[dict]:
    """:func:`evaluate` on every ``RUN/stage-N`` model of a training run, in stage order (a depth sweep).

    Every stage sees the same samples (same data, seed and limit), so the scores are comparable.
    A run trained with TensorBoard (``RUN/tensorboard`` exists) also gets the numbers of each stage's
    result as scalars ``eval/<task>-<protocol>/<key>`` with the depth as the step.
    """
    from growlm.store import MetricsLog

    spec, options = _check(task, protocol, limit, runs, sample, seed, data, progress)
    run_dir = Path(run_dir)
    if not isinstance(found := resolve(run_dir), RunDir):
        raise GrowlmError(f"{run_dir} holds no stage-N model dirs (is it a training run's output dir?)")
    source = _read(task, spec, data, protocol)
    out = []
    for n, path in stages(found):
        res = _evaluate_path(path, task, spec, source, options)
        out.append({"stage": n, "n_layers": read_meta(path).config["n_layers"], **res})
    if (run_dir / MetricsLog.TENSORBOARD).is_dir():  # written after the sweep: a failed stage leaves no half curve
        try:
            with MetricsLog.writer(run_dir) as tb:
                for r in out:
                    for key, value in r.items():
                        if key not in ("stage", "n_layers") and isinstance(value, int | float) and not isinstance(value, bool):
                            tb.add_scalar(f"eval/{task}-{protocol}/{key}", value, r["n_layers"])
        except OSError as e:  # a read-only run still gets its scores
            print(f"growlm: warning: cannot write {run_dir / MetricsLog.TENSORBOARD}: {e.strerror or e}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------


def _check(task: str, protocol: str, limit: int | None, runs: int | None, sample: bool, seed: int,
           data: DataArg, progress: bool) -> tuple[Task, Options]:
    """Validate the options before anything is loaded (their types too: the Python API passes what it is
    given); returns the task and the options it is scored with."""
    for name, value, kinds in (("task", task, str), ("protocol", protocol, str), ("sample", sample, bool),
                               ("limit", limit, int | None), ("runs", runs, int | None)):
        if not isinstance(value, kinds) or (name in ("limit", "runs") and isinstance(value, bool)):
            raise GrowlmError(f"{name}: expected {kinds}, got {type(value).__name__} {str(value)[:40]!r}")
    _check_seed_and_data(seed, data)
    spec = get_task(task)
    if protocol not in PROTOCOLS:
        raise GrowlmError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    if limit is not None and limit <= 0:
        raise GrowlmError(f"--limit must be a positive number of items, got {limit}")
    if runs is not None and runs <= 0:
        raise GrowlmError(f"--runs must be positive, got {runs}")
    if sample and (protocol != "paper" or not spec.is_benchmark):
        raise GrowlmError("--sample applies to the generation (paper) protocol of a benchmark only")
    if spec.is_benchmark and protocol != "paper" and not spec.has_loglik:
        raise GrowlmError(f"task {task!r} has no loglik protocol; use --protocol paper")
    runs = default_runs(sample) if runs is None else runs
    return spec, Options(protocol, limit, runs, seed, sample, progress=progress and sys.stderr.isatty())


def _check_seed_and_data(seed: object, data: object) -> None:
    """``seed`` an integer, ``data`` None, one path (or ``hf:NAME``) or a list of them: one line otherwise."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise GrowlmError(f"seed: expected an integer, got {type(seed).__name__} {str(seed)[:40]!r}")
    many = data if isinstance(data, list | tuple) else [] if data is None else [data]
    for item in many:
        if not isinstance(item, str | os.PathLike) or not str(item) or "\0" in str(item):
            raise GrowlmError(f"data: expected a path or a list of paths, got {type(item).__name__} "
                              f"{str(item)[:40]!r}")


def _read(task: str, spec: Task, data: DataArg, protocol: str) -> list:
    """What the task scores: what it reads itself, or the benchmark's items that the protocol scores."""
    if not spec.is_benchmark:
        return spec.read(data)
    items = select(spec, protocol, load_items(task, data))
    if not items:
        raise GrowlmError(f"no {spec.title} items are scorable under the {protocol} protocol")
    return items


def _evaluate_path(path: Path, task: str, spec: Task, source: list, options: Options) -> dict:
    model, tokenizer = load_any(path)
    return _score(model, tokenizer, {"task": task, "model": str(path), "model_fingerprint": fingerprint_of(path)},
                  spec, source, options)


def _score(model: LM, tokenizer, head: dict, spec: Task, source: list, options: Options) -> dict:
    """``head`` (task, model, model_fingerprint) and the scores of ``model`` on the task."""
    if not spec.is_benchmark:
        return {**head, **spec.measure(model, tokenizer, source, options)}
    return {**head, "protocol": options.protocol, **_benchmark(model, tokenizer, head["task"], spec, source, options)}


def _draw(n: int, size: int, seed: int, run: int) -> list[int]:
    """A run's sample: ``size`` distinct item indices (all of them, in order, when size == n)."""
    if size >= n:
        return list(range(n))
    return sorted(np.random.default_rng([seed, run]).choice(n, size=size, replace=False).tolist())


def _benchmark(model: LM, tokenizer, task: str, spec: Task, pool: Sequence[Item], options: Options) -> dict:
    """Sampled runs of the benchmark ``task`` over ``pool``: their scores, ci95 and per-subject means."""
    protocol, limit, runs, seed, sample = options.protocol, options.limit, options.runs, options.seed, options.sample
    size = len(pool) if limit is None else min(limit, len(pool))
    samples = [_draw(len(pool), size, seed, r) for r in range(runs)]
    if sample:
        total = runs * progress_units(spec, protocol, [pool[i] for i in samples[0]])
    else:
        todo = sorted(set().union(*samples))
        total = progress_units(spec, protocol, [pool[i] for i in todo])
    with tqdm(total=total, desc=task, disable=not options.progress) as bar:
        if sample:
            per_run = []
            for r, s in enumerate(samples):
                seed_r = int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
                gen = torch.Generator(device=model_device(model)).manual_seed(seed_r)
                per_run.append(run_protocol(model, tokenizer, spec, protocol, [pool[i] for i in s],
                                            temperature=SAMPLE_TEMPERATURE, generator=gen, advance=bar.update))
        else:
            # deterministic: each distinct item is scored once and reused by every run that draws it
            done = dict(zip(todo, run_protocol(model, tokenizer, spec, protocol, [pool[i] for i in todo],
                                               advance=bar.update), strict=True))
            per_run = [[done[i] for i in s] for s in samples]
    out: dict = {"n": size, "runs": runs, "seed": seed, "sample": sample, "limit": limit}
    out.update(_summary([o for outs in per_run for o in outs], per_run))
    subjects = [pool[i].subject for s in samples for i in s]
    if any(subjects):
        out["per_subject"] = _per_subject(subjects, [o for outs in per_run for o in outs])
    return out


def _summary(flat: list[Outcome], per_run: list[list[Outcome]]) -> dict:
    """Mean and ci95 of every metric over runs (the first metric is the headline ``ci95``)."""
    names = list(flat[0].metrics)
    out: dict = {}
    for k, name in enumerate(names):
        scores = [float(np.mean([o.metrics[name] for o in outs])) for outs in per_run]
        mean, ci, std = mean_ci95(scores)
        out[name] = mean
        suffix = "" if k == 0 else f"_{name}"
        out[f"ci95{suffix}"] = ci
        out[f"std{suffix}"] = std
        out[f"run_scores{suffix}"] = scores
    validity = [o.valid for o in flat if o.valid is not None]
    if validity:
        out["invalid_rate"] = 1.0 - float(np.mean(validity))
    return out


def _per_subject(subjects: list[str], flat: list[Outcome]) -> dict[str, dict]:
    """Metrics pooled over all runs per subject; ``n`` counts the answers scored (summed over runs)."""
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for s, o in zip(subjects, flat, strict=True):
        groups[s].append(o)
    return {s: {"n": len(os_), **{m: float(np.mean([o.metrics[m] for o in os_])) for m in os_[0].metrics}}
            for s, os_ in sorted(groups.items())}
