"""Hugging Face interop: a growlm model dir <-> a stock ``GPTNeoXForCausalLM`` checkpoint.

growlm's decoder is GPT-NeoX with sequential residuals, so the export is plain tensor renaming plus
two layout changes, and loads with ``AutoModelForCausalLM.from_pretrained`` without
``trust_remote_code``:

==============================  ==============================================================
growlm                          GPT-NeoX
==============================  ==============================================================
``embed.weight`` [V, k]         ``gpt_neox.embed_in.weight`` [V, d]: the lifted matrix
                                (``repeat_interleave(d // k)``), since NeoX has no lift
``blocks.i.ln1``                ``gpt_neox.layers.i.input_layernorm``
``blocks.i.attn.qkv``           ``gpt_neox.layers.i.attention.query_key_value``: rows go from
                                growlm's [3, heads, head_dim] to NeoX's [heads, 3, head_dim]
``blocks.i.attn.proj``          ``gpt_neox.layers.i.attention.dense``
``blocks.i.ln2``                ``gpt_neox.layers.i.post_attention_layernorm``
``blocks.i.mlp.fc`` / ``proj``  ``gpt_neox.layers.i.mlp.dense_h_to_4h`` / ``dense_4h_to_h``
``ln_f``                        ``gpt_neox.final_layer_norm``
``head.weight``                 ``embed_out.weight`` (transformers 5 renames it to ``lm_head``
                                on load; 4.x reads it as is)
==============================  ==============================================================

Everything else already agrees: NeoX's rotary embedding is the same rotate-half form over
``partial_rotary_factor * head_dim`` (1.0 here) with ``inv_freq = theta^(-2i/hd)``, attention is
scaled by ``head_dim ** -0.5`` (SDPA's default, which growlm uses), ``hidden_act="gelu"`` is the
exact erf GELU, and ``use_parallel_residual=False`` is growlm's pre-LN ``x + attn(ln1(x))`` then
``+ mlp(ln2(x))``.

``growlm_export.json`` beside the checkpoint records the source model's fingerprint and lineage,
its substrate and tokenizer identity and the substrate width k, so :func:`import_hf` can restore
the compact [V, k] table and the docking-port fingerprints of an unmodified export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tokenizers
import torch

from growlm.corpus import regular_file
from growlm.errors import GrowlmError, one_line
from growlm.files import WriteError, atomic_dir, atomic_save_tensors, field
from growlm.hashing import sha256_tensors
from growlm.loading import load_model, port_problems
from growlm.lora import merge_adapters
from growlm.model import GrowLM, ModelConfig
from growlm.model_card import write_card
from growlm.store.model import TOKENIZER_DIR, base_state, load_tensors, model_fingerprint, save_model
from growlm.store.records import SubstrateRecord
from growlm.substrate import substrate_fingerprint
from growlm.substrate.registry import kind_trains
from growlm.tokenizer import FORMAT as TOKENIZER_FORMAT
from growlm.tokenizer import META_FILE as TOKENIZER_META
from growlm.tokenizer import VERSION as TOKENIZER_VERSION
from growlm.tokenizer import Tokenizer, vocab_fingerprint

EXPORT_META = "growlm_export.json"
EXPORT_FORMAT = "growlm-hf-export"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# growlm name inside a block -> NeoX name inside a layer (weight and bias alike)
_BLOCK_MAP = {
    "ln1": "input_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.proj": "attention.dense",
    "ln2": "post_attention_layernorm",
    "mlp.fc": "mlp.dense_h_to_4h",
    "mlp.proj": "mlp.dense_4h_to_h",
}
_NEOX_EMBED, _NEOX_HEAD, _NEOX_LN_F = "gpt_neox.embed_in.weight", "embed_out.weight", "gpt_neox.final_layer_norm"
# Non-parameter buffers older NeoX checkpoints carry; they hold nothing growlm needs.
_NEOX_BUFFERS = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
# what load_state_dict can copy into growlm's float32 parameters without reinterpreting the values
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Tensor layout


def _qkv_to_neox(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of growlm's fused QKV ([3, heads, hd]) in NeoX's per-head order ([heads, 3, hd])."""
    return t.reshape(3, n_heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _qkv_from_neox(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_qkv_to_neox`."""
    return t.reshape(n_heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def to_neox_state(model: GrowLM) -> dict[str, torch.Tensor]:
    """The tensors of ``GPTNeoXForCausalLM`` computing exactly what ``model`` computes."""
    cfg = model.cfg
    sd = model.state_dict()
    out = {_NEOX_EMBED: model.embed.weight.detach().repeat_interleave(cfg.lift, dim=-1)}
    for i in range(len(model.blocks)):
        for ours, theirs in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                t = sd[f"blocks.{i}.{ours}.{p}"]
                if ours == "attn.qkv":
                    t = _qkv_to_neox(t, cfg.n_heads)
                out[f"gpt_neox.layers.{i}.{theirs}.{p}"] = t
    for p in ("weight", "bias"):
        out[f"{_NEOX_LN_F}.{p}"] = sd[f"ln_f.{p}"]
    out[_NEOX_HEAD] = sd["head.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_neox_state(state: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                    tied: bool) -> dict[str, torch.Tensor]:
    """growlm tensors (embedding still lifted, [V, d]) from a NeoX state dict.

    GrowlmError, naming the tensor, if one is missing, is no float16/bfloat16/float32/float64 tensor or
    holds NaN or infinite values (a model with them computes nothing a score or a sample could use).
    """
    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise GrowlmError(f"GPT-NeoX checkpoint lacks tensor {name}")
        t = state[name]
        if t.dtype not in _FLOAT_DTYPES:
            raise GrowlmError(f"GPT-NeoX checkpoint tensor {name} is {str(t.dtype).removeprefix('torch.')}; growlm "
                              f"imports {', '.join(str(d).removeprefix('torch.') for d in _FLOAT_DTYPES)} weights")
        if not bool(torch.isfinite(t).all()):
            raise GrowlmError(f"GPT-NeoX checkpoint tensor {name} holds NaN or infinite values; growlm imports "
                              f"finite weights only")
        return t

    out = {"embed.weight": get(_NEOX_EMBED)}
    for i in range(n_layers):
        for ours, theirs in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                t = get(f"gpt_neox.layers.{i}.{theirs}.{p}")
                if ours == "attn.qkv":
                    t = _qkv_from_neox(t, n_heads)
                out[f"blocks.{i}.{ours}.{p}"] = t
    for p in ("weight", "bias"):
        out[f"ln_f.{p}"] = get(f"{_NEOX_LN_F}.{p}")
    heads = [n for n in (_NEOX_HEAD, "lm_head.weight") if n in state]
    if len(heads) > 1:  # transformers 4 reads one name, 5 the other: two models in one file
        raise GrowlmError(f"GPT-NeoX checkpoint has two LM heads, {heads[0]} and {heads[1]}")
    if not heads and not tied:
        raise GrowlmError(f"GPT-NeoX checkpoint lacks tensor {_NEOX_HEAD} (or lm_head.weight)")
    # tied, transformers computes with the embedding and drops a stored head: so must growlm
    if tied and heads and not torch.equal(get(heads[0]), out["embed.weight"]):
        raise GrowlmError(f"GPT-NeoX checkpoint ties its head to the embedding (tie_word_embeddings), but its "
                          f"{heads[0]} differs from {_NEOX_EMBED}")
    out["head.weight"] = out["embed.weight"] if tied else get(heads[0])
    used = {_NEOX_EMBED, _NEOX_HEAD, "lm_head.weight", f"{_NEOX_LN_F}.weight", f"{_NEOX_LN_F}.bias"}
    used |= {f"gpt_neox.layers.{i}.{t}.{p}" for i in range(n_layers) for t in _BLOCK_MAP.values()
             for p in ("weight", "bias")}
    unknown = sorted(k for k in set(state) - used if not k.endswith(_NEOX_BUFFERS))
    if unknown:
        raise GrowlmError(f"GPT-NeoX checkpoint has tensors growlm has no place for: {', '.join(unknown[:5])}")
    return out


# ----------------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig, n_layers: int, *, bos_id: int, eos_id: int, pad_id: int, dtype: torch.dtype) -> dict:
    """``config.json`` of the equivalent ``GPTNeoXForCausalLM``.

    The rotary settings are written twice: ``rope_parameters`` for transformers 5 and the legacy
    ``rotary_pct``/``rotary_emb_base`` for 4.x, so the export loads in either.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": 4 * cfg.d_model,
        "hidden_act": "gelu",
        "use_parallel_residual": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
        "rotary_pct": 1.0,
        "rotary_emb_base": cfg.rope_theta,
        "max_position_embeddings": cfg.context,
        "layer_norm_eps": cfg.norm_eps,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Any OSError while ``out`` is written (a read-only parent, say) as one line naming it."""
    try:
        yield
    except OSError as e:
        raise WriteError(out, str(e.strerror or e)) from e


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model dir ``model_dir`` as a Hugging Face ``GPTNeoXForCausalLM`` checkpoint in ``out_dir``.

    ``out_dir`` gets ``config.json``, ``model.safetensors``, ``generation_config.json``, the
    tokenizer files, ``growlm_export.json`` and a model card ``README.md`` (see growlm.model_card);
    it appears atomically and must not exist yet.
    LoRA adapters are merged into the exported weights (the model dir is left untouched).
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    if out.exists() or out.is_symlink():  # checked again atomically on write; this fails before the model loads
        raise GrowlmError(f"refusing to overwrite existing {out}")
    saved = load_model(model_dir)
    model, meta = saved.model, saved.meta
    lora = bool(meta.lora)
    if lora:
        merge_adapters(model)
    tok = saved.tokenizer()
    state = to_neox_state(model)
    config = hf_config(model.cfg, len(model.blocks), bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       dtype=model.head.weight.dtype)
    growlm_config = model.cfg.to_dict() | {"n_layers": len(model.blocks)}
    record = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "source": {"name": model_dir.name, "fingerprint": meta.fingerprint, "lineage": meta.lineage},
        "config": growlm_config,
        "substrate": meta.substrate.to_json(),
        "substrate_fingerprint": meta.substrate_fingerprint,
        "substrate_width": model.cfg.embed_dim,
        "lift": model.cfg.lift,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "lora_merged": lora,
        # lets import_hf tell an untouched embedding (same substrate) from one changed after export
        "embedding_sha256": sha256_tensors({"weight": state[_NEOX_EMBED]}),
    }
    with _writing(out), atomic_dir(out) as tmp:
        atomic_save_tensors(tmp / HF_WEIGHTS, state, metadata={"format": "pt"})
        _write_json(tmp / HF_CONFIG, config)
        _write_json(tmp / HF_GENERATION_CONFIG,
                    {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        # growlm_tokenizer.json rides along so import_hf gets the tokenizer back with its metadata
        for name in (*HF_TOKENIZER_FILES, TOKENIZER_META):
            src = saved.tokenizer_dir / name
            if not src.is_file():
                raise GrowlmError(f"tokenizer file missing: {src}")
            shutil.copy2(src, tmp / name)
        _write_json(tmp / EXPORT_META, record)
        write_card(model_dir, meta, tmp)  # README.md: the docking port, lineage and saved scores on the hub
    return out


# ----------------------------------------------------------------------------------------------
# Import
#
# A checkpoint is data from elsewhere: every file import reads is a regular file inside the checkpoint
# dir (a FIFO would block the read forever; a symlink or a path out of the dir would read someone else's
# file), and every value read is checked for type and range before it is used. A bad one is one line
# naming the file and the key, never a traceback or a hang, and never a model dir that then fails to
# verify or load.

_MAX_ROPE_BYTES = 1 << 30
"""The most memory the rotary tables of an imported model may take. ``GrowLM._rope`` builds cos and sin
tables of ``max(context, positions used) x head_dim`` float32 values on each device it runs on, so an
absurd ``max_position_embeddings`` costs that memory on every forward pass, however short the text. 1 GiB
allows a million positions at head size 128, beyond what long-context models use today."""

_NEOX_DEFAULT_CONTEXT, _NEOX_DEFAULT_THETA, _NEOX_DEFAULT_ROTARY, _NEOX_DEFAULT_EPS = 2048, 10000.0, 0.25, 1e-5

# The structure of growlm's own tokenizers (growlm.tokenizer._assemble) as tokenizer.json holds it: a BPE
# with no normalizer, pre-tokenizer, truncation or padding and a Fuse decoder is what growlm's encode, decode,
# id-preserving cuts and unknown-character rule are written and tested for. Anything else (a regex
# pre-tokenizer can backtrack for ever or panic the Rust side) is refused.
_TOKENIZER_PARTS = {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer",
                    "post_processor", "decoder", "model"}
_NO_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "truncation", "padding")
_BPE_SETTINGS = {"dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
                 "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
_FUSE_DECODER = {"type": "Fuse"}
# transformers' save_pretrained gives a growlm tokenizer this post-processor; it adds no token (and growlm
# never asks for special tokens to be added anyway)
_PLAIN_TEMPLATE = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {}}
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip")  # each would change the text around a special
_TOKENIZER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # growlm.tokenizer.Tokenizer's pad, bos, eos and unk ids


def _own_roots(hf: Path) -> list[Path]:
    """Where the checkpoint's files may live: its dir, and for a Hugging Face cache snapshot
    (``models--ORG--NAME/snapshots/REV``, whose files link to ``../../blobs/SHA``) its repo's blobs."""
    real = Path(os.path.realpath(hf))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def _checkpoint_file(hf: Path, name: object, what: str, *, required: bool = True) -> Path | None:
    """The file ``name`` of the checkpoint dir ``hf``, checked before anything opens it, or ``None`` when
    it is absent and not ``required``.

    ``name`` must be a plain file name (a sharded index is data: it must not reach a file elsewhere), a
    symlink must resolve inside ``hf`` (or a cache snapshot's blobs, :func:`_own_roots`), and the file must be a regular one (see
    :func:`growlm.corpus.regular_file`). ``what`` names the file's role in messages.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise GrowlmError(f"{what} is {name!r}, which is not a plain file name inside {hf}")
    f = hf / name
    try:
        mode = os.lstat(f).st_mode
    except FileNotFoundError:
        if required:
            raise GrowlmError(f"{hf} has no {name} ({what})") from None
        return None
    except OSError as e:
        raise GrowlmError(f"cannot read {f}: {e.strerror or e}") from None
    if stat.S_ISLNK(mode):
        target = Path(os.path.realpath(f))
        if not any(target.is_relative_to(root) for root in _own_roots(hf)):
            raise GrowlmError(f"{f} is a symlink to {target}, outside the checkpoint dir; import reads the "
                              f"checkpoint's own files only")
    regular_file(f, what)
    return f


def _read_json(path: Path) -> dict:
    """The JSON object in a checked checkpoint file, or a one-line error naming it."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, a huge int
        raise GrowlmError(one_line(f"cannot read {path}: {e}")) from None
    if not isinstance(obj, dict):
        raise GrowlmError(f"{path} is not a JSON object")
    return obj


def _optional(obj: dict, key: str, kinds: tuple[type, ...], f: Path, default: Any, within: str = "") -> Any:
    """``obj[key]`` checked by :func:`growlm.files.field`, or ``default`` when the key is absent."""
    return field(obj, key, kinds, f, within) if key in obj else default


def _count(obj: dict, key: str, f: Path, *, least: int = 1, default: int | None = None) -> int:
    """The integer ``obj[key]``, at least ``least``; required unless a ``default`` is given."""
    value = field(obj, key, (int,), f) if default is None else _optional(obj, key, (int,), f, default)
    if value < least:
        raise GrowlmError(f"{f} is corrupt: {key} is {value}, not an integer of at least {least}")
    return value


def _positive(value: float, key: str, f: Path) -> float:
    """A JSON number as a finite, positive float (an integer too large for a float is refused, not raised)."""
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not (math.isfinite(x) and x > 0):
        raise GrowlmError(f"{f} is corrupt: {key} is {value!r:.40}, not a finite positive number")
    return x


def _one_value(named: dict[str, Any], f: Path, default: Any) -> Any:
    """The one value that several config keys give one setting (``rope_theta`` and ``rotary_emb_base``,
    say), ``default`` when none does: they must agree, since transformers 4 and 5 each read some of them."""
    given = {k: v for k, v in named.items() if v is not None}
    if len(set(given.values())) > 1:
        said = " but ".join(f"{k}={v!r}" for k, v in given.items())
        raise GrowlmError(f"{f} contradicts itself: {said}")
    return next(iter(given.values()), default)


def _rotary(hcfg: dict, f: Path) -> tuple[float, float, str]:
    """(theta, partial rotary factor, rope type) under either config naming, NeoX defaults otherwise."""
    def number(obj: dict, key: str, within: str = "") -> float | None:
        value = _optional(obj, key, (float,), f, None, within)
        return None if value is None else _positive(value, within + key, f)

    theta = {"rope_theta": number(hcfg, "rope_theta"), "rotary_emb_base": number(hcfg, "rotary_emb_base")}
    factor = {"partial_rotary_factor": number(hcfg, "partial_rotary_factor"), "rotary_pct": number(hcfg, "rotary_pct")}
    kind: dict[str, str | None] = {}
    for table in ("rope_parameters", "rope_scaling"):  # transformers 5 names, and 4's scaling
        rope, where = _optional(hcfg, table, (dict, type(None)), f, None) or {}, f"{table}."
        theta[f"{where}rope_theta"] = number(rope, "rope_theta", where)
        factor[f"{where}partial_rotary_factor"] = number(rope, "partial_rotary_factor", where)
        for key in ("rope_type", "type"):
            kind[where + key] = _optional(rope, key, (str,), f, None, where)
    return (_one_value(theta, f, _NEOX_DEFAULT_THETA), _one_value(factor, f, _NEOX_DEFAULT_ROTARY),
            _one_value(kind, f, "default"))


def _neox_config(hf: Path) -> dict[str, Any]:
    """What import reads from ``config.json``, each value checked for type and range, once the checkpoint
    is one whose computation growlm's decoder reproduces; a one-line refusal naming the key otherwise."""
    f = _checkpoint_file(hf, HF_CONFIG, "model config")
    hcfg = _read_json(f)
    kind = hcfg.get("model_type")
    if kind != "gpt_neox":
        raise GrowlmError(f"{hf} holds a {kind!r:.40} model; import_hf reads GPT-NeoX (GPTNeoXForCausalLM) "
                          f"checkpoints only")
    vocab, d = _count(hcfg, "vocab_size", f), _count(hcfg, "hidden_size", f)
    heads, layers = _count(hcfg, "num_attention_heads", f), _count(hcfg, "num_hidden_layers", f, least=0)
    if d % heads or (d // heads) % 2:
        raise GrowlmError(f"cannot import {hf}: {HF_CONFIG} has hidden_size={d} and num_attention_heads={heads}; "
                          f"growlm's rotary attention needs an even head size hidden_size / num_attention_heads")
    context = _count(hcfg, "max_position_embeddings", f, default=_NEOX_DEFAULT_CONTEXT)
    rope_bytes = 2 * context * (d // heads) * 4
    if rope_bytes > _MAX_ROPE_BYTES:
        raise GrowlmError(
            f"cannot import {hf}: {HF_CONFIG} has max_position_embeddings={context:,}, for which every forward pass "
            f"would build {rope_bytes / 2**30:,.1f} GiB of rotary tables (cos and sin: positions x head size "
            f"{d // heads} x 4 bytes); growlm refuses more than {_MAX_ROPE_BYTES / 2**30:g} GiB, "
            f"{_MAX_ROPE_BYTES // (8 * (d // heads)):,} positions at this head size")
    theta, factor, rope_type = _rotary(hcfg, f)
    eps = _positive(_optional(hcfg, "layer_norm_eps", (float,), f, _NEOX_DEFAULT_EPS), "layer_norm_eps", f)
    act = _optional(hcfg, "hidden_act", (str,), f, "gelu")
    ffn = _optional(hcfg, "intermediate_size", (int, type(None)), f, None)
    problems = {
        "it uses parallel residuals (use_parallel_residual=true); growlm blocks are sequential":
            _optional(hcfg, "use_parallel_residual", (bool,), f, True),
        f"its rotary embedding covers {factor:g} of each head; growlm rotates the full head": factor != 1.0,
        f"its RoPE type is {rope_type!r:.40}; growlm has plain RoPE": rope_type != "default",
        f"its activation is {act!r:.40}; growlm uses exact GELU": act != "gelu",
        "it has no attention biases; growlm's attention is biased": not _optional(hcfg, "attention_bias", (bool,), f, True),
        f"its FFN width {ffn} is not 4 x hidden_size": ffn != 4 * d,
    }
    for why, bad in problems.items():
        if bad:
            raise GrowlmError(f"cannot import {hf}: {why}")
    return {"vocab_size": vocab, "d_model": d, "n_heads": heads, "n_layers": layers, "context": context,
            "rope_theta": theta, "norm_eps": eps, "tied": _optional(hcfg, "tie_word_embeddings", (bool,), f, False)}


def _export_record(hf: Path) -> dict | None:
    """``growlm_export.json`` with every field import reads checked for type and range, or ``None``
    when the checkpoint has none (one re-saved by transformers, say)."""
    f = _checkpoint_file(hf, EXPORT_META, "growlm export record", required=False)
    if f is None:
        return None
    record = _read_json(f)
    if record.get("format") != EXPORT_FORMAT:
        raise GrowlmError(f"{f} is not a growlm export record")
    if field(record, "version", (int,), f) != 1:
        raise GrowlmError(f"{f}: version {record['version']} is not one this growlm reads (1)")
    source = field(record, "source", (dict,), f)
    field(source, "fingerprint", (str,), f, "source.")
    if not all(isinstance(fp, str) for fp in field(source, "lineage", (list,), f, "source.")):
        raise GrowlmError(f"{f} is corrupt: source.lineage is not a list of fingerprints")
    field(field(record, "config", (dict,), f), "trainable_embedding", (bool,), f, "config.")
    _count(record, "substrate_width", f)
    field(record, "embedding_sha256", (str,), f)
    field(record, "substrate_fingerprint", (str,), f)
    sub = field(record, "substrate", (dict,), f)
    for key, kinds in (("kind", (str,)), ("recipe", (dict,)), ("fingerprint", (str,))):
        field(sub, key, kinds, f, "substrate.")
    return record


def _recorded_substrate(hf: Path, record: dict, embedding: torch.Tensor, trainable: bool) -> dict:
    """The substrate the export record names, once checked to be the one the imported embedding is, as
    ``growlm verify`` will check it: a record that contradicts itself or the weights is refused."""
    sub, recipe = record["substrate"], record["substrate"]["recipe"]
    why = None
    if sub["fingerprint"] != record["substrate_fingerprint"]:
        why = (f"substrate.fingerprint {sub['fingerprint'][:12]!r} is not substrate_fingerprint "
               f"{record['substrate_fingerprint'][:12]!r}")
    elif sub["kind"] != recipe.get("kind", sub["kind"]):
        why = f"substrate.kind {sub['kind']!r:.40} is not its recipe's kind {recipe['kind']!r:.40}"
    elif kind_trains(sub["kind"]):
        if not trainable:
            why = "it names a trainable substrate, but config.trainable_embedding is false"
    elif substrate_fingerprint(recipe, embedding) != sub["fingerprint"]:
        why = (f"the embedding, as the [{embedding.shape[0]}, {embedding.shape[1]}] table substrate_width "
               f"{record['substrate_width']} gives, is not substrate {sub['fingerprint'][:12]} of its recipe")
    if why:
        raise GrowlmError(f"cannot import {hf}: {hf / EXPORT_META} contradicts the checkpoint: {why}")
    return sub


def _load_hf_weights(hf: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single or sharded safetensors checkpoint (pickled .bin files are never read).

    A sharded checkpoint gives exactly the tensors its index maps to each shard: a tensor in a shard
    the index does not map it to (a second copy, say), or missing from the shard it is mapped to, is
    refused, naming the tensor and the shards.
    """
    single = _checkpoint_file(hf, HF_WEIGHTS, "weights file", required=False)
    if single is not None:
        return load_tensors(single)
    index = _checkpoint_file(hf, HF_WEIGHTS_INDEX, "weights index", required=False)
    if index is None:
        raise GrowlmError(f"{hf} has no {HF_WEIGHTS} (only safetensors checkpoints are imported)")
    weight_map = field(_read_json(index), "weight_map", (dict,), index)
    for name in weight_map:
        field(weight_map, name, (str,), index, "weight_map.")
    files = {s: _checkpoint_file(hf, s, f"shard of {HF_WEIGHTS_INDEX}") for s in sorted(set(weight_map.values()))}
    shards = {s: load_tensors(f) for s, f in files.items()}
    # every shard's names first: a tensor moved to another shard is named with both, not as missing from one
    for shard, tensors in shards.items():
        for name in tensors:
            if weight_map.get(name) != shard:
                mapped = f"to {weight_map[name]}" if name in weight_map else "to no shard"
                raise GrowlmError(f"cannot import {hf}: tensor {name} is in shard {shard}, but {HF_WEIGHTS_INDEX} "
                                  f"maps it {mapped}")
    missing = sorted(n for n, s in weight_map.items() if n not in shards[s])
    if missing:
        raise GrowlmError(f"cannot import {hf}: {HF_WEIGHTS_INDEX} maps tensor {missing[0]} to shard "
                          f"{weight_map[missing[0]]}, which lacks it")
    return {name: t for tensors in shards.values() for name, t in tensors.items()}


def _check_tokenizer_json(tok: dict, f: Path) -> None:
    """Refuse, naming the part, a ``tokenizer.json`` whose structure is not that of growlm's own tokenizers."""
    def refuse(part: str, value: object, want: str) -> None:
        shown = f"type {value['type']!r:.40}" if isinstance(value, dict) and "type" in value else f"{value!r:.60}"
        raise GrowlmError(f"cannot import {f}: its {part} is {shown}; growlm imports only tokenizers of its own "
                          f"structure ({want})")

    unknown = sorted(set(tok) - _TOKENIZER_PARTS)
    if unknown:
        refuse("part", unknown[0], f"parts {', '.join(sorted(_TOKENIZER_PARTS))}")
    for part in _NO_TOKENIZER_PARTS:
        if tok.get(part) is not None:
            refuse(part, tok[part], f"no {part}")
    if tok.get("post_processor") not in (None, _PLAIN_TEMPLATE):
        refuse("post_processor", tok["post_processor"], "none, or a template that adds no token")
    if tok.get("decoder") != _FUSE_DECODER:
        refuse("decoder", tok.get("decoder"), "a Fuse decoder")
    model = field(tok, "model", (dict,), f)
    if model.get("type") != "BPE":
        refuse("model", model, "a BPE model")
    extra = sorted(set(model) - {"type", "vocab", "merges", *_BPE_SETTINGS})
    if extra:
        refuse("model", extra[0], f"a BPE model with keys type, vocab, merges, {', '.join(_BPE_SETTINGS)}")
    for key, want in _BPE_SETTINGS.items():
        value = model.get(key, want)
        if value != want or type(value) is not type(want):  # 0 == False, but the Rust side reads no int as a bool
            refuse(f"model.{key}", value, f"a BPE model with {key} {json.dumps(want)}")
    vocab = field(model, "vocab", (dict,), f, "model.")
    field(model, "merges", (list,), f, "model.")
    absent = [s for s in _TOKENIZER_SPECIALS if s not in vocab]
    if absent:
        raise GrowlmError(f"cannot import {f}: its vocabulary has no {absent[0]}; growlm's tokenizers hold "
                          f"{', '.join(_TOKENIZER_SPECIALS)}")
    for i, added in enumerate(_optional(tok, "added_tokens", (list,), f, [])):
        where = f"added_tokens[{i}]."
        if not isinstance(added, dict):
            raise GrowlmError(f"{f} is corrupt: added_tokens[{i}] is not an object")
        content, tid = field(added, "content", (str,), f, where), field(added, "id", (int,), f, where)
        if vocab.get(content) != tid:
            refuse(f"added token {content!r:.40}", tid, "added tokens that are tokens of the BPE vocabulary, same id")
        for flag in _ADDED_TOKEN_FLAGS:
            if added.get(flag, False) is not False:
                refuse(f"{where}{flag}", added[flag], f"{flag} false")


def _tokenizer_dir(hf: Path, dest: Path) -> Path:
    """A growlm tokenizer dir built from the checkpoint's tokenizer files.

    ``tokenizer.json`` must have the structure of growlm's own tokenizers (see
    :func:`_check_tokenizer_json`); the other files must be JSON objects. A checkpoint re-saved by
    transformers loses ``growlm_tokenizer.json``; then its vocabulary is fingerprinted afresh, which gives
    the same fingerprint as long as the vocabulary is unchanged.
    """
    main = _checkpoint_file(hf, HF_TOKENIZER_FILES[0], "the model's tokenizer")
    _check_tokenizer_json(_read_json(main), main)
    try:
        backend = tokenizers.Tokenizer.from_file(str(main))
    except Exception as e:  # the Rust parser raises plain Exception subclasses
        raise GrowlmError(one_line(f"cannot read {main}: {e}")) from None
    dest.mkdir()
    for name in (*HF_TOKENIZER_FILES, TOKENIZER_META):
        f = _checkpoint_file(hf, name, "tokenizer file", required=False)
        if f is not None:
            _read_json(f)
            shutil.copy2(f, dest / name)
    if not (dest / TOKENIZER_META).is_file():
        vocab = backend.get_vocab(with_added_tokens=True)
        strings = sorted(vocab, key=vocab.__getitem__)
        if [vocab[s] for s in strings] != list(range(len(strings))):
            raise GrowlmError(f"{main}: token ids are not dense 0..{len(strings) - 1}")
        _write_json(dest / TOKENIZER_META, {
            "format": TOKENIZER_FORMAT, "version": TOKENIZER_VERSION, "fingerprint": vocab_fingerprint(strings),
            "vocab_size": len(strings), "scheme": "imported", "recipe": {"source": "huggingface"},
        })
    return dest


def _check_shapes(state: dict[str, torch.Tensor], neox: dict, hf: Path) -> None:
    """Refuse in one line a checkpoint whose tensors disagree with its ``config.json`` (an edited
    ``vocab_size`` or ``hidden_size``), naming the key and the tensor, before a model is built."""
    v, d = neox["vocab_size"], neox["d_model"]
    for name, theirs in (("embed.weight", _NEOX_EMBED), ("head.weight", _NEOX_HEAD)):
        t = state[name]
        if t.dim() != 2 or tuple(t.shape) != (v, d):
            raise GrowlmError(f"cannot import {hf}: {HF_CONFIG} says vocab_size={v}, hidden_size={d}, but {theirs} "
                              f"has shape {list(t.shape)}")


def _unlift(weight: torch.Tensor, width: int | None) -> torch.Tensor:
    """The [V, width] table whose lift is ``weight``, or ``weight`` itself when it is not such a lift."""
    d = weight.shape[1]
    if not width or d % width or width == d:
        return weight
    lift = d // width
    table = weight[:, ::lift].contiguous()
    return table if torch.equal(table.repeat_interleave(lift, dim=1), weight) else weight


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Read a ``GPTNeoXForCausalLM`` checkpoint (sequential residuals, full rotary) into a growlm model dir.

    The embedding becomes a frozen [V, d] substrate, or the original [V, k] table when
    ``growlm_export.json`` names a width k and the matrix is exactly its lift. The substrate
    identity recorded at export is kept while the embedding is unchanged (and refused if the record
    contradicts the weights); otherwise the substrate is recorded as kind ``imported`` with a fresh
    fingerprint. ``out_dir`` must not exist yet. Any problem with the checkpoint is a one-line
    :class:`GrowlmError` raised before ``out_dir`` is written; a model dir written verifies and loads.
    """
    hf, out = Path(hf_dir), Path(out_dir)
    if out.exists() or out.is_symlink():
        raise GrowlmError(f"refusing to overwrite existing {out}")
    if not hf.is_dir():
        raise GrowlmError(f"Hugging Face checkpoint dir not found: {hf}")
    if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(hf)):  # import never writes into what it reads
        raise GrowlmError(f"--out {out} is inside the checkpoint {hf}; choose a directory outside it")
    neox = _neox_config(hf)
    record = _export_record(hf)
    weights = _load_hf_weights(hf)
    try:
        state = from_neox_state(weights, neox["n_layers"], neox["n_heads"], neox["tied"])
    except GrowlmError as e:
        raise GrowlmError(f"cannot import {hf}: {e}") from None
    _check_shapes(state, neox, hf)
    lifted = state["embed.weight"]
    state["embed.weight"] = table = _unlift(lifted, record["substrate_width"] if record else None)
    trainable = bool(record and record["config"]["trainable_embedding"])
    try:
        cfg = ModelConfig(vocab_size=neox["vocab_size"], d_model=neox["d_model"], n_heads=neox["n_heads"],
                          n_layers=neox["n_layers"], context=neox["context"], embed_dim=int(table.shape[1]),
                          trainable_embedding=trainable, rope_theta=neox["rope_theta"], norm_eps=neox["norm_eps"])
    except GrowlmError as e:
        raise GrowlmError(f"cannot import {hf}: {e}") from None
    model = GrowLM(cfg)
    # load_state_dict copies into growlm's float32 parameters, whatever the checkpoint's dtype
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a tensor whose shape disagrees with config.json
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), one_line(str(e)))
        raise GrowlmError(f"cannot import {hf}: {detail[:300]}") from None
    model.embed.weight.requires_grad_(cfg.trainable_embedding)
    embedding = model.embed.weight.detach()  # as save_model writes it, and verify will read it
    if record is not None and sha256_tensors({"weight": lifted}) == record["embedding_sha256"]:
        substrate = _recorded_substrate(hf, record, embedding, trainable)
    else:
        recipe = {"source": "huggingface", "model_type": "gpt_neox", "width": cfg.embed_dim}
        substrate = {"kind": "imported", "fingerprint": substrate_fingerprint(recipe, embedding), "recipe": recipe}
    extra = {"imported_from": {"format": "huggingface", "model_type": "gpt_neox", "name": hf.name,
                               "source_fingerprint": record["source"]["fingerprint"] if record else None}}
    with tempfile.TemporaryDirectory() as td:
        tok_dir = _tokenizer_dir(hf, Path(td) / TOKENIZER_DIR)
        try:
            tok = Tokenizer.load(tok_dir)
        except GrowlmError as e:  # its files are copies of the checkpoint's, under the same names
            raise GrowlmError(str(e).replace(str(tok_dir), str(hf))) from None
        if tok.vocab_size > cfg.vocab_size:
            raise GrowlmError(f"cannot import {hf}: {HF_TOKENIZER_FILES[0]} holds {tok.vocab_size} tokens, but "
                              f"{HF_CONFIG} gives the model only vocab_size={cfg.vocab_size} rows")
        lineage: list[str] = []
        if record is not None:
            source = record["source"]
            lineage = list(source["lineage"])
            # an untouched export imports as the very same model, so it keeps its place in the lineage
            fp = model_fingerprint(cfg.to_dict(), substrate["fingerprint"], tok.fingerprint, base_state(model), {})
            if fp != source["fingerprint"]:
                lineage.append(source["fingerprint"])
        # the docking-port checks of load and verify, on what is about to be written: never a dir that fails them
        _, problems = port_problems(Path(td), SubstrateRecord.model_validate(substrate), substrate["fingerprint"],
                                    tok.fingerprint, cfg.trainable_embedding, embedding)
        if problems:
            raise GrowlmError(f"cannot import {hf}: the model dir it gives would not verify: {problems[0]}")
        with _writing(out):
            save_model(model, out, tokenizer_dir=tok_dir, substrate=substrate, extra=extra, lineage=lineage)
    return out
