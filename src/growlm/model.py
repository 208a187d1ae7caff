"""The paper's decoder: a GPT-style Transformer on top of a frozen token substrate.

Pre-LN blocks with biased QKV and output projections, a GELU FFN of 4·d, rotary position
embeddings (GPT-NeoX "rotate half" convention, full head dim), a final LayerNorm and an LM head
untied from the input embedding. The input embedding *is* the substrate: a [V, k] table lifted to
d_model by ``repeat_interleave(d_model // k)``; it receives no gradient unless its kind is
``trainable``. These choices reproduce every parameter count the paper publishes and match
``GPTNeoXForCausalLM(use_parallel_residual=False)`` tensor for tensor (see ``interop.py``).

Frozen-trunk fast path: when gradients are enabled, the leading blocks that hold no trainable
parameter run under ``torch.no_grad()``; autograd only records the trainable top of the stack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from growlm.errors import GrowlmError


@dataclass
class ModelConfig:
    """Shape of a growlm decoder. ``embed_dim`` is the substrate table's width k (d_model // lift)."""

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int = 0
    context: int = 1024
    embed_dim: int | None = None
    trainable_embedding: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.embed_dim is None:
            self.embed_dim = self.d_model
        for name in ("vocab_size", "d_model", "n_heads", "context", "embed_dim"):
            if getattr(self, name) <= 0:
                raise GrowlmError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_layers < 0:
            raise GrowlmError(f"model.n_layers must be >= 0, got {self.n_layers}")
        if self.d_model % self.n_heads:
            raise GrowlmError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise GrowlmError(f"model head size d_model/n_heads={self.d_model // self.n_heads} must be even for rotary embeddings")
        if self.d_model % self.embed_dim:
            raise GrowlmError(f"model.d_model={self.d_model} is not a multiple of the substrate width {self.embed_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def lift(self) -> int:
        return self.d_model // self.embed_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GrowlmError(f"unknown model config key(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Building blocks


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for the given positions (GPT-NeoX layout: two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, hd] by the position tables (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer, filled as generation advances."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise GrowlmError(f"KV cache overflow: {end} positions > {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=True)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after a prefix: causal mask aligned to the bottom-right
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=True)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cos, sin, cache, layer)
        return x + self.mlp(self.ln2(x))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, std) weights, zero biases, unit LayerNorms (seeded for reproducible growth)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std, generator=generator)
                m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


class SubstrateEmbedding(nn.Module):
    """The token interface: a [V, k] table lifted to d_model by repeating each column d_model // k times."""

    def __init__(self, vocab_size: int, width: int, lift: int, trainable: bool) -> None:
        super().__init__()
        self.lift = lift
        self.weight = nn.Parameter(torch.zeros(vocab_size, width), requires_grad=trainable)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx, self.weight)
        return x.repeat_interleave(self.lift, dim=-1) if self.lift > 1 else x


# ----------------------------------------------------------------------------------------------
# The model


class GrowLM(nn.Module):
    """Decoder over a frozen substrate; blocks are stacked on top by ``growth.grow``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = SubstrateEmbedding(cfg.vocab_size, cfg.embed_dim, cfg.lift, cfg.trainable_embedding)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # LoRA stages applied to this model, oldest first (see lora.py); saved in model.json
        self.lora_records: list[dict] = []
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # derived, never saved

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def frozen_prefix(self) -> int:
        """How many leading blocks hold no trainable parameter (0 when the embedding itself trains)."""
        if self.embed.weight.requires_grad:
            return 0
        n = 0
        for blk in self.blocks:
            if any(p.requires_grad for p in blk.parameters()):
                break
            n += 1
        return n

    def trunk(self, idx: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Activations after the first ``n`` blocks (default: the frozen prefix), without autograd."""
        n = self.frozen_prefix() if n is None else n
        cos, sin = self._rope(0, idx.shape[1], idx.device)
        with torch.no_grad():
            x = self.embed(idx)
            for i in range(n):
                x = self.blocks[i](x, cos, sin, None, i)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                trunk: torch.Tensor | None = None, trunk_depth: int | None = None) -> torch.Tensor:
        """Logits [B, T, V], or the mean cross-entropy when ``targets`` is given.

        ``trunk`` replaces the embedding and the first ``trunk_depth`` blocks with precomputed
        activations (the trunk-activation cache of a grow stage).
        """
        pos = cache.pos if cache is not None else 0
        T = idx.shape[1] if trunk is None else trunk.shape[1]
        cos, sin = self._rope(pos, T, idx.device if trunk is None else trunk.device)
        if trunk is not None:
            x, start = trunk, (self.frozen_prefix() if trunk_depth is None else trunk_depth)
        else:
            start = self.frozen_prefix() if (torch.is_grad_enabled() and cache is None) else 0
            with torch.no_grad() if start else contextlib.nullcontext():
                x = self.embed(idx)
                for i in range(start):
                    x = self.blocks[i](x, cos, sin, cache, i)
        for i in range(start, len(self.blocks)):
            x = self.blocks[i](x, cos, sin, cache, i)
        x = self.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return self.head(x)
        return chunked_cross_entropy(x, self.head.weight, targets)

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions [start, start + length), from tables computed once per device."""
        end = start + length
        cached = self._rope_cache
        if cached is None or cached[0].device != device or cached[0].shape[0] < end:
            n = max(end, self.cfg.context)
            cached = rope_tables(self.cfg.head_dim, torch.arange(n, device=device), self.cfg.rope_theta)
            self._rope_cache = cached
        return cached[0][start:end], cached[1][start:end]

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.head.weight
        return KVCache(len(self.blocks), batch, self.cfg.n_heads, self.cfg.head_dim, max_len, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See :func:`generate`."""
        return generate(self, idx, max_new_tokens, **kwargs)

    def param_counts(self) -> dict[str, int]:
        """Total, trainable-in-principle (all but a frozen substrate) and currently active parameters."""
        total = sum(p.numel() for p in self.parameters())
        substrate = self.embed.weight.numel()
        trainable = total - (0 if self.cfg.trainable_embedding else substrate)
        active = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"params_total": total, "params_trainable": trainable, "params_active": active}


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """``torch.compile`` every transformer block inside ``model`` in place while the context is open.

    Per block, as torchtitan does: blocks share their compiled graphs (one per kind: trainable, frozen,
    with LoRA), so compile time stays flat with depth and across a plan's stages, where a whole-model
    graph would be recompiled for every new depth. On exit the blocks are eager again, so evaluation,
    KV-cached generation and the next stage's growth see a plain model.
    """
    blocks = [m for m in model.modules() if isinstance(m, Block)] if enabled else []
    if blocks:
        torch._dynamo.reset()  # a fresh recompile budget: a long plan would otherwise exhaust it and run eager
    for blk in blocks:
        blk.compile()
    try:
        yield
    finally:
        for blk in blocks:
            blk._compiled_call_impl = None  # what Module.compile() set; torch has no public undo


# torch's chunked linear cross-entropy, where this torch has it (2.13 on); None selects the fallback
_LINEAR_CE_OPTIONS = getattr(nn, "LinearCrossEntropyOptions", None)
# rows per chunk of torch's op on CPU: its own pick for fp32 there is a few dozen rows, slower than the plain loss,
# while 512-row chunks were 1.1-2.2x faster than the plain loss from 512 to 8,192 rows (bench/NOTES.md #12)
_LINEAR_CE_CPU_CHUNK = 512
# the most rows whose logits are computed at once where torch's op does not apply (or is unmeasured)
LOSS_CHUNK_ROWS = 8192


def chunked_cross_entropy(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy of ``x @ head_weight.T`` against ``targets``.

    For a 65,536-wide head the full logits of a batch are gigabytes, so they are made a chunk at a
    time. Outside autocast, torch's chunked ``linear_cross_entropy`` (torch >= 2.13) computes the
    gradients during the forward, so nothing is recomputed: on CPU from one chunk of 512 rows on, elsewhere
    beyond 8,192 rows with torch's own chunk size. Otherwise up to 8,192 rows are computed at once and larger
    batches are checkpointed chunk by chunk (the backward recomputes each chunk's logits). ``chunk_rows``
    overrides the rows per chunk of whichever path runs.
    """
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    rows = x2.shape[0]
    if _LINEAR_CE_OPTIONS is not None and not torch.is_autocast_enabled(x2.device.type):
        # None: torch's own chunk size, and only where the plain path would chunk (off CPU it is unmeasured here)
        chunk = chunk_rows or (_LINEAR_CE_CPU_CHUNK if x2.device.type == "cpu" else None)
        if rows >= (chunk or LOSS_CHUNK_ROWS + 1):
            options = _LINEAR_CE_OPTIONS() if chunk is None else _LINEAR_CE_OPTIONS(chunking_method=None,
                                                                                     batch_chunk_size=chunk)
            return F.linear_cross_entropy(x2, head_weight, t2, ignore_index=ignore_index, options=options).float()
    # torch's op returns the loss in its inputs' dtype: in bf16 about 1% off, too coarse for the perplexities
    # we report, and fp32 inputs would give up bf16's matmul speed, so autocast keeps our own paths
    chunk = chunk_rows or LOSS_CHUNK_ROWS
    if rows <= chunk:
        return F.cross_entropy((x2 @ head_weight.t()).float(), t2, ignore_index=ignore_index)
    return _checkpointed_cross_entropy(x2, head_weight, t2, chunk, ignore_index)


def _checkpointed_cross_entropy(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                                chunk_rows: int, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of rows ``x`` [N, d] by chunks of ``chunk_rows``, each chunk's logits recomputed in
    the backward (activation checkpointing), so one chunk of logits is in memory at a time."""
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    total = x.new_zeros((), dtype=torch.float32)
    for s in range(0, x.shape[0], chunk_rows):
        xs, ts = x[s:s + chunk_rows], targets[s:s + chunk_rows]
        total = total + torch.utils.checkpoint.checkpoint(_ce_sum, xs, head_weight, ts, ignore_index, use_reentrant=False)
    return total / n_valid


def _ce_sum(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=ignore_index, reduction="sum")


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             eos_id: int | None = None, context: int | None = None) -> torch.Tensor:
    """Extend ``idx`` [B, T] by up to ``max_new_tokens`` tokens; greedy when ``temperature == 0``.

    Works for any model with ``forward(idx, cache=...)`` and ``make_cache(batch, max_len)`` (a
    single decoder or a mixture). With ``use_cache`` the prompt is processed once and each new token
    costs one position; without it every step recomputes the whole window (the reference path).
    The prompt is cut to its last ``context - max_new_tokens`` tokens so positions stay within the
    trained context.
    """
    if max_new_tokens <= 0:
        return idx
    context = context or model.cfg.context
    if max_new_tokens >= context:
        raise GrowlmError(f"max_new_tokens={max_new_tokens} must be smaller than the model context {context}")
    idx = idx[:, -(context - max_new_tokens):]
    was_training = model.training
    model.eval()
    out = idx
    cache = model.make_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
    step_input = idx
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache) if use_cache else model(out)
        nxt = sample_next(logits[:, -1, :], temperature, top_k, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax, or seeded temperature/top-k sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The paper's published configurations


PRESETS: dict[str, dict] = {
    # 9-layer comparative study over the frozen visual Unicode substrate (paper §1.2, 247.6M)
    "paper-9l-unicode": {"substrate": "glyph", "vocab_size": 65536, "d_model": 1024, "n_heads": 32,
                         "n_layers": 9, "context": 1024, "embed_dim": 1024},
    # the same stack over the frozen 16-bit token-id code lifted ×64 (181.5M)
    "paper-9l-16bit": {"substrate": "binary", "vocab_size": 65536, "d_model": 1024, "n_heads": 32,
                       "n_layers": 9, "context": 1024, "embed_dim": 16},
    # the v3 long run: 16 layers over the 16-bit code (269.7M)
    "paper-16l-16bit": {"substrate": "binary", "vocab_size": 65536, "d_model": 1024, "n_heads": 32,
                        "n_layers": 16, "context": 1024, "embed_dim": 16},
}


def preset_config(name: str) -> tuple[ModelConfig, str]:
    """The model config (a frozen embedding) and substrate kind of a named preset."""
    if name not in PRESETS:
        raise GrowlmError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    kind = spec.pop("substrate")
    return ModelConfig(**spec), kind


def count_params_meta(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a config without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        model = GrowLM(cfg)
    return model.param_counts()


def head_param_count(cfg: ModelConfig) -> int:
    """Parameters of the LM head plus the final norm (trained at every grow stage)."""
    return cfg.vocab_size * cfg.d_model + 2 * cfg.d_model


def block_param_count(cfg: ModelConfig) -> int:
    """Parameters of one block: biased QKV/O (4d²+4d), biased FFN (8d²+5d), two LayerNorms (4d)."""
    d = cfg.d_model
    return 12 * d * d + 13 * d


def flop_per_token(cfg: ModelConfig, frozen: int = 0) -> float:
    """Matmul FLOPs per token of a training step whose first ``frozen`` blocks are frozen and everything
    above them trains (monolithic: 0; a grow stage: the trunk; head-only: every block), for MFU figures.

    A trained block costs 6 FLOPs per matmul weight (forward, weight gradient, input gradient) plus
    12·d·context for attention's score and value products; a frozen block below them runs forward only,
    2 per weight plus 4·d·context; the LM head costs 6 per weight. Biases, norms and other elementwise
    work are no matmuls and are left out, so the figure equals torch's ``FlopCounterMode`` count. Stages
    with LoRA adapters or a frozen head: :func:`growlm.growth.stage_flop_per_token`.
    """
    n_layers, attention, weights = cfg.n_layers, cfg.d_model * cfg.context, 12 * cfg.d_model * cfg.d_model
    trained = (n_layers - frozen) * weights + cfg.vocab_size * cfg.d_model
    return 6 * trained + 12 * (n_layers - frozen) * attention + frozen * (2 * weights + 4 * attention)
