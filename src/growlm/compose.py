"""Modular composition: specialists grown over one substrate merge into a mixture (paper §5).

Experts that share the frozen substrate and the tokenizer (the "docking port") speak the same
token ids, so the j-th logit means the same token in every one of them and their outputs can be
combined without any training. A mixture dir is immutable and self-contained; its files are
written, read back and checked by :mod:`growlm.store.mixture` (the layout is in :mod:`growlm.store`).

Combine rules, over expert logits ``l_i``:

* ``mean-logits``: ``mean_i l_i`` (the paper; a geometric mean of the distributions, "AND")
* ``mean-probs``:  ``log mean_i softmax(l_i)`` (Branch-Train-Merge's mixture, "OR")
* ``weighted``:    fixed weights summing to 1, in logit space or probability space
* ``router``:      per-token weights ``softmax(W·[h_1; ...; h_N] + b)`` from the experts' final
  hidden states, in either space; trained on mixed data with the experts frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from growlm.errors import GrowlmError
from growlm.files import atomic_dir, remove_stale_temp_dirs, scratch_dir
from growlm.hashing import sha256_file
from growlm.loading import check_port, load_model, port_difference
from growlm.mixture import Mixture, Router, is_head
from growlm.plan import TrainSpec
from growlm.rules import RULES, Rule, make_rule
from growlm.store.mixture import (
    HEADS,
    MIXTURE_JSON,
    ROUTER,
    expert_path,
    info_mixture,
    read_desc,
    verified_experts,
    write_desc,
    write_experts,
    write_tensors,
)
from growlm.store.model import TOKENIZER_DIR, ModelDir, read_meta, verify_files

if TYPE_CHECKING:  # growlm.training imports the data pipeline; only the tuning stages need it
    from growlm.training import Loop


# ----------------------------------------------------------------------------------------------
# Reading inputs and checking the docking port


def _expand(inputs: Sequence[Path]) -> list[ModelDir]:
    """Expert dirs from the inputs: a model dir is one expert, a (verified) mixture dir its experts."""
    out = []
    for p in map(Path, inputs):
        if (p / MIXTURE_JSON).is_file():
            out += verified_experts(p)
        else:
            out.append(ModelDir(p, read_meta(p)))
    if len(out) < 2:
        raise GrowlmError(f"a mixture needs at least two experts, got {len(out)}")
    return out


def _check_port(experts: list[ModelDir]) -> None:
    """Refuse experts whose substrate or tokenizer differs from the first expert's.

    Each expert's recorded fingerprints are first checked against its own tokenizer and embedding
    (recomputed), so an edited model.json cannot pass two different ports off as one.
    """
    for e in experts:
        _, problems = check_port(e.path, e.meta)
        if problems:
            raise GrowlmError(f"cannot merge: {problems[0]}")
    ref = experts[0]
    for e in experts[1:]:
        differ = port_difference(_port(e.meta), _port(ref.meta))
        if differ:
            what, theirs, mine = differ
            raise GrowlmError(f"cannot merge: {e.path} has {what} fingerprint {theirs[:12]} but {ref.path} has "
                              f"{mine[:12]}; experts must share the substrate and tokenizer")


def _port(meta) -> tuple[str, str]:
    return meta.substrate_fingerprint, meta.tokenizer_fingerprint


# ----------------------------------------------------------------------------------------------
# Post-merge training (beyond the paper): stages of the one training loop


@dataclass
class Tuning:
    """What to train after merging, on ``data`` (mixed text files), with the experts' blocks frozen.

    ``router``: learn a per-token gate (starting exactly at the requested fixed rule).
    ``head``: tune the experts' output layers (final norm + LM head) under the combined loss, the
    paper's post-merge step; the tuned tensors go to heads.safetensors, the expert copies stay as
    they were. Both: the router trains first, then the heads under it. ``spec`` sets the batch
    size, checkpoint cadence and device (default: ``TrainSpec(lr=lr, compile=False)``).
    """

    data: list[Path]
    router: bool = False
    head: bool = False
    tokens: int = 32768
    lr: float = 1e-3
    spec: TrainSpec | None = None
    progress: bool = False

    def check(self) -> None:
        """Refuse a request that cannot train, before anything is written."""
        if not (self.router or self.head):
            raise GrowlmError("post-merge training needs router and/or head")
        if not self.data:
            raise GrowlmError("--router/--finetune-head need --data FILE... (a little mixed text)")
        for f in map(Path, self.data):
            if not f.is_file():
                raise GrowlmError(f"training data file not found: {f}")
        if self.tokens <= 0 or not self.lr > 0:
            raise GrowlmError(f"tokens and lr must be positive, got tokens={self.tokens}, lr={self.lr}")


def _tune_stage(loop: Loop, mixture: Mixture, tok, tuning: Tuning, kind: str, index: int, work: Path) -> dict:
    """Train the router or the heads of ``mixture`` for ``tuning.tokens`` tokens; returns a record."""
    from growlm.data import Batches, Source, validation_batches
    from growlm.training import evaluate_loss

    declared = {n for n, _ in mixture.named_parameters() if (n.startswith("router.") if kind == "router" else is_head(n))}
    for name, p in mixture.named_parameters():
        p.requires_grad_(name in declared)
    spec = loop.spec
    data = [Path(p) for p in tuning.data]
    cache = work / "cache"
    ctx = mixture.cfg.context
    batches = Batches([Source(paths=[p], weight=1.0) for p in data], tok, context=ctx,
                      batch_size=spec.batch_size, seed=spec.seed, cache_dir=cache)
    # a fixed sample of the tuning text, scored before and after: the stage's own yardstick
    fixed = validation_batches(data, tok, context=ctx, batch_size=spec.batch_size, cache_dir=cache,
                               max_batches=spec.eval_batches)
    before = evaluate_loss(mixture, fixed, loop.device, loop.autocast())
    n_steps = math.ceil(tuning.tokens / batches.tokens_per_batch)
    state = loop.fit(kind, mixture, batches, fixed, n_steps=n_steps, lr=tuning.lr, stage=index,
                     resume_hint="run the merge again (post-merge stages do not resume)", declared=declared)
    for p in mixture.parameters():
        p.requires_grad_(False)
    return {"stage": kind, "tokens": state.tokens, "steps": state.step, "lr": tuning.lr,
            "loss_before": before, "loss_after": state.valid_loss, "train_loss": state.last_loss,
            "wall_s": round(state.wall_s, 3), "audit": {k: v for k, v in state.audit.items() if k != "start_sha256"},
            "data": [{"name": p.name, "sha256": sha256_file(p)} for p in data]}


def _tune(root: Path, n: int, rule: Rule, tuning: Tuning, out: Path
          ) -> tuple[Rule, dict | None, dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Run the post-merge stages on the mixture being built in ``root`` (to become ``out``).

    Returns the final rule, the router description, the tensors to store (file -> tensors) and
    the stage records. The loop's run dir (checkpoints, metrics) is a scratch dir beside ``out``.
    """
    from growlm.tokenizer import Tokenizer
    from growlm.training import Loop

    models = [load_model(root / expert_path(i), verify=False).model for i in range(n)]
    router_desc = None
    if tuning.router:
        in_features = sum(m.cfg.d_model for m in models)
        router_desc = {"in_features": in_features, "prior": rule.prior(len(models)), "from": rule.combine}
        rule = Rule("router", rule.space, None)
        mixture = Mixture(models, rule, Router(in_features, router_desc["prior"]))
    else:
        mixture = Mixture(models, rule)
    for p in mixture.parameters():
        p.requires_grad_(False)
    tok = Tokenizer.load(root / TOKENIZER_DIR)
    # no torch.compile: the router's feature hooks are registered per call
    spec = tuning.spec or TrainSpec(lr=tuning.lr, compile=False)
    stages = [k for k, on in (("router", tuning.router), ("head", tuning.head)) if on]
    with scratch_dir(out.parent, _train_dir_name(out)) as work:
        loop = Loop(work, spec, progress=tuning.progress)
        mixture.to(loop.device)
        records = [_tune_stage(loop, mixture, tok, tuning, k, i, work) for i, k in enumerate(stages, 1)]
    mixture.to("cpu")
    stored = {}
    if tuning.router:
        stored[ROUTER] = mixture.router_state()
    if tuning.head:
        stored[HEADS] = mixture.head_state()
    write_tensors(root, stored)
    return rule, router_desc, stored, records


# ----------------------------------------------------------------------------------------------
# Merge, load, describe


def merge(experts: Sequence[Path], out: Path, *, combine: str = "mean-logits", weights: Sequence[float] | None = None,
          space: str = "logits", tuning: Tuning | None = None) -> Path:
    """Build the mixture dir ``out`` from N >= 2 experts (model dirs, or mixture dirs: their experts).

    Everything is checked before anything is written: the docking port (identical substrate and
    tokenizer fingerprints), the rule and weights, every expert file's checksum. The experts are
    copied byte for byte; with ``tuning`` the post-merge stages train before the dir appears.
    The dir appears atomically, complete, or not at all.
    """
    out = Path(out)
    if out.exists():
        raise GrowlmError(f"refusing to overwrite existing {out}")
    _check_apart(experts, out)
    sources = _expand(experts)
    rule = make_rule(combine, len(sources), weights, space)
    if tuning is not None:
        tuning.check()
        if tuning.router and len({s.meta.fingerprint for s in sources}) == 1:
            raise GrowlmError("--router needs experts that differ: these are all the same model "
                              f"(fingerprint {sources[0].meta.fingerprint[:12]}), so no gate could learn anything")
    for s in sources:
        verify_files(s.path, s.meta)
    _check_port(sources)
    remove_stale_temp_dirs(out.parent / _train_dir_name(out))  # a killed tuning merge's, even if this one trains nothing
    with atomic_dir(out) as tmp:
        write_experts(tmp, sources)
        router_desc, stored, records = None, {}, []
        if tuning is not None:
            rule, router_desc, stored, records = _tune(tmp, len(sources), rule, tuning, out)
        write_desc(tmp, rule.to_json(), sources, router_desc, stored, records)
    return out


def add_expert(mixture_dir: Path, expert_dir: Path, out: Path, *, combine: str | None = None,
               weights: Sequence[float] | None = None, space: str | None = None) -> Path:
    """Continual learning: a new mixture ``out`` = the experts of ``mixture_dir`` + ``expert_dir``.

    The old mixture is only read; its experts are copied byte for byte. The rule defaults to the
    old one when that is a parameter-free mean; a weighted or routed mixture needs ``combine``
    (its weights or gate cannot cover a new expert). Tuned heads are not carried over.
    """
    desc = read_desc(Path(mixture_dir))
    if combine is None:
        if not RULES.get(desc.combine).extends:
            raise GrowlmError(f"{mixture_dir} combines with {desc.combine!r}, which does not extend to a new "
                              f"expert; choose the new mixture's combine rule")
        combine = desc.combine
    return merge([mixture_dir, expert_dir], out, combine=combine, weights=weights, space=space or desc.space)


def _train_dir_name(out: Path) -> str:
    return f"merge-train.{out.name}"


def _check_apart(inputs: Sequence[Path], out: Path) -> None:
    """Refuse an output inside (or equal to) an input, or an input inside the output: copying an
    expert into itself would recurse until the path is too long."""
    target = out.resolve()
    for p in map(Path, inputs):
        src = p.resolve()
        if target == src or target.is_relative_to(src):
            raise GrowlmError(f"--out {out} lies inside the input {p}; write the mixture somewhere else")
        if src.is_relative_to(target):
            raise GrowlmError(f"the input {p} lies inside --out {out}; write the mixture somewhere else")


def merge_summary(path: Path) -> str:
    """One line describing the mixture dir ``path``: its rule, post-merge training, fingerprint and size
    (what ``growlm merge`` prints)."""
    info = info_mixture(path)
    spaces = RULES[info["combine"]].spaces  # a rule that acts in one space only needs no mention of it
    rule = info["combine"] + (f" in {info['space']} space" if len(spaces) > 1 else "")
    tuned = "".join(f"; {r.stage} {r.loss_before:.4f} -> {r.loss_after:.4f} on {r.tokens:,} tokens"
                    for r in read_desc(path).tuning)
    return (f"merged {info['n_experts']} experts ({rule}{tuned}) -> {path} "
            f"(fingerprint {info['fingerprint'][:12]}, {info['params_total']:,} params)")
