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
import torch.nn as nn
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.files import atomic_dir, remove_stale_temp_dirs, scratch_dir
from growlm.hashing import sha256_file
from growlm.model import GrowLM, KVCache
from growlm.plan import TrainSpec
from growlm.rules import RULES, Rule, make_rule
from growlm.store.mixture import (
    HEADS,
    MIXTURE_JSON,
    ROUTER,
    expert_path,
    info_mixture,
    read_desc,
    read_tensors,
    read_tokenizer,
    verified_experts,
    verify_dir,
    write_desc,
    write_experts,
    write_tensors,
)
from growlm.store.model import TOKENIZER_DIR, ModelDir, check_port, load_model, read_meta, verify_files

if TYPE_CHECKING:  # growlm.training imports the data pipeline; only the tuning stages need it
    from growlm.tokenizer import Tokenizer
    from growlm.training import Loop

# the lowest prior a router starts from: log(0) would freeze an expert out of the gate for good
_MIN_PRIOR = 1e-4


# ----------------------------------------------------------------------------------------------
# The module


@dataclass
class MixtureConfig:
    """What :func:`growlm.model.generate` and the evaluators read from a model's ``cfg``."""

    n_experts: int
    vocab_size: int
    context: int


class MixtureCache:
    """One KV cache per expert, advanced together; ``pos`` is the shared position."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.pos = 0


class Router(nn.Module):
    """Per-token gate: a Linear from the experts' concatenated final hidden states to N weights.

    Zero weights and ``log(prior)`` biases make it start exactly at the fixed rule it replaces,
    so training can only move away from the merge it improves on.
    """

    def __init__(self, in_features: int, prior: Sequence[float]) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, len(prior))
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.copy_(torch.tensor([max(p, _MIN_PRIOR) for p in prior]).log())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate weights ``[N, B, T]`` from hidden states ``[B, T, sum d_i]``."""
        return torch.softmax(self.proj(hidden).float(), dim=-1).permute(2, 0, 1)


class Mixture(nn.Module):
    """N experts over one substrate, combined per :class:`Rule` (or a trained :class:`Router`)."""

    def __init__(self, experts: Sequence[GrowLM], rule: Rule, router: Router | None = None) -> None:
        super().__init__()
        if len(experts) < 2:
            raise GrowlmError(f"a mixture needs at least two experts, got {len(experts)}")
        self.kind = rule.kind
        if self.kind.trained != (router is not None):
            raise GrowlmError(f"combine {rule.combine!r} and the presence of a router disagree")
        self.experts = nn.ModuleList(experts)
        self.rule = rule
        self.router = router
        vocab = {e.cfg.vocab_size for e in experts}
        if len(vocab) != 1:
            raise GrowlmError(f"experts disagree on the vocabulary size: {sorted(vocab)}")
        self.cfg = MixtureConfig(len(experts), vocab.pop(), min(e.cfg.context for e in experts))
        # a buffer, so .to(device) moves the fixed weights with the experts
        fixed = self.kind.fixed_weights(rule, len(experts))
        w = torch.tensor(fixed, dtype=torch.float32) if fixed is not None else None
        self.register_buffer("weights", w, persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: MixtureCache | None = None) -> torch.Tensor:
        """Combined logits ``[B, T, V]``, or the mean cross-entropy of the combined distribution."""
        caches = cache.caches if cache is not None else [None] * len(self.experts)
        logits = (e(idx, cache=c) for e, c in zip(self.experts, caches, strict=True))
        if self.router is None:
            out = self.kind.combine(logits, self.weights, self.rule.space, reuse_inputs=True)
        else:  # the gate needs every expert's final hidden state before any logits can be weighted
            hidden: list[torch.Tensor] = []
            hooks = [e.ln_f.register_forward_hook(lambda _m, _i, h: hidden.append(h)) for e in self.experts]
            try:
                logits = list(logits)
            finally:
                for h in hooks:
                    h.remove()
            out = self.kind.combine(logits, self.router(torch.cat(hidden, dim=-1)), self.rule.space,
                                    reuse_inputs=True)
        if cache is not None:
            cache.pos += idx.shape[1]
        if targets is None:
            return out
        return F.cross_entropy(out.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def make_cache(self, batch: int, max_len: int) -> MixtureCache:
        """A cache holding one KV cache per expert (so generation is cached for every expert)."""
        return MixtureCache([e.make_cache(batch, max_len) for e in self.experts])

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See :func:`growlm.model.generate`."""
        from growlm.model import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The experts' output layers (final norm + LM head), under the mixture's tensor names."""
        return {k: v for k, v in self.state_dict().items() if _is_head(k)}

    def router_state(self) -> dict[str, torch.Tensor]:
        """The gate's tensors (empty without a router)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("router.")}


def _is_head(name: str) -> bool:
    return name.startswith("experts.") and (".head." in name or ".ln_f." in name)


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
        for what in ("substrate", "tokenizer"):
            key = f"{what}_fingerprint"
            if getattr(e.meta, key) != getattr(ref.meta, key):
                raise GrowlmError(f"cannot merge: {e.path} has {what} fingerprint {getattr(e.meta, key)[:12]} but "
                                  f"{ref.path} has {getattr(ref.meta, key)[:12]}; experts must share the substrate and "
                                  f"tokenizer")


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

    declared = {n for n, _ in mixture.named_parameters() if (n.startswith("router.") if kind == "router" else _is_head(n))}
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


def load_mixture(path: Path, device: str | torch.device = "cpu") -> tuple[Mixture, Tokenizer]:
    """Load and fully verify a mixture dir; returns ``(Mixture, Tokenizer)``.

    Refuses a tampered dir: every file's checksum, every expert's fingerprint, the docking port,
    the tokenizer and the mixture's own fingerprint are checked before it is returned.
    """
    path = Path(path)
    desc = verify_dir(path)
    models = [load_model(path / e.path, verify=False).model for e in desc.experts]
    rule = Rule(desc.combine, desc.space, tuple(desc.weights) if desc.weights is not None else None)
    router = None
    if rule.kind.trained:  # its per-token weights come from the router stored beside the experts
        if ROUTER not in desc.tensors or desc.router is None:
            raise GrowlmError(f"mixture {path} combines with a router but stores none")
        router = Router(desc.router.in_features, desc.router.prior)
    mixture = Mixture(models, rule, router)
    mixture.load_state_dict(read_tensors(path, desc, {*mixture.router_state(), *mixture.head_state()}), strict=False)
    tok = read_tokenizer(path, desc)
    for p in mixture.parameters():
        p.requires_grad_(False)
    return mixture.to(device).eval(), tok


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
