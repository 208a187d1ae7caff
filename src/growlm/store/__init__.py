"""The on-disk store: the one owner of every format growlm writes. What a path holds (model,
mixture or run), a run's stages, a stage's resumable training state, and the atomic writes and
checks behind them; every other module asks here instead of testing file names itself.

A model dir (:mod:`growlm.store.model`) is immutable once written and self-contained::

    DIR/model.json            config, substrate/tokenizer fingerprints, per-block sha256, file checksums,
                              fingerprint, lineage, params, plan/stage/metrics when it came from a run
    DIR/model.safetensors     base weights (embed.weight, blocks.N.*, ln_f.*, head.weight)
    DIR/adapters.safetensors  LoRA tensors, kept apart from the untouched base blocks (optional)
    DIR/tokenizer/            the tokenizer it speaks

A mixture dir (:mod:`growlm.store.mixture`) is immutable and self-contained too::

    OUT/mixture.json          format, combine rule, weights, experts' fingerprints, docking-port
                              fingerprints, checksums of every other file, own fingerprint, tuning
    OUT/experts/0/, 1/, ...   byte-identical copies of the expert model dirs (never modified)
    OUT/tokenizer/            the shared tokenizer
    OUT/router.safetensors    the trained per-token gate (combine = "router"; optional)
    OUT/heads.safetensors     post-merge tuned output layers, replacing the experts' (optional)

A run dir (:mod:`growlm.store.run`)::

    RUN/plan.toml, RUN/plan.json      the plan as given (when given as a TOML file), and resolved
    RUN/tokenizer/, RUN/substrate/    the docking port, built once (or copied from the plan's dirs)
    RUN/stage-N/                      immutable model dir after stage N
    RUN/checkpoints/<key>/step-S/     in-stage checkpoint: trainable.safetensors, optimizer.safetensors,
                                      rng.safetensors and state.json (their sha256, data position, counters)
    RUN/metrics.jsonl                 one JSON line per logged step
    RUN/.lock                         held while a process writes the run

Every file and dir appears by an atomic rename (:mod:`growlm.files`), so a crash, a kill or
a full disk never leaves a half-written artefact that looks valid.
"""

from __future__ import annotations

from growlm.store.mixture import MixtureDir
from growlm.store.model import ModelDir
from growlm.store.run import (
    CHECKPOINT_FILES,
    CHECKPOINTS,
    LOCK,
    METRICS,
    PLAN_JSON,
    MetricsLog,
    RunDir,
    StageCheckpoints,
    StageState,
    check_out,
    is_run,
    resolve,
    stage_dir,
    stages,
)

__all__ = ["CHECKPOINTS", "CHECKPOINT_FILES", "LOCK", "METRICS", "PLAN_JSON", "MetricsLog", "MixtureDir", "ModelDir",
           "RunDir", "StageCheckpoints", "StageState", "check_out", "is_run", "resolve", "stage_dir", "stages"]
