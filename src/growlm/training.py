"""The one training loop: every stage of a plan (grow, LoRA, monolithic, head-only) runs here.

A run dir holds the plan, the docking port, one immutable model dir per finished stage, the
in-stage checkpoints and the metrics; growlm.store describes and owns that layout.

Resuming rebuilds the model exactly (previous stage from disk, then the same seeded growth), then
restores the trainable tensors, the optimizer and the data position of the latest in-stage
checkpoint, so on CPU the final weights are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from growlm import audit, distributed
from growlm.data import Batches, Source, check_batch_split, validation_batches
from growlm.errors import GrowlmError
from growlm.files import atomic_dir, atomic_write_bytes, atomic_write_json, fault_point
from growlm.growth import (
    check_lora_budget,
    check_plan_memory,
    grow,
    lora_blocks,
    phase_active_params,
    phase_flop_per_token,
    phases_problem,
    set_trainable,
    stack,
    stage_active_params,
    stage_phases,
)
from growlm.hashing import canonical_json
from growlm.loading import load_model, port_difference
from growlm.lora import add_lora
from growlm.model import GrowLM, ModelConfig, compiled_blocks
from growlm.plan import (
    Plan,
    StageSpec,
    TrainSpec,
    blocks_problem,
    load_plan,
    plan_difference,
    plan_to_json,
    resolve_plan,
)
from growlm.stages import stage_kind
from growlm.store import (
    CHECKPOINTS,
    LOCK,
    PLAN_JSON,
    MetricsLog,
    StageCheckpoints,
    StageState,
    check_out,
    stage_dir,
    stages,
)
from growlm.store.model import read_meta, save_model
from growlm.trunk_cache import TrunkCache


class Interrupted(GrowlmError):
    """Training stopped by the user (Ctrl-C / SIGTERM) after writing a checkpoint."""

    exit_code = 130


# ----------------------------------------------------------------------------------------------
# Run set-up: lock, docking port, model


@contextlib.contextmanager
def stop_signals(world: int) -> Iterator[None]:
    """Turn Ctrl-C (and, in a single process, SIGTERM) into a checkpoint-then-exit.

    A shell starts background jobs with SIGINT ignored, and Python then installs no handler, so the
    handler is set explicitly. SIGTERM (a scheduler's preemption) is handled only without torchrun,
    whose agent sends it to the surviving ranks when one dies.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    sigs = [signal.SIGINT] + ([signal.SIGTERM] if world == 1 else [])
    old = {s: signal.signal(s, interrupt) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` so a second process cannot write the same run."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        fh = open(run / LOCK, "a+")  # noqa: SIM115 (held open for the whole run)
    except OSError as e:
        raise GrowlmError(f"cannot write the run dir {run}: {e.strerror or e}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise GrowlmError(f"another growlm process is writing {run} (lock {run / LOCK} is held)") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def prepare_tokenizer(plan: Plan, run: Path):
    """RUN/tokenizer: copied from ``tokenizer.dir`` or built from the plan (once; reused on resume)."""
    from growlm.tokenizer import Tokenizer, build_preset, build_tokenizer

    dst = run / "tokenizer"
    if not dst.exists():
        spec = plan.tokenizer
        with atomic_dir(dst) as tmp:
            if spec.dir is not None:
                Tokenizer.load(spec.dir)  # validates before copying
                shutil.rmtree(tmp)
                shutil.copytree(spec.dir, tmp)
            elif spec.preset is not None:
                build_preset(spec.preset, spec.ngram_list).save(tmp)
            else:
                build_tokenizer(spec.corpus, compact=spec.compact, ngrams=tuple(spec.ngrams), top_k=spec.top_k).save(tmp)
    return Tokenizer.load(dst)


def prepare_substrate(plan: Plan, run: Path, tokenizer):
    """RUN/substrate: copied from ``substrate.dir`` (after the docking-port check) or built once."""
    from growlm.substrate import Substrate, build_substrate

    dst = run / "substrate"
    if not dst.exists():
        spec = plan.substrate
        d = plan.model.d_model
        if spec.dir is not None:
            sub = Substrate.load(spec.dir)
            tok_fp = sub.recipe.get("tokenizer_fingerprint")
            if tok_fp not in (None, tokenizer.fingerprint):
                raise GrowlmError(f"substrate {spec.dir} was built for tokenizer {tok_fp[:12]}, "
                                  f"not this plan's tokenizer {tokenizer.fingerprint[:12]}")
        else:
            sub = build_substrate(spec.kind, dim=d, tokenizer=tokenizer, bits=spec.bits, seed=spec.seed, **spec.params)
        with atomic_dir(dst) as tmp:
            sub.save(tmp)
    sub = Substrate.load(dst)
    if sub.vocab_size != tokenizer.vocab_size:
        raise GrowlmError(f"substrate {dst} has {sub.vocab_size} rows but the tokenizer has {tokenizer.vocab_size} tokens")
    if sub.dim != plan.model.d_model:
        raise GrowlmError(f"substrate {dst} has dim {sub.dim} but model.d_model is {plan.model.d_model}")
    return sub


def initial_model(plan: Plan, tokenizer, substrate) -> tuple[GrowLM, list[str]]:
    """The stage-0 model: ``base`` (same docking port, checked) or an empty stack over the substrate."""
    if plan.base is not None:
        saved = load_model(plan.base)
        differ = port_difference((substrate.fingerprint, tokenizer.fingerprint),
                                 (saved.meta.substrate_fingerprint, saved.meta.tokenizer_fingerprint))
        if differ:
            what, mine, theirs = differ
            raise GrowlmError(f"cannot grow on {plan.base}: its {what} fingerprint {theirs[:12]} "
                              f"differs from this plan's {mine[:12]}")
        return saved.model, saved.meta.lineage + [saved.meta.fingerprint]
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=plan.model.d_model, n_heads=plan.model.n_heads,
                      n_layers=0, context=plan.model.context, embed_dim=substrate.table.shape[1],
                      trainable_embedding=substrate.trainable, rope_theta=plan.model.rope_theta)
    model = GrowLM(cfg)
    with torch.no_grad():
        model.embed.weight.copy_(substrate.table)
        g = torch.Generator().manual_seed(_seed(plan.train.seed, "head"))
        model.head.weight.normal_(0.0, 0.02, generator=g)
    return model, []


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def device_of(spec: TrainSpec) -> torch.device:
    """The device a training spec asks for (``auto``: CUDA when present, under torchrun its LOCAL_RANK)."""
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise GrowlmError("train.device = \"cuda\" but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The loop


def lr_at(step: int, n_steps: int, lr: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of steps, then cosine decay to ``min_ratio``·lr."""
    w = max(1, int(warmup * n_steps)) if warmup > 0 else 0
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, n_steps - w)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def stage_sources(plan: Plan, st: StageSpec) -> tuple[list[Source], list[Path]]:
    """Training sources (one per file, with mixture weights) and validation files of a stage."""
    train, weights, valid = plan.data.train, plan.data.weights, plan.data.valid
    if st.data is not None:
        if st.data.train:
            train, weights = st.data.train, st.data.weights
        if st.data.valid:
            valid = st.data.valid
    ws = weights or [1.0] * len(train)
    return [Source(paths=[p], weight=w) for p, w in zip(train, ws, strict=True)], list(valid)


@torch.no_grad()
def evaluate_loss(model: GrowLM, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  autocast: contextlib.AbstractContextManager) -> float | None:
    """Mean validation loss over fixed batches (None when there is no validation data)."""
    if not batches:
        return None
    was = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast:
            total += model(x.to(device), targets=y.to(device)).float()
    model.train(was)
    return float(total) / len(batches)  # one host read for the whole evaluation


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as every stage uses it. Fused on CPU and CUDA: one kernel per step, and it honours
    ``found_inf``, which lets ``optimizer_step`` skip an update without the host looking at the loss."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)


class Step(NamedTuple):
    """What one :func:`optimizer_step` leaves on the device, none of it read by the host yet."""

    loss: torch.Tensor  # the global loss; NaN for a bad step (every rank holds the same, so all agree on a stop)
    halted: torch.Tensor  # the guard, set from the first bad step on
    grad_norm: torch.Tensor | None  # before clipping (None without clipping)


def optimizer_step(loss: torch.Tensor, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                   grad_clip: float, halted: torch.Tensor) -> Step:
    """Backward, clip and update, with a non-finite guard that needs no host sync.

    Once a step's global loss or gradient norm is not finite, ``halted`` (a 0-d device tensor) stays
    set and this and every later update is skipped on the device, so the weights keep their last good
    values until the host next reads the losses.
    """
    global_loss = distributed.mean_across_ranks(loss.detach())
    loss.backward()
    finite = torch.isfinite(global_loss)
    norm = None
    if grad_clip > 0:  # the norm is global too: DDP reduced the gradients, FSDP2 reduces the norm
        norm = distributed.whole(torch.nn.utils.clip_grad_norm_(params, grad_clip)).detach()
        finite &= torch.isfinite(norm)
    halted = torch.maximum(halted, (~finite).float())
    opt.found_inf = halted
    opt.step()
    opt.zero_grad(set_to_none=True)
    return Step(torch.where(finite, global_loss.float(), torch.nan), halted, norm)


@dataclass(frozen=True)
class PhaseOffsets:
    """What a stage's phases have spent so far: a later phase's log lines count on from it, and the stage's
    record is its total."""

    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    flops: float = 0.0

    def plus(self, state: StageState, flops: float) -> PhaseOffsets:
        """These offsets with one more phase's ``state`` and ``flops`` added."""
        return PhaseOffsets(self.tokens + state.tokens, self.steps + state.step, self.wall_s + state.wall_s,
                            self.flops + flops)


@dataclass
class _Fit:
    """One stage being trained: what ``fit``, its step and its cadence share."""

    stage: int
    model: torch.nn.Module
    forward: torch.nn.Module  # the model, wrapped for data parallelism
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    batches: Batches
    vbatches: list
    n_steps: int
    lr: float
    trunk_cache: TrunkCache | None
    ckpts: StageCheckpoints
    halted: torch.Tensor  # set on the device by the first non-finite step (see optimizer_step)
    flop_per_token: float | None  # the phase's FLOP model, for the log's cumulative FLOPs (None: not modelled)
    phase: int | None = None  # the phase of a stage of several, as its log lines name it
    before: PhaseOffsets = field(default_factory=PhaseOffsets)  # the stage's earlier phases
    state: StageState = field(default_factory=StageState)
    pending: list[torch.Tensor] = field(default_factory=list)  # losses the host has not read yet
    t_last: float = 0.0  # time and token count at the last log line: the throughput's window
    tok_last: int = 0
    grad_norm: torch.Tensor | None = None  # the last step's, on the device: read with the losses
    grad_norm_read: float | None = None  # its value at the last read, for the log line


class Loop:
    """The training engine shared by every kind of stage (grow, LoRA, monolithic, router, head).

    ``fit`` trains the parameters that require grad of any module whose ``forward(x, targets=y)``
    returns the loss, with in-stage checkpoints under ``RUN/checkpoints/<key>``, metrics in
    ``RUN/metrics.jsonl`` (both kept by growlm.store) and a progress bar.
    """

    def __init__(self, run: Path, spec: TrainSpec, *, resume: bool = False, progress: bool = True, log=print) -> None:
        self.run, self.spec, self.resume, self.progress, self.log = Path(run), spec, resume, progress, log
        self.device = device_of(spec)
        bf16 = spec.dtype == "bf16" or (spec.dtype == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.rank, self.world = distributed.world()
        self.metrics = MetricsLog(self.run, rank=self.rank, tensorboard=spec.tensorboard)
        # steps of the stages before the one training: TensorBoard's global step is step_offset + the stage's
        self.step_offset = 0
        # recorded in every in-stage checkpoint: a resume proves it continues under the plan the stage began with
        self.plan_sha256: str | None = None
        distributed.init(self.device)
        if self.rank != 0:  # rank 0 alone reports
            self.log, self.progress = (lambda *a, **k: None), False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def fit(self, key: str, model: torch.nn.Module, batches: Batches, vbatches: list, *, n_steps: int, lr: float,
            stage: int, resume_hint: str, declared: set[str], trunk_cache: TrunkCache | None = None,
            flop_per_token: float | None = None, phase: int | None = None,
            before: PhaseOffsets | None = None, keep_final: bool = False) -> StageState:
        """Train ``model``'s trainable parameters for ``n_steps`` steps; returns the final state.

        ``declared`` names the parameters the fit is meant to train: exactly those must require
        grad, and when it ends exactly those must have changed (``state.audit``, see audit.py).
        With ``trunk_cache`` the frozen trunk's activations are read from (or written to) the cache.
        With ``flop_per_token`` every log line carries the stage's FLOPs so far (tokens × FLOPs per token).
        ``phase``: the phase of a stage of several, named in every log line, whose ``tokens``, ``wall_s``
        and ``flops`` run on from the earlier phases' (``before``), so that a stage's log is one curve.
        ``keep_final``: checkpoint the last step too, so a resume finds the fit finished (a phase the next
        one continues from: its trained tensors, data position and RNG).
        """
        live = {n for n, p in model.named_parameters() if p.requires_grad}
        if live != declared:
            raise GrowlmError(f"{key}: the parameters set to train differ from what the stage declares "
                              f"({', '.join(sorted(live ^ declared)[:4])}); nothing was trained")
        start = audit.digests(model.named_parameters())  # before a resume: the stage's true start
        # wrap first: FSDP2 replaces the parameters with shards, and the optimizer must hold those
        forward = distributed.wrap(model, self.spec.parallel, self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        f = _Fit(stage, model, forward, params, make_optimizer(params, lr, self.spec.weight_decay), batches,
                 vbatches, n_steps, lr, trunk_cache, StageCheckpoints(self.run, key, rank=self.rank,
                                                                     plan_sha256=self.plan_sha256),
                 halted=torch.zeros((), device=self.device), flop_per_token=flop_per_token, phase=phase,
                 before=before or PhaseOffsets())
        state, spec = f.state, self.spec
        if self.resume:
            self._resume(f)
        with compiled_blocks(model, spec.compile if spec.compile is not None else self.device.type == "cuda"):
            model.train()
            bar = tqdm(total=n_steps * batches.tokens_per_batch, initial=state.tokens, unit="tok", unit_scale=True,
                       desc=key, disable=None if self.progress else True, dynamic_ncols=True, leave=False)
            f.t_last, f.tok_last = time.perf_counter(), state.tokens
            try:
                while state.step < n_steps:
                    t0 = time.perf_counter()
                    cur_lr = self._step(f)
                    bar.update(batches.tokens_per_batch)
                    log_now = state.step % spec.log_every == 0 or state.step == n_steps
                    checkpoint_now = state.step % spec.checkpoint_every == 0 and state.step < n_steps
                    if log_now or checkpoint_now:
                        self._check_finite(f)
                    # after the read: on CUDA the step above only queued work, and the read waits for it
                    state.wall_s += time.perf_counter() - t0
                    if log_now:
                        self._log_step(f, cur_lr, bar)
                    if checkpoint_now:
                        self._checkpoint(f)
                    fault_point("step", stage, state.step, phase=phase)
            except KeyboardInterrupt:
                bar.close()
                self._check_finite(f)  # never checkpoint past a bad step
                path = self._checkpoint(f)
                raise Interrupted(f"interrupted in {key} at step {state.step}/{n_steps}; checkpoint {path}; "
                                  f"continue with: {resume_hint}") from None
            bar.close()
            if keep_final and f.ckpts.latest() != f.ckpts.root / f"step-{state.step:08d}":
                self._check_finite(f)
                self._checkpoint(f)
            state.valid_loss = evaluate_loss(model, vbatches, self.device, self.autocast())
            self.metrics.scalars({"valid_loss": state.valid_loss}, self.step_offset + state.step)
            self.metrics.flush()  # the stage's scalars reach the event file as it ends
        state.audit = audit.audit(start, audit.digests(model.named_parameters()), declared, state.step, key)
        return state

    def _step(self, f: _Fit) -> float:
        """One optimizer step on the next batch, with no host read (the loss joins ``f.pending``);
        returns the step's learning rate."""
        device = self.device
        x, y = f.batches.next()
        if device.type == "cuda":  # pinned pages let the copy overlap the previous step
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(f.state.step, f.n_steps, f.lr, self.spec.warmup, self.spec.min_lr_ratio)
        for g in f.opt.param_groups:
            g["lr"] = lr
        with self.autocast():
            if f.trunk_cache is None:
                loss = f.forward(x, targets=y)
            else:
                h = f.trunk_cache.trunk(f.model, x, f.batches.last_sequence_ids)
                loss = f.forward(x, targets=y, trunk=h, trunk_depth=f.trunk_cache.depth)
        step = optimizer_step(loss, f.params, f.opt, self.spec.grad_clip, f.halted)
        f.pending.append(step.loss)
        f.halted, f.grad_norm = step.halted, step.grad_norm
        f.state.step += 1
        f.state.tokens += f.batches.tokens_per_batch
        return lr

    def _log_step(self, f: _Fit, lr: float, bar: tqdm) -> None:
        """A metrics line for the step just taken (with the validation loss every ``eval_every`` steps)."""
        state = f.state
        now = time.perf_counter()
        tps = (state.tokens - f.tok_last) / max(now - f.t_last, 1e-9)
        f.t_last, f.tok_last = now, state.tokens
        b = f.before
        rec = {"stage": f.stage, **({"phase": f.phase} if f.phase is not None else {}), "step": state.step,
               "tokens": b.tokens + state.tokens, "loss": round(state.last_loss, 6),
               "lr": lr, "tokens_per_s": round(tps, 1), "params_active": sum(p.numel() for p in f.params),
               "wall_s": round(b.wall_s + state.wall_s, 3)}  # the stage's training time so far: steps only
        if f.flop_per_token is not None:
            rec["flops"] = round(b.flops + f.flop_per_token * state.tokens)
        if f.grad_norm_read is not None:  # read with the losses just before (_check_finite): no extra sync
            rec["grad_norm"] = round(f.grad_norm_read, 6)
        if self.spec.eval_every and state.step % self.spec.eval_every == 0:
            rec["valid_loss"] = evaluate_loss(f.model, f.vbatches, self.device, self.autocast())
        self.metrics.append(rec, global_step=self.step_offset + state.step)
        bar.set_postfix(loss=f"{state.last_loss:.3f}", tok_s=f"{tps:,.0f}")

    def _check_finite(self, f: _Fit) -> None:
        """Read the losses of the steps since the last read (one host sync) and stop at a non-finite one.

        The host reads the losses only when it logs, checkpoints or ends the stage (see optimizer_step);
        the updates from the first bad step on were skipped on the device, so nothing trained is lost.
        """
        if not f.pending:
            return
        # the last gradient norm rides along in the same read, for the log line
        norm = [f.grad_norm.float()] if f.grad_norm is not None else []
        losses = torch.stack(f.pending + norm).tolist()
        f.pending.clear()
        if norm:
            f.grad_norm_read = losses.pop()
        first = f.state.step - len(losses) + 1
        for n, value in enumerate(losses):
            if not math.isfinite(value):
                last = f.ckpts.latest()
                where = f"the last good checkpoint is {last}" if last else f"completed stages in {self.run} are intact"
                raise GrowlmError(f"stage {f.stage} step {first + n}: the loss or gradient norm is not finite; {where}; "
                                  f"lower the learning rate (now {f.lr:g}) or set train.grad_clip")
        f.state.last_loss = losses[-1]

    def _checkpoint(self, f: _Fit) -> Path:
        """Save the stage's resumable state (every rank gathers; rank 0 writes); returns the checkpoint."""
        return f.ckpts.save(f.model, f.opt, f.batches, f.state, f.stage)

    def _resume(self, f: _Fit) -> None:
        """Continue from the stage's latest checkpoint, if any, and drop the metrics logged after it
        (all of the stage's, when it starts over)."""
        ck = f.ckpts.restore(f.model, f.opt, f.batches, f.state)
        if ck is None or f.state.step < f.n_steps:  # a finished phase logged nothing past its end
            self.metrics.truncate(f.stage, f.state.step, phase=f.phase or 1, global_step=self.step_offset + f.state.step)
        if ck is not None:
            self.log(f"resuming {ck.parent.name} at step {f.state.step} from {ck}")


class Trainer(Loop):
    """Runs a plan's stages in order, writing RUN/stage-N after each."""

    def __init__(self, plan: Plan | str | Path, run: Path, *, resume: bool = False, progress: bool = True,
                 log=print, tensorboard: bool | None = None) -> None:
        """``plan``: a :class:`Plan` (relative paths resolve against the current directory) or a plan
        file (TOML, or JSON such as a run's ``RUN/plan.json``; see :func:`load_plan`).
        ``tensorboard`` (when not None) overrides the plan's ``train.tensorboard``; the recorded plan
        leaves that setting out, so it never makes a resume "another plan".

        The run records the resolved plan in ``RUN/plan.json`` either way; ``RUN/plan.toml``, the
        file as given, only when the plan came from a TOML file. A run started from a Plan object
        resumes with ``growlm train RUN/plan.json --out RUN --resume``.
        """
        if isinstance(plan, Plan):
            self.plan_path: Path | None = None
            self.plan = resolve_plan(plan)
        else:
            self.plan_path = Path(plan)
            self.plan = load_plan(self.plan_path)
        # RUN/plan.toml keeps a TOML file's own text; a JSON plan file is in plan.json's own format
        from_toml = self.plan_path is not None and self.plan_path.suffix.lower() != ".json"
        self.plan_toml = self.plan_path if from_toml else None
        if tensorboard is not None:
            self.plan = self.plan.model_copy(update={"train": self.plan.train.model_copy(update={"tensorboard": tensorboard})})
        super().__init__(run, self.plan.train, resume=resume, progress=progress, log=log)
        self.plan_sha256 = hashlib.sha256(canonical_json(plan_to_json(self.plan))).hexdigest()

    def run_all(self) -> list[Path]:
        """Train every stage not yet complete; returns the stage dirs."""
        run = self.run
        check_batch_split(self.plan.train.batch_size, self.world)  # before any work
        if self.rank == 0:
            self._check_out()
        lock = run_lock(run) if self.rank == 0 else contextlib.nullcontext()
        with lock, stop_signals(self.world), contextlib.closing(self.metrics):
            if self.rank == 0:
                self._check_fresh_or_resumable()
                atomic_write_json(run / PLAN_JSON, plan_to_json(self.plan))
                if self.plan_toml is not None and (not (run / "plan.toml").is_file()
                                                   or not (run / "plan.toml").stat().st_size):
                    atomic_write_bytes(run / "plan.toml", self.plan_toml.read_bytes())
            # rank 0 builds the docking port; the other ranks load what it wrote
            tok = distributed.rank0_first(lambda: prepare_tokenizer(self.plan, run))
            sub = distributed.rank0_first(lambda: prepare_substrate(self.plan, run, tok))
            model, lineage = initial_model(self.plan, tok, sub)
            problem = blocks_problem(self.plan, len(model.blocks)) if self.plan.base is not None else None
            if problem:
                raise GrowlmError(f"plan {self.plan_path or '(built in Python)'}: {problem}")
            check_lora_budget(self.plan, model.cfg, len(model.blocks))
            check_plan_memory(self.plan, model.cfg, len(model.blocks), model.lora_records, self.device,
                              bf16=self.amp_dtype is not None, world=self.world)  # before any batch
            problem = phases_problem(self.plan, len(model.blocks), model.cfg.trainable_embedding, self.world)
            if problem:
                raise GrowlmError(problem)
            self.tokenizer, self.substrate = tok, sub
            todo = [(i, st) for i, st in enumerate(self.plan.stage, 1) if not stage_dir(run, i).exists()]
            for i, st in todo:  # every stage's data is read and checked before the first stage trains
                self._stage_data(i, st)
            dirs = []
            for i, st in enumerate(self.plan.stage, 1):
                sdir = stage_dir(run, i)
                if sdir.exists():
                    saved = load_model(sdir)
                    model, lineage = saved.model, saved.meta.lineage + [saved.meta.fingerprint]
                    self.log(f"stage {i}: complete, reusing {sdir}")
                else:
                    model, lineage = self.run_stage(i, st, model, lineage)
                distributed.barrier()  # every rank agrees the stage is complete before the next begins
                dirs.append(sdir)
                self.step_offset += read_meta(sdir).metrics.steps
            distributed.shutdown()
            return dirs

    def _trunk_cache(self, model: GrowLM, batches: Batches, depth: int, lineage: list[str], i: int) -> TrunkCache | None:
        """A trunk cache when this stage has a frozen trunk to skip (a grow stage, one process)."""
        if model.frozen_prefix() != depth or depth == 0 or not lineage or self.world > 1:
            self.log(f"stage {i}: trunk cache not used (it needs a grow stage over a frozen trunk, in one process)")
            return None
        return TrunkCache(self.run / "cache" / "trunk", lineage[-1], [s.n_sequences for s in batches.sources],
                          self.plan.model.context, self.plan.model.d_model, depth)

    def _check_out(self) -> None:
        """``--out`` must be a directory (or not exist yet) outside any model, mixture or run, with a name the
        printed resume command can carry (a newline in it would name another dir there)."""
        run = self.run
        if any(not c.isprintable() for c in str(run)):
            raise GrowlmError(f"--out {str(run)!r} holds a control character (a newline, say): a resume command "
                              f"could not name it; choose another name")
        if run.exists() and not run.is_dir():
            raise GrowlmError(f"--out {run} is a file, not a directory")
        check_out(run, run_itself=True)

    def _check_fresh_or_resumable(self) -> None:
        """Under the lock: a fresh run needs an empty ``--out``; ``--resume`` needs the run started with this
        very plan. Anything a failed start left behind counts as started."""
        run = self.run
        if not any(p.name != LOCK for p in run.iterdir()):
            return
        try:
            recorded = json.loads((run / PLAN_JSON).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GrowlmError(f"{run} is not empty and not a growlm run (no plan.json); choose another --out") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise GrowlmError(f"{run / 'plan.json'} is unreadable or corrupt: {e}") from None
        trained = bool(stages(run)) or (run / CHECKPOINTS).exists()
        mine = plan_to_json(self.plan)
        if recorded != mine:
            hint = "" if trained else " (no stage trained in it yet: remove it to start over with this plan)"
            raise GrowlmError(f"{run} holds a run of another plan ({run / 'plan.json'}); choose another --out{hint}")
        if not self.resume:
            raise GrowlmError(f"{run} already holds a run of this plan; pass --resume to continue it, or choose "
                              f"another --out")
        # RUN/plan.json is the user's to edit (and may be the plan file given): what the stages really trained
        # under is recorded in each finished stage and in the running stage's checkpoint
        change = "; a run has one plan: to change a stage, grow a new run from a finished one (base = ...)"
        for i, sdir in stages(run):
            theirs = read_meta(sdir).plan
            if theirs != mine:
                raise GrowlmError(f"stage-{i} was trained under another plan than {self.plan_path or 'this one'} "
                                  f"({plan_difference(theirs, mine)}){change}")
        for ck, digest in StageCheckpoints.recorded_plans(run).items():
            if digest is not None and digest != self.plan_sha256:
                raise GrowlmError(f"checkpoint {ck} was written under another plan than {self.plan_path or 'this one'}"
                                  f"{change}, or remove {ck.parent} to restart that stage under this plan")

    def _stage_data(self, i: int, st: StageSpec) -> tuple[Batches, list]:
        """A stage's training batches and fixed validation batches (token shards cached in the run)."""
        plan = self.plan
        sources, valid = stage_sources(plan, st)
        shards = self.run / "cache" / "shards"
        ctx, bs = plan.model.context, plan.train.batch_size
        batches = distributed.rank0_first(lambda: Batches(
            sources, self.tokenizer, context=ctx, batch_size=bs, seed=_seed(plan.train.seed, "data", i),
            cache_dir=shards, rank=self.rank, world_size=self.world))
        vbatches = distributed.rank0_first(lambda: validation_batches(
            valid, self.tokenizer, context=ctx, batch_size=bs, cache_dir=shards,
            max_batches=plan.train.eval_batches) if valid else [])
        return batches, vbatches

    def run_stage(self, i: int, st: StageSpec, model: GrowLM, lineage: list[str]) -> tuple[GrowLM, list[str]]:
        """Grow or stack (and/or attach LoRA), train phase by phase, and write the immutable RUN/stage-i."""
        plan, run, device = self.plan, self.run, self.device
        model.to(device)
        depth_before = len(model.blocks)
        if st.layers is not None:
            new = stack(model, st.layers)
        else:
            new = grow(model, st.grow, st.init, torch.Generator().manual_seed(_seed(plan.train.seed, "grow", i)))
        adapter = None
        if st.lora is not None:
            adapter, rank = f"stage{i}", st.lora.rank
            rec = add_lora(model, adapter, rank=rank, alpha=st.lora.alpha or 2.0 * rank,
                           blocks=lora_blocks(st.lora, depth_before, len(model.blocks)),
                           targets=list(st.lora.targets), generator_seed=_seed(plan.train.seed, "lora", i))
            model.lora_records.append(rec)  # peft puts adapters on their base layer's device
        earlier_lora = model.lora_records[:-1] if st.lora else model.lora_records
        phases = stage_phases(st, depth_before, model.cfg.trainable_embedding)
        several = len(phases) > 1
        total = model.param_counts()["params_total"]
        active = stage_active_params(model.cfg, st, depth_before, model.cfg.trainable_embedding)
        built = (f"stack {st.layers}" if st.layers is not None else f"grow {st.grow} ({st.init})" if st.grow
                 else "no growth")
        what = built + (f", train {st.train}" if st.train != "new" else "") \
            + (f", LoRA r{st.lora.rank} on {len(model.lora_records[-1]['blocks'])} blocks" if st.lora else "")
        self.log(f"stage {i}/{len(plan.stage)}: {what} | depth {len(model.blocks)} | active {active:,} | "
                 f"frozen {total - active:,} | total {total:,}")

        batches, vbatches = self._stage_data(i, st)  # one stream for the whole stage: each phase continues it
        start = audit.digests(model.named_parameters()) if several else None
        hint = shlex.join(["growlm", "train", str(self.plan_path or run / "plan.json"), "--out", str(run), "--resume"])
        offset0, spent, declared_all, done = self.step_offset, PhaseOffsets(), set(), []
        for k, ph in enumerate(phases, 1):
            # after any LoRA injection, which freezes every parameter that is not an adapter
            declared = set_trainable(model, st, new, adapter, trains=ph.trains)
            live = sum(p.numel() for p in model.parameters() if p.requires_grad)
            expected = phase_active_params(model.cfg, st, ph, depth_before)
            if live != expected:  # the LoRA budget was checked against `expected` before training
                raise GrowlmError(f"stage {i}: {live:,} parameters are set to train but the plan's stage trains "
                                  f"{expected:,}; nothing was trained")
            if several:
                self.log(f"stage {i} phase {k}/{len(phases)} ({ph.name}): {ph.tokens:,} tokens, active {live:,}")
            n_steps = math.ceil(ph.tokens / batches.tokens_per_batch)
            trunk = self._trunk_cache(model, batches, depth_before, lineage, i) \
                if plan.train.trunk_cache and st.layers is None else None
            fpt = phase_flop_per_token(model.cfg, st, ph, depth_before, earlier_lora)
            self.step_offset = offset0 + spent.steps
            state = self.fit(f"stage-{i}-phase-{k}" if several else f"stage-{i}", model, batches, vbatches,
                             n_steps=n_steps, lr=st.lr or plan.train.lr, stage=i, resume_hint=hint, declared=declared,
                             trunk_cache=trunk, flop_per_token=fpt, phase=k if several else None,
                             before=spent,
                             keep_final=k < len(phases))
            if trunk is not None:
                self.log(f"stage {i}: trunk cache served {trunk.hits:,} sequences, computed {trunk.misses:,}")
            phase_flops = fpt * state.tokens
            spent = spent.plus(state, phase_flops)
            declared_all |= declared
            done.append({"name": ph.name, "tokens": ph.tokens, "steps": n_steps,
                         "trains": {"blocks": list(ph.trains.blocks), "head": ph.trains.head,
                                    "embedding": ph.trains.embedding},
                         "metrics": _metrics(state, round(phase_flops)), "audit": state.audit})
        self.step_offset = offset0
        stage_audit = state.audit if not several else audit.audit(start, audit.digests(model.named_parameters()),
                                                                  declared_all, spent.steps, f"stage-{i}")

        sharded = self.world > 1 and plan.train.parallel == "fsdp"
        if sharded:  # gather the shards (every rank), then save an ordinary copy
            full = distributed.gathered_state(model)
            model = _plain_copy(model, full) if self.rank == 0 else model
        else:
            model.to("cpu")
        record = {"index": i, "name": st.name, "grow": st.grow, "init": st.init, "train": st.train,
                  "lora": st.lora.model_dump() if st.lora else None, "adapter": adapter, "tokens": st.tokens,
                  "steps": sum(p["steps"] for p in done), "new_blocks": new}
        record.update(_kind_settings(st))
        if several:
            record["phases"] = done
        extra = {
            "plan": plan_to_json(plan),
            "stage": record,
            "metrics": {**_metrics(state, round(spent.flops)), "tokens": spent.tokens,
                        "wall_s": round(spent.wall_s, 3), "steps": spent.steps},
            "params_active": active,
            "audit": stage_audit,
        }
        sdir = stage_dir(run, i)
        substrate = {"kind": self.substrate.kind, "fingerprint": self.substrate.fingerprint, "recipe": self.substrate.recipe}
        if self.rank == 0:
            meta = save_model(model, sdir, tokenizer_dir=run / "tokenizer", extra=extra, lineage=lineage,
                              substrate=substrate)
            for k in range(1, len(phases) + 1):
                StageCheckpoints(run, f"stage-{i}-phase-{k}" if several else f"stage-{i}").discard()
        distributed.barrier()
        if self.rank != 0:
            meta = read_meta(sdir)  # written by rank 0 before the barrier
        if sharded:  # the next stage grows an ordinary model; every rank starts it from the saved stage
            model = load_model(sdir).model
        vl = f"{state.valid_loss:.4f}" if state.valid_loss is not None else "n/a"
        au = stage_audit
        self.log(f"stage {i} done: {spent.steps} steps, {spent.tokens:,} tokens, train loss {state.last_loss:.4f}, "
                 f"valid loss {vl}, {spent.wall_s:.1f} s; audit: {au['trained_tensors']} tensors trained "
                 f"({', '.join(au['trained'])}), {au['frozen_tensors']} unchanged -> {sdir}")
        return model, lineage + [meta.fingerprint]


def _metrics(state: StageState, flops: int) -> dict:
    """What a fit measured, as model.json records it (for a stage, or for one of its phases)."""
    return {"train_loss": state.last_loss, "valid_loss": state.valid_loss, "tokens": state.tokens,
            "wall_s": round(state.wall_s, 3), "steps": state.step, "flops": flops}


def _kind_settings(st: StageSpec) -> dict:
    """The stage's settings that only some stages have (``layers``, a kind's own keys), where it has them."""
    keys = ("layers", *stage_kind(st.train).keys)
    return {k: getattr(st, k) for k in keys if getattr(st, k, None) is not None}


def _plain_copy(model: GrowLM, state: dict[str, torch.Tensor]) -> GrowLM:
    """An ordinary (unsharded) copy of ``model`` holding ``state``, LoRA adapters included."""
    from growlm.lora import attach_adapters

    plain = GrowLM(ModelConfig.from_dict({**model.cfg.to_dict(), "n_layers": len(model.blocks)}))
    if model.lora_records:
        attach_adapters(plain, model.lora_records, {k: v for k, v in state.items() if ".lora_" in k})
        plain.lora_records = list(model.lora_records)
    plain.load_state_dict(state, strict=True)
    return plain


def train(plan: Plan | str | Path, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print, tensorboard: bool | None = None) -> list[Path]:
    """Run a plan, a :class:`Plan` or a plan file (the ``growlm train`` command); returns the stage dirs.
    ``log`` receives each progress line (stage starts, losses, where each stage was saved);
    ``tensorboard`` (when not None) overrides the plan's ``train.tensorboard`` (scalars in RUN/tensorboard)."""
    return Trainer(plan, Path(out), resume=resume, progress=progress, log=log, tensorboard=tensorboard).run_all()
