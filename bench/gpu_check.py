"""Issue #18's GPU check: the paper's 9-layer preset on one H100/H200, measured in one prepared run.

Run it through ``bench/gpu_check.sh`` (which picks the Python, sets PYTHONPATH=src and works from any cwd):

    bash bench/gpu_check.sh --out DIR             # on one H100/H200: every figure, about 8 minutes at most
    bash bench/gpu_check.sh --dry-run --out DIR   # the same steps on CPU at toy sizes, one thread (< 60 s)
    bash bench/gpu_check.sh --prepare-wheels DIR  # on the CPU machine: wheels of what the GPU image lacks

Steps, each of which prints one JSON line per figure (``figure, value, unit, goal, met, device, torch``):

1. install: the packages growlm and these steps import are checked by importing them; for those that fail, and
   only those, the wheels found in ``--wheels`` (else ``$GROWLM_WHEELS``, ``.whl``, ``bench/wheels``) are
   installed offline (``pip install --no-index --no-deps --target SITE``; never the network). ``--dry-run``
   only checks and says what it would install.
2. speed: ``paper-9l-unicode`` under bf16 autocast and ``torch.compile`` at context 1,024 and the largest batch
   that fits (two eager probes give memory per sequence; the prediction is tried, stepping down on OOM):
   tokens/s and MFU of the monolithic step at depths 3, 6, 9 and of each grow stage (3 new blocks over 0, 3, 6
   frozen), each MFU twice: over the bf16 ``torch.mm`` peak measured in the same run, and over the datasheet's
   dense bf16 peak of the device (``timing.datasheet_peak``; null with a note for a device the table lacks), and
   each stage's time ratio over its FLOP model (``gpu_speed.preset_figures`` on ``stage_cost.measure``). Goals
   for the 9-block monolithic step: MFU >= 0.40 of the measured peak (issue #18) and >= 0.45 of the datasheet's
   (issue #29); each stage <= 1.10x its model (issue #29; #18 asked 1.15x).
3. memory: ``torch.cuda.max_memory_allocated`` over two steps of grow stage 6+3 against the 9-block monolithic
   step (on CPU, the peak RSS over three steps, its high-water mark reset through /proc/self/clear_refs; where
   that is refused, ``train_speed.peak_memory``'s child processes). Goal: below monolithic.
4. profile: for each speed or memory figure that misses its goal, a ``torch.profiler`` summary of that step
   (top kernels by self device time, per step); ``--dry-run`` forces one so the path runs.
5. plan: a two-stage plan (the second with LoRA) on the device, killed with SIGKILL after step 3 of stage 2
   (``GROWLM_FAULT``), resumed with ``--resume``; every stage's audit must be ok and ``growlm verify`` pass.
6. pytest: ``tests/test_cuda.py tests/test_loop.py`` (on CPU, a fast subset of test_loop).

A missed goal is a result; a step that crashes is recorded and the others still run. Exit status: 0 when every
step ran to the end, 1 when one crashed. With ``--out DIR``: figures.jsonl, summary.json, gpu_check.log,
pytest.log, plan.log and profiles.txt (six files: a device call brings back at most eight).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

# What growlm's train/verify paths and the two test files import, as import name -> the distributions
# (requirements.lock's names) to install when that import fails. torch is never installed: the GPU image has
# its own CUDA build. transformers and peft are only looked up (importing them costs seconds); the tests use them.
NEEDED: dict[str, tuple[str, ...]] = {
    "pydantic": ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"),
    "numpy": ("numpy",),
    "safetensors": ("safetensors",),
    "tokenizers": ("tokenizers",),
    "tqdm": ("tqdm",),
    "pyarrow": ("pyarrow",),
    "PIL": ("pillow",),
    "pytest": ("pytest", "pluggy", "iniconfig"),
    "transformers": ("transformers",),
    "peft": ("peft",),
}
LOOKUP_ONLY = {"transformers", "peft"}
# What the GPU image lacks, from /work/.library/device/KINDS.md (its package list as read on 2026-11-17:
# no pydantic): the default set of --prepare-wheels. typing-extensions comes along in case the image's is older
# than pydantic needs; it is installed only with pydantic, i.e. only when pydantic fails to import.
IMAGE_LACKS = NEEDED["pydantic"]
# The GPU image's Python (KINDS.md: Python 3.12.3) and the platform tags pip must match for its wheels.
GPU_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")

STAGES = ((0, 3), (3, 3), (6, 3))  # (frozen, new): configs/paper/9l-*.toml
PRESET = "paper-9l-unicode"
# MFU of the 9-block monolithic step against the bf16 matmul peak measured in the same run (issue #18), and against
# the datasheet's dense bf16 peak (issue #29: the basis the field quotes); each grow stage's time over its FLOP model
MFU_GOAL, SHEET_MFU_GOAL, RATIO_GOAL = 0.40, 0.45, 1.10
WALL_GOAL_S = {"gpu": 480, "dry": 60}


def user_path(p: str | None) -> Path | None:
    """A path as the user typed it: relative to the cwd the shell script was started from."""
    if p is None:
        return None
    return Path(os.environ.get("GROWLM_CHECK_CWD", os.getcwd()), p).resolve()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------------
# install (stdlib only: it runs before torch or growlm is imported)

CHECK_IMPORTS = """
import importlib, importlib.util, json, sys
bad = {}
for m in sys.argv[2:]:
    try:
        if m in sys.argv[1].split(","):
            if importlib.util.find_spec(m) is None:
                raise ImportError("not found")
        else:
            importlib.import_module(m)
    except Exception as e:
        bad[m] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(bad))
"""


def failing_imports(modules: list[str], env: dict | None = None) -> dict[str, str]:
    """Modules that a fresh interpreter (this one, with ``env``) cannot import, with why."""
    r = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, ",".join(LOOKUP_ONLY), *modules], capture_output=True,
                       text=True, env=env, timeout=300)
    if r.returncode:
        raise RuntimeError(f"the import check itself failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def wheel_dirs(given: Path | None) -> list[Path]:
    if given is not None:
        return [given]
    env = os.environ.get("GROWLM_WHEELS")
    return [user_path(env)] if env else [REPO / ".whl", REPO / "bench" / "wheels"]


def find_wheels(dists: list[str], dirs: list[Path]) -> tuple[dict[str, Path], list[str]]:
    """The wheel file of each distribution in the first dir that has one, and the distributions with none."""
    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.whl")) if d.is_dir() else []:
            dist = norm(f.name.split("-")[0])
            if dist in dists and dist not in found:
                found[dist] = f
    return found, [d for d in dists if d not in found]


def pip_install_command(wheels: list[Path], site: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site),
            *map(str, wheels)]


def with_site(site: Path) -> None:
    """Make ``site`` come first for this process and every child (after src, which the shell script put first)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(site) not in parts:
        parts.insert(1 if parts and Path(parts[0]).resolve() == (REPO / "src") else 0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    if str(site) not in sys.path:
        sys.path.insert(1, str(site))


def install_step(check_only: bool, wheels: Path | None, site: Path, needed: dict[str, tuple[str, ...]]) -> dict:
    """Import every needed module in a fresh interpreter; install the wheels of those that fail, offline."""
    if site.is_dir() and any(site.iterdir()):
        with_site(site)  # an earlier install on this machine
    bad = failing_imports(list(needed))
    dists = sorted({norm(d) for m in bad for d in needed[m]})
    dirs = wheel_dirs(wheels)
    found, absent = find_wheels(dists, dirs)
    rec = {"missing_before": bad, "dists": dists, "wheel_dirs": [str(d) for d in dirs],
           "wheels": {k: v.name for k, v in found.items()}, "no_wheel": absent, "site": str(site),
           "mode": "check-only" if check_only else "install", "installed": []}
    if bad and found:
        cmd = pip_install_command(list(found.values()), site)
        rec["pip"] = shlex.join(cmd)
        if not check_only:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode:
                raise RuntimeError(f"offline pip install failed: {(r.stderr or r.stdout).strip()[-800:]}")
            rec["installed"] = sorted(found)
            with_site(site)
            bad = failing_imports(list(bad))
    rec["missing_after"] = bad
    return rec


def prepare_wheels(dest: Path, packages: list[str], print_only: bool) -> int:
    """On the CPU machine: download the GPU image's missing wheels, pinned to requirements.lock, for its Python."""
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            lock[norm(name)] = f"{name}=={version}"
    pins = []
    for p in packages or IMAGE_LACKS:
        if norm(p.partition("==")[0]) == "torch":
            sys.exit("gpu_check: torch is never carried: the GPU image has its own CUDA build")
        if "==" in p:
            pins.append(p)
        elif norm(p) in lock:
            pins.append(lock[norm(p)])
        else:
            sys.exit(f"gpu_check: {p} is not in requirements.lock; name it as NAME==VERSION")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           GPU_PYTHON, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", str(dest), *pins]
    print(shlex.join(cmd))
    if print_only:
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd)
    if r.returncode:
        return r.returncode
    exclude_from_git(dest)  # keep the wheels out of git, as the device notes say, when they sit in this checkout
    return 0


def exclude_from_git(dest: Path) -> None:
    """Put ``dest``, a folder prepared for a device call, in this checkout's .git/info/exclude, so that it is never
    committed and travels only where the call's carry names it; nothing for a folder outside the checkout."""
    try:
        rel = dest.resolve().relative_to(REPO)
        exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO,
                                      capture_output=True, text=True, check=True).stdout.strip())
        exclude = exclude if exclude.is_absolute() else REPO / exclude
        line = f"/{rel.as_posix()}/"
        if line not in (exclude.read_text().splitlines() if exclude.exists() else []):
            exclude.parent.mkdir(parents=True, exist_ok=True)
            with exclude.open("a") as f:
                f.write(line + "\n")
        print(f"{line} is in {exclude}; name {rel.as_posix()} in the device call's carry")
    except (ValueError, subprocess.CalledProcessError, FileNotFoundError):
        pass


# ---------------------------------------------------------------------------------------------------------
# the record


class Report:
    """JSON lines on stdout (and figures.jsonl), progress on stderr (and NAME.log). A script of its own
    (gpu_study.py) subclasses it with its ``name``, its other files and its wall-clock goals."""

    name = "gpu_check"
    files: tuple[str, ...] = ("profiles.txt", "pytest.log", "plan.log")  # besides figures.jsonl and NAME.log
    wall_goal_s = WALL_GOAL_S

    def __init__(self, out: Path | None, device: str, torch_version: str, dry: bool) -> None:
        self.out, self.device, self.torch, self.dry = out, device, torch_version, dry
        self.figures: list[dict] = []
        self.crashed: list[str] = []
        self.t0 = time.perf_counter()
        if out:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("figures.jsonl", f"{self.name}.log", *self.files):
                (out / name).write_text("")

    def _append(self, name: str, text: str) -> None:
        if self.out:
            with (self.out / name).open("a") as f:
                f.write(text)

    def say(self, msg: str) -> None:
        line = f"[{self.name} {time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        self._append(f"{self.name}.log", line + "\n")

    def emit(self, figure: str, value, unit: str | None, goal: str | None = None, met: bool | None = None,
             **extra) -> dict:
        rec = {"figure": figure, "value": value, "unit": unit, "goal": goal, "met": met, "device": self.device,
               "torch": self.torch, **extra}
        self.figures.append(rec)
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        self._append("figures.jsonl", line + "\n")
        self._append(f"{self.name}.log", line + "\n")
        return rec

    def crash(self, step: str, exc: BaseException) -> None:
        self.crashed.append(step)
        tb = traceback.format_exc()
        self.say(f"step {step} crashed:\n{tb}")
        self.emit(f"{step}.crashed", f"{type(exc).__name__}: {exc}"[:500], None, None, None, step=step)

    def summary(self) -> dict:
        goals = [f for f in self.figures if f["goal"] is not None]
        wall = time.perf_counter() - self.t0
        wall_goal = self.wall_goal_s["dry" if self.dry else "gpu"]
        rec = {"figure": "summary", "summary": True, "figures": len(self.figures),
               "goals_met": sum(f["met"] is True for f in goals), "goals_missed": sum(f["met"] is False for f in goals),
               "missed": [f["figure"] for f in goals if f["met"] is False], "crashed": self.crashed,
               "wall_s": round(wall, 1), "wall_goal_s": wall_goal, "wall_met": wall <= wall_goal,
               "dry_run": self.dry, "device": self.device, "torch": self.torch}
        line = json.dumps(rec)
        print(line, flush=True)
        self._append("figures.jsonl", line + "\n")
        self._append(f"{self.name}.log", line + "\n")
        if self.out:
            (self.out / "summary.json").write_text(json.dumps({**rec, "all": self.figures}, indent=2, default=str))
        width = max(len(f["figure"]) for f in self.figures) if self.figures else 10
        for f in self.figures:
            v = f["value"]
            v = f"{v:.4g}" if isinstance(v, float) else str(v)
            mark = {True: "met", False: "MISSED", None: ""}[f["met"]]
            self.say(f"  {f['figure']:{width}}  {v[:40]:>40} {f['unit'] or '':28} {f['goal'] or '':10} {mark}")
        self.say(f"{rec['goals_met']} goals met, {rec['goals_missed']} missed, {len(self.crashed)} steps crashed, "
                 f"{wall:.0f} s (goal <= {wall_goal} s)")
        return rec


# ---------------------------------------------------------------------------------------------------------
# batch size


def search_batch(probe: Callable[[int], int | None], capacity: int, start: int = 8, cap: int = 256,
                 headroom: float = 0.85, tries: int = 4) -> tuple[int, list]:
    """The largest batch whose step fits in ``headroom`` of ``capacity`` bytes, found in a few probes.

    ``probe(b)`` runs one step at batch ``b`` and returns its peak bytes, or None on OOM. Two probes
    (``start``, ``2·start``) give fixed and per-sequence memory; the prediction, rounded down to a multiple of 8
    and capped at ``cap``, is tried, stepping down by 1/8 while it does not fit. When even the probes do not fit,
    the batch halves down from ``start``.
    """
    trials: list = []

    def fits(b: int) -> int | None:
        peak = probe(b)
        trials.append([b, peak])
        return peak if peak is not None and peak <= headroom * capacity else None

    p1 = fits(start)
    p2 = fits(2 * start) if p1 is not None and 2 * start <= cap else None
    if p1 is None:
        b = start // 2
        while b >= 1:
            if fits(b) is not None:
                return b, trials
            b //= 2
        raise RuntimeError(f"not even batch 1 fits: {trials}")
    if p2 is None:
        return start, trials
    per = max((p2 - p1) / start, 1.0)
    fixed = p1 - per * start
    b = int((headroom * capacity - fixed) // per) // 8 * 8
    b = min(b, cap)
    for _ in range(tries):
        if b <= 2 * start:
            break
        if fits(b) is not None:
            return b, trials
        b = int(b * 7 / 8) // 8 * 8
    return 2 * start, trials


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_run(cfg, frozen: int, new: int, mono: bool, device, dtype):
    """A fresh model of ``frozen + new`` blocks set up as a monolithic step or a grow stage, and its step."""
    from growlm.growth import set_trainable
    from growlm.plan import StageSpec
    from stage_cost import make_model, stepper

    depth_cfg = dataclasses.replace(cfg, n_layers=frozen + new)
    model = make_model(depth_cfg).to(device)
    if mono:
        set_trainable(model, StageSpec(grow=0, train="all", tokens=1), [])
    else:
        set_trainable(model, StageSpec(grow=new, tokens=1), list(range(frozen, frozen + new)))
    return model, stepper(model, autocast=dtype)


def cuda_batch(cfg, device, dtype, cap: int) -> tuple[int, list]:
    """The largest batch of the 9-block monolithic step (the most memory of all the runs) that fits, eager."""
    import torch

    model, step = make_run(cfg, 0, cfg.n_layers, True, device, dtype)

    def probe(b: int) -> int | None:
        x = torch.randint(0, cfg.vocab_size, (b, cfg.context), device=device)
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(x, x)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        except Exception as e:
            if not is_oom(e):
                raise
            return None
        finally:
            for p in model.parameters():
                p.grad = None
            del x
            free_cuda()

    capacity = torch.cuda.get_device_properties(device).total_memory
    return search_batch(probe, capacity, cap=cap)  # the model goes with this frame; the caller frees the cache


# ---------------------------------------------------------------------------------------------------------
# steps


def speed_step(rep: Report, a, ctx: dict) -> None:
    import torch

    from gpu_speed import preset_figures
    from growlm.model import preset_config
    from timing import matmul_peak

    device, cuda = ctx["device"], ctx["cuda"]
    cfg, _ = preset_config(PRESET)
    if a.dry_run:  # gpu_speed.py --tiny's dimensions
        cfg = dataclasses.replace(cfg, vocab_size=512, d_model=64, n_heads=2, context=64, embed_dim=64)
    dtype = torch.bfloat16 if cuda else None
    compile = cuda and not a.no_compile
    ctx.update(cfg=cfg, dtype=dtype, compile=compile)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as gpu_speed.py: fp32 leftovers on tensor cores
    peak = matmul_peak(device, dtype or torch.float32, 8192 if cuda else 1024)
    peak_name = "bf16" if cuda else "fp32"
    rep.emit("matmul_peak", round(peak / 1e12, 4), f"TFLOP/s ({peak_name} torch.mm, this run)")
    rep.say(f"matmul peak {peak / 1e12:.4g} TFLOP/s")
    sheet, sheet_note = datasheet_figure(rep, a.datasheet_name)

    if a.batch:
        batch, trials, method = a.batch, [], "given (--batch)"
    elif cuda:
        rep.say("searching the largest batch (eager probes of the 9-block monolithic step)")
        batch, trials = cuda_batch(cfg, device, dtype, a.max_batch)
        free_cuda()
        method = f"largest that fits in 85% of device memory, eager probes, capped at {a.max_batch}"
    else:
        batch, trials, method = 2, [], "fixed on CPU (dry run)"
    repeats = a.repeats or (6 if cuda else 2)
    common = {"preset": PRESET, "batch": batch, "context": cfg.context, "dtype": str(dtype or torch.float32),
              "compile": compile}
    rows = None
    while rows is None:
        rep.say(f"timing {PRESET} at batch {batch} x {cfg.context}, {repeats} repeats, compile={compile}")
        try:
            rows = preset_figures(cfg, batch, repeats, device, dtype, compile, peak)
        except Exception as e:
            if not (cuda and is_oom(e)) or batch <= 1:
                raise
        if rows is None:  # out of memory: free what the failed models held (outside the except) and halve
            free_cuda()
            trials.append([batch, "oom while timing"])
            batch //= 2
            common["batch"] = batch
    ctx["batch"] = batch
    bound = None if a.batch or not cuda else "cap (--max-batch)" if batch == a.max_batch else "memory"
    rep.emit("batch", batch, f"sequences of {cfg.context} tokens", tokens_per_step=batch * cfg.context,
             method=method, bound_by=bound, trials=trials)

    mfu_unit = f"of the {peak_name} matmul peak"
    sheet_unit = "of the datasheet's dense bf16 peak"
    for r in rows:
        f, n = r["frozen"], r["new"]
        d = f + n
        headline = cuda and d == cfg.n_layers
        mono_goal = f">= {MFU_GOAL}" if headline else None
        target = {"frozen": 0, "new": d, "mono": True}
        rep.emit(f"mono[{d}].tokens_per_s", round(r["mono_tokens_per_s"], 1), "tokens/s", **common)
        m = rep.emit(f"mono[{d}].mfu", round(r["mono_mfu"], 4), mfu_unit, mono_goal,
                     None if mono_goal is None else r["mono_mfu"] >= MFU_GOAL, **common)
        ctx["targets"][m["figure"]] = target
        mfu = r["mono_flop_per_s"] / sheet if sheet else None
        sheet_goal = f">= {SHEET_MFU_GOAL}" if headline and mfu is not None else None
        m = rep.emit(f"mono[{d}].mfu_datasheet", None if mfu is None else round(mfu, 4), sheet_unit, sheet_goal,
                     None if sheet_goal is None else mfu >= SHEET_MFU_GOAL, datasheet=sheet_note, **common)
        ctx["targets"][m["figure"]] = target
        target = {"frozen": f, "new": n, "mono": False}
        rep.emit(f"grow[{f}+{n}].tokens_per_s", round(r["grow_tokens_per_s"], 1), "tokens/s", **common)
        rep.emit(f"grow[{f}+{n}].mfu", round(r["grow_mfu"], 4), mfu_unit, **common)
        rep.emit(f"grow[{f}+{n}].mfu_datasheet", round(r["grow_flop_per_s"] / sheet, 4) if sheet else None,
                 sheet_unit, datasheet=sheet_note, **common)
        g = rep.emit(f"grow[{f}+{n}].ratio_over_model", round(r["ratio_over_model"], 4),
                     "x the FLOP model with head (grow/mono time)", f"<= {RATIO_GOAL}",
                     r["ratio_over_model"] <= RATIO_GOAL, measured_ratio=round(r["measured_ratio"], 4),
                     flop_ratio_head=round(r["flop_ratio_head"], 4), **common)
        ctx["targets"][g["figure"]] = target
        rep.emit(f"grow[{f}+{n}].cached_ratio_over_model", round(r["cached_ratio_over_model"], 4),
                 "x the FLOP model without the trunk (trunk-activation cache)", **common)


def datasheet_figure(rep: Report, name: str | None = None) -> tuple[float | None, str]:
    """Emit the datasheet's dense bf16 peak of this device (of ``name`` instead, where given: a dry run exercises a
    known device's row that way) and return it with its note; None where the table has no row for it."""
    from timing import datasheet_peak

    looked_up = name or rep.device
    sheet, note = datasheet_peak(looked_up)
    rep.emit("datasheet_peak", None if sheet is None else round(sheet / 1e12, 4), "TFLOP/s (dense bf16, datasheet)",
             note=note, looked_up=looked_up)
    rep.say(f"datasheet peak: {note}")
    return sheet, note


def cuda_step_peak(cfg, frozen: int, new: int, mono: bool, batch: int, device, dtype, compile: bool) -> int:
    """``max_memory_allocated`` over two steps after a warm-up one (weights and optimizer state included)."""
    import torch

    from growlm.model import compiled_blocks

    free_cuda()
    model, step = make_run(cfg, frozen, new, mono, device, dtype)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context), device=device)
    try:
        with compiled_blocks(model, compile):
            step(x, x)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                step(x, x)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
    finally:
        del model, step, x
        free_cuda()


def cpu_step_peak(cfg, frozen: int, new: int, mono: bool, batch: int) -> int:
    """Peak RSS over three steps above the RSS of the built model: the kernel's high-water mark
    (VmHWM) is reset through /proc/self/clear_refs (OSError where that is not allowed). The dry run's figure."""
    import torch

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def trim() -> None:  # hand the heap that earlier runs freed back, so this one faults its own pages in
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    trim()
    model, step = make_run(cfg, frozen, new, mono, torch.device("cpu"), None)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
    trim()
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS:")
    for _ in range(3):  # the first step allocates the optimizer state too, as a stage's does
        step(x, x)
    peak = status("VmHWM:") - base
    del model, step, x
    trim()
    return peak


def memory_step(rep: Report, a, ctx: dict) -> None:
    cfg = ctx["cfg"]
    f, n = STAGES[-1]
    if ctx["cuda"]:
        batch, dev, dt, comp = ctx["batch"], ctx["device"], ctx["dtype"], ctx["compile"]
        grow = cuda_step_peak(cfg, f, n, False, batch, dev, dt, comp)
        mono = cuda_step_peak(cfg, 0, f + n, True, batch, dev, dt, comp)
        method, extra = "torch.cuda.max_memory_allocated over 2 steps", {"batch": batch, "context": cfg.context}
    else:
        batch = ctx["batch"]
        try:
            grow = cpu_step_peak(cfg, f, n, False, batch)
            mono = cpu_step_peak(cfg, 0, f + n, True, batch)
            method, extra = "peak RSS over 3 steps above the built model's (VmHWM reset)", {"batch": batch}
        except OSError:  # no /proc/self/clear_refs: train_speed's child processes (1 new block over 8)
            from train_speed import peak_memory

            r = peak_memory(cfg.d_model, f + n - 1, cfg.vocab_size, cfg.context, batch)
            grow, mono = r["grow_mb"] * 2**20, r["mono_mb"] * 2**20
            method, extra = "peak RSS above the model, child processes (train_speed.peak_memory)", {}
    ratio = grow / max(mono, 1.0)
    m = rep.emit(f"memory.grow[{f}+{n}]_vs_mono[{f + n}]", round(ratio, 4), "x the monolithic peak", "< 1",
                 ratio < 1, grow_bytes=int(grow), mono_bytes=int(mono), method=method, **extra)
    ctx["targets"][m["figure"]] = {"frozen": f, "new": n, "mono": False}


def profile_summary(cfg, frozen: int, new: int, mono: bool, batch: int, device, dtype, compile: bool,
                    steps: int = 3) -> tuple[list[dict], str]:
    """Top ops/kernels by self device time (self CPU time on CPU) per step, and the profiler's table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from growlm.model import compiled_blocks

    cuda = device.type == "cuda"
    model, step = make_run(cfg, frozen, new, mono, device, dtype)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context), device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with compiled_blocks(model, compile):
            for _ in range(2):
                step(x, x)
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    step(x, x)
                if cuda:
                    torch.cuda.synchronize()
    finally:
        del model, step, x
        free_cuda()
    events = prof.key_averages()
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)

    def self_us(e) -> float:
        for n in names:
            v = getattr(e, n, None)
            if v is not None:
                return float(v)
        return 0.0

    kept = list(events)
    if cuda:  # the kernels themselves (their launching ops carry the same time again)
        from torch.autograd import DeviceType

        kernels = [e for e in kept if getattr(e, "device_type", None) == DeviceType.CUDA]
        kept = kernels or kept
    total = sum(self_us(e) for e in kept) or 1.0
    top = sorted(kept, key=self_us, reverse=True)[:12]
    rows = [{"name": e.key[:120], "ms_per_step": round(self_us(e) / 1e3 / steps, 4),
             "share": round(self_us(e) / total, 4), "calls_per_step": round(e.count / steps, 2)}
            for e in top if self_us(e) > 0]
    try:
        table = events.table(sort_by=names[0], row_limit=25)
    except Exception:  # an older torch names the device column otherwise
        table = events.table(sort_by=names[-1], row_limit=25)
    return rows, table


def profile_step(rep: Report, a, ctx: dict) -> None:
    missed = [f["figure"] for f in rep.figures if f["met"] is False and f["figure"] in ctx["targets"]]
    forced = False
    if a.dry_run and not missed and ctx["targets"]:
        missed, forced = [sorted(ctx["targets"])[0]], True  # exercise the path once
    done: dict[tuple, list] = {}
    for name in missed[: a.max_profiles if a.max_profiles is not None else 1 if a.dry_run else 3]:
        t = ctx["targets"][name]
        key = (t["frozen"], t["new"], t["mono"])
        if time.perf_counter() - rep.t0 > a.budget_s * 0.8:
            rep.emit(f"profile[{name}]", None, None, skipped="time budget", forced=forced)
            continue
        if key not in done:
            what = f"mono[{t['new']}]" if t["mono"] else f"grow[{t['frozen']}+{t['new']}]"
            rep.say(f"profiling {what} for {name}")
            rows, table = profile_summary(ctx["cfg"], t["frozen"], t["new"], t["mono"], ctx["batch"], ctx["device"],
                                          ctx["dtype"], ctx["compile"])
            rep._append("profiles.txt", f"== {what} (for {name}), batch {ctx['batch']}, per 3 steps\n{table}\n\n")
            done[key] = rows
        unit = "ms of self device time per step" if ctx["cuda"] else "ms of self CPU time per step"
        rep.emit(f"profile[{name}]", done[key], unit, forced=forced, step="mono" if t["mono"] else "grow",
                 frozen=t["frozen"], new=t["new"])
    if not missed:
        rep.say("every figure met its goal: no profile needed")


def plan_step(rep: Report, a, ctx: dict) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from cli_util import SMALL_PLAN, child_env, write_plan
    from conftest import TEXT_EN, TEXT_RU, TEXT_ZH
    from growlm.store import stages

    dev = "cuda" if ctx["cuda"] else "cpu"
    log: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-plan-") as tmp:
        d = Path(tmp)
        corpus = d / "corpus"
        corpus.mkdir()
        (corpus / "train.txt").write_text((TEXT_EN + TEXT_RU + TEXT_ZH) * 40, encoding="utf-8")
        (corpus / "valid.txt").write_text((TEXT_EN + TEXT_RU + TEXT_ZH) * 4, encoding="utf-8")
        plan = write_plan(d, SMALL_PLAN.replace("log_every = 2", f'log_every = 2\ndevice = "{dev}"'), corpus)
        run = d / "run"

        def growlm(*args: str, **env: str) -> subprocess.CompletedProcess:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "growlm", *args], capture_output=True, text=True,
                               env=child_env(**env), timeout=400, cwd=d)
            log.append(f"$ {' '.join(f'{k}={v}' for k, v in env.items())} growlm {shlex.join(args)}  -> rc {r.returncode}"
                       f" in {time.perf_counter() - t:.1f} s\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}\n")
            return r

        fault = a.fault
        killed = growlm("train", str(plan), "--out", str(run), "--no-progress", GROWLM_FAULT=fault)
        resumed = growlm("train", str(plan), "--out", str(run), "--resume", "--no-progress")
        audits = {}
        for n, sd in stages(run):
            meta = json.loads((sd / "model.json").read_text())
            audits[f"stage-{n}"] = bool((meta.get("audit") or {}).get("ok"))
        verify = growlm("verify", str(run), "--json")
        try:
            verify_ok = verify.returncode == 0 and bool(json.loads(verify.stdout).get("ok"))
        except json.JSONDecodeError:
            verify_ok = False
    rep._append("plan.log", "\n".join(log))
    problems = []
    if killed.returncode != -9:
        problems.append(f"the faulted run exited {killed.returncode}, not SIGKILL")
    if resumed.returncode:
        problems.append(f"--resume exited {resumed.returncode}: {resumed.stderr.strip()[-300:]}")
    if sorted(audits) != ["stage-1", "stage-2"] or not all(audits.values()):
        problems.append(f"audits {audits}")
    if not verify_ok:
        problems.append(f"verify exited {verify.returncode}: {verify.stderr.strip()[-300:]}")
    rep.emit("plan.kill_resume", "ok" if not problems else "; ".join(problems), None,
             "killed, resumed, audits ok, verify ok", not problems, fault=fault, device_plan=dev,
             resumed_at_step=int(m[1]) if (m := re.search(r"resuming stage-2 at step (\d+)", resumed.stdout)) else None,
             killed_rc=killed.returncode, resume_rc=resumed.returncode, verify_rc=verify.returncode, audits=audits,
             seconds=round(time.perf_counter() - t0, 1))


def pytest_step(rep: Report, a, ctx: dict) -> None:
    args = ["tests/test_cuda.py", "tests/test_loop.py"]
    if not ctx["cuda"]:  # test_cuda skips on CPU: a fast subset of test_loop exercises the step
        args += ["-k", "nan_step or checkpoint_is_never"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    rep.say(f"$ {shlex.join(cmd)}")
    t0 = time.perf_counter()
    # on the GPU, what is left of the budget (plus a minute): the summary must print inside the device call
    timeout = a.pytest_timeout or (180 if a.dry_run else max(90, int(a.budget_s + 60 - (t0 - rep.t0))))
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        so, se = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        rep._append("pytest.log", f"$ {shlex.join(cmd)}  -> killed after {timeout} s\n{so}\n{se}\n")
        raise RuntimeError(f"pytest ran past its {timeout} s") from None
    rep._append("pytest.log", f"$ {shlex.join(cmd)}  -> rc {r.returncode}\n{r.stdout}\n{r.stderr}\n")
    counts = {k: 0 for k in ("passed", "failed", "skipped", "deselected", "error")}
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail):
        counts[k.rstrip("s") if k.startswith("error") else k] += int(n)
    if r.returncode not in (0, 1):  # 0 all passed, 1 some failed (a result); else pytest itself broke
        raise RuntimeError(f"pytest exited {r.returncode}: {tail or r.stderr.strip()[-300:]}")
    if r.returncode:
        rep.say(r.stdout[-3000:])
    rep.emit("pytest", counts["passed"], "tests passed", "all pass", r.returncode == 0 and counts["passed"] > 0,
             **counts, rc=r.returncode, selection=" ".join(args), seconds=round(time.perf_counter() - t0, 1))


STEPS = {"speed": speed_step, "memory": memory_step, "profile": profile_step, "plan": plan_step,
         "pytest": pytest_step}
NEEDS_SPEED = {"memory", "profile"}


def start(a, needed: dict[str, tuple[str, ...]], skip_install: bool, report: type[Report]):
    """The start of a prepared run, shared with gpu_study.py: the install step (before torch is imported, so that
    what it installs is what gets imported), torch on one thread in a dry run, the report and its first figure.

    Returns the report, the device and whether it is CUDA; without CUDA outside a dry run (or ``a.install_only``)
    the report's ``crashed`` holds "cuda" and the caller ends with its summary. ``a`` has ``dry_run``, ``wheels``,
    ``site`` and ``install_only`` (``getattr`` default False)."""
    install_only = getattr(a, "install_only", False)
    install, install_exc = None, None
    if not skip_install:
        try:
            install = install_step(a.dry_run, user_path(a.wheels), user_path(a.site), needed)
        except Exception as e:  # recorded once the report exists
            install_exc = (e, traceback.format_exc())

    if a.dry_run:  # one thread, here and in every child: toy sizes gain nothing from more, and on a busy 2-core
        # machine (CI's, running the suite) oversubscribed threads made the whole dry run 3x slower
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    cuda = torch.cuda.is_available() and not a.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    rep = report(user_path(a.out), name, torch.__version__, a.dry_run)
    rep.say(f"{'dry run' if a.dry_run else 'GPU run'} on {name}, torch {torch.__version__}, python "
            f"{platform.python_version()}, out {rep.out}")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if install_exc:
        rep.crashed.append("install")
        rep.say(f"step install crashed:\n{install_exc[1]}")
        rep.emit("install.crashed", f"{type(install_exc[0]).__name__}: {install_exc[0]}"[:500], None, step="install")
    elif install:
        still = install["missing_after"]
        rep.emit("install.missing", len(still), "modules that do not import", "== 0", not still, **install)
        if still and not a.dry_run:
            rep.crashed.append("install")
            rep.say(f"cannot import {sorted(still)}; wheels were looked for in {install['wheel_dirs']} "
                    f"(prepare them with: bash bench/gpu_check.sh --prepare-wheels .whl)")
    if not a.dry_run and not cuda and not install_only:
        rep.say("no CUDA device here: the figures need one (use --dry-run on CPU)")
        rep.crashed.append("cuda")
    return rep, device, cuda


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, every step (install: check only)")
    ap.add_argument("--out", help="write figures.jsonl, summary.json and the logs here")
    ap.add_argument("--wheels", help="wheel dir for the install step (default $GROWLM_WHEELS, .whl, bench/wheels)")
    ap.add_argument("--site", default=os.environ.get("GROWLM_SITE", "/tmp/growlm-site"),
                    help="where the install step puts packages (prepended to PYTHONPATH)")
    ap.add_argument("--prepare-wheels", metavar="DIR", help="download the GPU image's missing wheels into DIR, exit")
    ap.add_argument("--print-only", action="store_true", help="with --prepare-wheels: print the pip command only")
    ap.add_argument("packages", nargs="*", help="with --prepare-wheels: instead of the default set")
    ap.add_argument("--install-only", action="store_true", help="run the install step alone")
    ap.add_argument("--require", action="append", default=[], metavar="MODULE:DIST[,DIST]",
                    help="one more module the install step must import (tests use it)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    ap.add_argument("--batch", type=int, help="a fixed batch instead of the search")
    ap.add_argument("--max-batch", type=int, default=256, help="the search's upper bound (time per step)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-profiles", type=int, help="profiles of missed figures (default 3; 1 in a dry run)")
    ap.add_argument("--fault", default="kill@step:2:3")
    ap.add_argument("--datasheet-name", metavar="NAME",
                    help="look up the datasheet peak under this device name instead of the device's own")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock plan: profiles are left out past 80%% of it, pytest gets what is left + 60 s")
    ap.add_argument("--pytest-timeout", type=int, default=None)
    a = ap.parse_args()
    if a.prepare_wheels:
        return prepare_wheels(user_path(a.prepare_wheels), a.packages, a.print_only)
    if a.packages:
        ap.error(f"unexpected arguments: {a.packages}")
    skip = {s for s in a.skip.split(",") if s}
    if skip - set(STEPS) - {"install"}:
        ap.error(f"--skip: unknown step(s) {sorted(skip - set(STEPS) - {'install'})}")
    needed = dict(NEEDED)
    for spec in a.require:
        mod, _, dists = spec.partition(":")
        needed[mod] = tuple(dists.split(",")) if dists else (mod,)

    rep, device, cuda = start(a, needed, "install" in skip, Report)
    if "cuda" in rep.crashed:
        rep.summary()
        return 1
    ctx: dict = {"device": device, "cuda": cuda, "targets": {}}
    for step, fn in STEPS.items():
        if a.install_only or step in skip:
            continue
        if step in NEEDS_SPEED and "batch" not in ctx:
            rep.say(f"step {step} needs the speed step's batch; left out")
            continue
        rep.say(f"step {step}")
        try:
            fn(rep, a, ctx)
        except Exception as e:
            rep.crash(step, e)
        free_cuda()  # outside the except: a traceback holds the failed step's tensors
    s = rep.summary()
    return 1 if s["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
