"""Run dirs (the layout is in :mod:`growlm.store`): what a path holds (model, mixture or run), a
run's stages, a stage's resumable training state, its metrics log and lock.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from growlm import distributed
from growlm.errors import GrowlmError
from growlm.files import (
    WriteError,
    atomic_dir,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    fault_point,
)
from growlm.hashing import sha256_file
from growlm.store.mixture import MIXTURE_JSON, MixtureDir
from growlm.store.model import MODEL_JSON, ModelDir, load_tensors, read_meta

PLAN_JSON = "plan.json"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# an in-stage checkpoint: these files, with their sha256 in its state.json
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
_STAGE = re.compile(r"stage-([1-9]\d*)")


# ----------------------------------------------------------------------------------------------
# What a path holds


@dataclass(frozen=True)
class RunDir:
    """A training run with at least one finished stage."""

    path: Path


def stage_dir(run: Path, index: int) -> Path:
    """Where stage ``index`` of a run is (or will be) written."""
    return Path(run) / f"stage-{index}"


def stages(run: Path | RunDir) -> list[tuple[int, Path]]:
    """A run's finished stages as ``(N, RUN/stage-N)``, in stage order (stage-10 after stage-9).

    Only the names training writes count: a user's ``stage-old`` backup, a ``stage-03`` copy or a
    file named like a stage is not a stage and is left out.
    """
    root = run.path if isinstance(run, RunDir) else Path(run)
    found = ((_STAGE.fullmatch(p.name), p) for p in root.glob("stage-*"))
    return sorted((int(m[1]), p) for m, p in found if m and p.is_dir())


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run dir, finished stages or not (it holds plan.json and a lock file)."""
    return (Path(path) / PLAN_JSON).is_file() and (Path(path) / LOCK).exists()


def resolve(path: str | Path) -> ModelDir | MixtureDir | RunDir:
    """What ``path`` holds: a model dir, a mixture dir or a run with finished stages.

    A dir holding several of these is, in this order, a mixture, a model, a run. Anything else is
    a one-line GrowlmError naming the path and what it lacks.
    """
    path = Path(path)
    if (path / MIXTURE_JSON).is_file():
        return MixtureDir(path)
    if (path / MODEL_JSON).is_file():
        return ModelDir(path, read_meta(path))
    if stages(path):
        return RunDir(path)
    if not path.exists():
        raise GrowlmError(f"not found: {path} (no model, mixture or run there)")
    if not path.is_dir():
        raise GrowlmError(f"{path} is not a directory, so not a growlm model, mixture or run")
    if is_run(path):
        raise GrowlmError(f"{path} is a run with no finished stage yet (no stage-N dir)")
    raise GrowlmError(f"{path} is not a growlm model, mixture or run (no {MODEL_JSON}, {MIXTURE_JSON} or stage-N dir)")


def check_out(out: Path, *, run_itself: bool = False) -> None:
    """Refuse an output path that is, or lies inside, a growlm model dir, mixture dir or run: those are
    immutable once written. ``run_itself``: ``out`` may be a run (``growlm train --resume``)."""
    try:
        p = Path(out).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise GrowlmError(f"--out {out}: unusable path: {e}") from None
    for parent in (p, *p.parents):
        if (parent / MODEL_JSON).is_file() or (parent / MIXTURE_JSON).is_file() or \
                (is_run(parent) and not (run_itself and parent == p)):
            raise GrowlmError(f"--out {out} is inside the growlm model, mixture or run {parent}, which is never "
                              f"written to again; choose a directory outside it")


# ----------------------------------------------------------------------------------------------
# In-stage training state


@dataclass
class StageState:
    """Everything that changes while a stage trains (what an in-stage checkpoint stores)."""

    step: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    last_loss: float = float("nan")
    valid_loss: float | None = None
    audit: dict | None = None  # the trainable-set audit, once the stage has ended


class StageCheckpoints:
    """``RUN/checkpoints/<key>``: the latest resumable state of the stage being trained.

    A checkpoint holds the trainable tensors, the optimizer state, the CPU RNG and the data position,
    so a resumed stage continues bit-identically. Every rank takes part in :meth:`save` (FSDP2 shards
    are all-gathered, a collective); rank 0 alone writes.
    """

    def __init__(self, run: Path, key: str, *, rank: int = 0, plan_sha256: str | None = None) -> None:
        self.root, self.rank, self.plan_sha256 = Path(run) / CHECKPOINTS / key, rank, plan_sha256

    @staticmethod
    def recorded_plans(run: Path) -> dict[Path, str | None]:
        """The plan digest each stage's latest checkpoint was written under (None: one from before growlm
        recorded it), so a resume can check its plan against what the stage really trained with."""
        out = {}
        for key in sorted(p for p in (Path(run) / CHECKPOINTS).glob("*") if p.is_dir()):
            ck = StageCheckpoints(run, key.name).latest()
            if ck is None:
                continue
            try:
                out[ck] = json.loads((ck / "state.json").read_text(encoding="utf-8")).get("plan_sha256")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
                raise GrowlmError(f"checkpoint {ck} is corrupt ({ck / 'state.json'}: {e!r}); remove {ck} to restart "
                                  f"this stage from its beginning (completed stages are intact)") from None
        return out

    def latest(self) -> Path | None:
        """The newest complete checkpoint (temp dirs of a killed write are ignored)."""
        steps = sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())
        return steps[-1] if steps else None

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, batches, state: StageState,
             stage: int) -> Path:
        """Write ``step-S`` atomically, then drop the older ones; returns its path."""
        names = {id(p): n for n, p in model.named_parameters()}
        trainable = {n: distributed.full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}
        osd = opt.state_dict()
        opt_tensors, opt_scalars = {}, {}
        for idx, s in osd["state"].items():
            pname = names[id(opt.param_groups[0]["params"][idx])]
            for k, v in s.items():
                if torch.is_tensor(v):
                    opt_tensors[f"{pname}::{k}"] = distributed.full_tensor(v)
                else:
                    opt_scalars[f"{pname}::{k}"] = v
        final = self.root / f"step-{state.step:08d}"
        if self.rank != 0 or final.exists():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final) as tmp:
            atomic_save_tensors(tmp / "trainable.safetensors", trainable)
            atomic_save_tensors(tmp / "optimizer.safetensors", opt_tensors)
            fault_point("checkpoint", stage, state.step)
            atomic_save_tensors(tmp / "rng.safetensors", {"cpu": torch.get_rng_state()})
            info = {"step": state.step, "tokens": state.tokens, "wall_s": state.wall_s, "last_loss": state.last_loss,
                    "data": batches.state_dict(), "optimizer_scalars": opt_scalars,
                    "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]],
                    "files": {f: sha256_file(tmp / f) for f in CHECKPOINT_FILES}}
            if self.plan_sha256 is not None:
                info["plan_sha256"] = self.plan_sha256
            atomic_write_json(tmp / "state.json", info)
        for old in self.root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for tmp_left in self.root.glob(".step-*.tmp"):
            shutil.rmtree(tmp_left, ignore_errors=True)
        return final

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, batches, state: StageState) -> Path | None:
        """Load the latest checkpoint into the live objects; returns it (``None``: there is none, the
        stage starts over). A damaged checkpoint is a one-line error saying how to start the stage over."""
        ck = self.latest()
        if ck is None:
            return None
        try:
            self._load(ck, model, opt, batches, state)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise GrowlmError(f"checkpoint {ck} is corrupt ({ck / 'state.json'}: {e!r}); remove {ck} to restart "
                              f"this stage from its beginning (completed stages are intact)") from None
        return ck

    def discard(self) -> None:
        """Remove every checkpoint of the stage (it has been saved as a model dir)."""
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _load(ck: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, batches, state: StageState) -> None:
        """Everything of checkpoint ``ck`` into the live objects, its files checked first (a malformed
        state.json surfaces as KeyError/TypeError/ValueError, which :meth:`restore` reports)."""
        info = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        if set(info["files"]) != set(CHECKPOINT_FILES):
            raise ValueError(f"it lists {sorted(info['files'])}, not {list(CHECKPOINT_FILES)}")
        for f in CHECKPOINT_FILES:
            if not (ck / f).is_file() or sha256_file(ck / f) != info["files"][f]:
                raise GrowlmError(f"checkpoint file {ck / f} is missing or corrupted (checksum mismatch); remove "
                                  f"{ck} to restart this stage from its beginning (completed stages are intact)")
        trainable = load_tensors(ck / "trainable.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in trainable.items():
                if n not in params or not params[n].requires_grad:
                    raise GrowlmError(f"checkpoint {ck} does not match this stage (tensor {n})")
                params[n].copy_(distributed.like(t, params[n]))
        opt_tensors = load_tensors(ck / "optimizer.safetensors")
        pos = {id(p): idx for idx, p in enumerate(opt.param_groups[0]["params"])}
        ids = {n: pos[id(p)] for n, p in params.items() if id(p) in pos}
        st: dict[int, dict] = {}
        for key, v in opt_tensors.items():
            pname, k = key.split("::")
            st.setdefault(ids[pname], {})[k] = v if k == "step" else distributed.like(v, params[pname])
        for key, v in info["optimizer_scalars"].items():
            pname, k = key.split("::")
            st.setdefault(ids[pname], {})[k] = v
        groups = [dict(g, params=list(range(len(opt.param_groups[0]["params"])))) for g in info["param_groups"]]
        opt.load_state_dict({"state": st, "param_groups": groups})
        torch.set_rng_state(load_tensors(ck / "rng.safetensors")["cpu"])
        batches.load_state_dict(info["data"])
        state.step, state.tokens, state.wall_s = int(info["step"]), int(info["tokens"]), float(info["wall_s"])
        state.last_loss = float(info["last_loss"])


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON line per logged step; rank 0 alone writes it.

    With ``tensorboard`` the numbers of each line also go to ``RUN/tensorboard/`` as scalars
    (tag = the record's key, step = the global step the caller gives).
    """

    TENSORBOARD = "tensorboard"  # RUN/tensorboard: the event files
    # the record's keys that become scalars (the rest are positions: the stage, and the phase of a stage of
    # several, are kept as scalars so a chart shows where each starts on the global-step axis)
    SCALARS = ("loss", "valid_loss", "lr", "tokens_per_s", "grad_norm", "params_active", "stage", "phase")

    @staticmethod
    def read(run: Path) -> list[dict]:
        """The records of ``RUN/metrics.jsonl`` in order (none when the run logged nothing); a line that
        is not a JSON object is a one-line error naming the file and the line."""
        f = Path(run) / METRICS
        if not f.is_file():
            return []
        out = []
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                raise GrowlmError(f"{f}: line {n} is not a JSON record")
            out.append(rec)
        return out

    def __init__(self, run: Path, *, rank: int = 0, tensorboard: bool = False) -> None:
        self.path, self.rank = Path(run) / METRICS, rank
        self.tensorboard = tensorboard and rank == 0
        self._writer = None
        self._purge_step: int | None = None

    @classmethod
    def writer(cls, run: Path, purge_step: int | None = None):
        """A ``SummaryWriter`` on ``RUN/tensorboard``; ``purge_step`` hides the events a killed process
        logged from that global step on (the resumed run logs them again)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GrowlmError("TensorBoard logging needs the tensorboard package (make setup installs it; "
                              "or pip install tensorboard)") from None
        return SummaryWriter(str(Path(run) / cls.TENSORBOARD), purge_step=purge_step)

    def scalars(self, rec: dict, step: int) -> None:
        """The record's numbers as TensorBoard scalars at global ``step`` (nothing without ``tensorboard``)."""
        if not self.tensorboard:
            return
        if self._writer is None:  # opened at the first scalar: a resume has set its purge step by then
            self._writer = self.writer(self.path.parent, self._purge_step)
        for key in self.SCALARS:
            if rec.get(key) is not None:
                self._writer.add_scalar(key, rec[key], step)

    def flush(self) -> None:
        """Write the pending scalars to the event file (at each stage's end, so a watcher sees them)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (a later scalar opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def append(self, rec: dict, *, global_step: int | None = None) -> None:
        """One line, all or nothing: a write that fails (a full disk) is cut back to the line before.
        With ``tensorboard`` its numbers also become scalars at ``global_step`` (default: its step)."""
        if self.rank != 0:
            return
        with open(self.path, "ab") as fh:
            size = fh.tell()
            try:
                fh.write((json.dumps(rec) + "\n").encode())
                fh.flush()
            except OSError as e:
                fh.truncate(size)
                raise WriteError(self.path, str(e.strerror or e)) from e
        self.scalars(rec, rec["step"] if global_step is None else global_step)

    def truncate(self, stage: int, step: int, *, phase: int = 1, global_step: int | None = None) -> None:
        """Drop the lines of ``stage``'s ``phase`` after ``step`` (a killed process logged them past the
        point we resume from; a line without a phase is of phase 1), and any line a kill or a full disk tore
        (not JSON, or a record without its stage and step). With ``tensorboard``, the events after ``global_step`` are hidden likewise; only the
        first resume point counts, as everything a killed process logged lies before the first stage
        it did not finish."""
        if self.tensorboard and self._writer is None and self._purge_step is None and global_step is not None:
            self._purge_step = global_step + 1
        if self.rank != 0 or not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(ln)
                mine = rec["stage"] == stage and rec.get("phase", 1) == phase and rec["step"] > step
            except (ValueError, TypeError, KeyError):
                continue
            if not mine:
                keep.append(ln)
        atomic_write_bytes(self.path, ("\n".join(keep) + "\n").encode() if keep else b"")
