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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tokenizers
import torch

from growlm.errors import GrowlmError, one_line
from growlm.files import WriteError, atomic_dir, atomic_save_tensors
from growlm.hashing import sha256_tensors
from growlm.lora import merge_adapters
from growlm.model import GrowLM, ModelConfig
from growlm.model_card import write_card
from growlm.store.model import base_state, load_model, load_tensors, model_fingerprint, save_model
from growlm.substrate import substrate_fingerprint
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
    """growlm tensors (embedding still lifted, [V, d]) from a NeoX state dict; GrowlmError if one is missing."""
    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise GrowlmError(f"GPT-NeoX checkpoint lacks tensor {name}")
        return state[name]

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
    head = next((n for n in (_NEOX_HEAD, "lm_head.weight") if n in state), None)
    if head is None and not tied:
        raise GrowlmError(f"GPT-NeoX checkpoint lacks tensor {_NEOX_HEAD} (or lm_head.weight)")
    out["head.weight"] = state[head] if head else out["embed.weight"]
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
    lora = bool(meta.get("lora"))
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
        "source": {"name": model_dir.name, "fingerprint": meta["fingerprint"], "lineage": meta.get("lineage", [])},
        "config": growlm_config,
        "substrate": meta["substrate"],
        "substrate_fingerprint": meta["substrate_fingerprint"],
        "substrate_width": model.cfg.embed_dim,
        "lift": model.cfg.lift,
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
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


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GrowlmError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrowlmError(one_line(f"cannot read {path}: {e}")) from None
    if not isinstance(obj, dict):
        raise GrowlmError(f"{path} is not a JSON object")
    return obj


def _rotary(hcfg: dict) -> tuple[float, float, str]:
    """(theta, partial rotary factor, rope type) under either config naming, NeoX defaults otherwise."""
    rope = hcfg.get("rope_parameters") or hcfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hcfg.get("rope_theta", hcfg.get("rotary_emb_base", 10000.0)))
    factor = rope.get("partial_rotary_factor", hcfg.get("partial_rotary_factor", hcfg.get("rotary_pct", 0.25)))
    return float(theta), float(factor), rope.get("rope_type", rope.get("type", "default"))


def _check_neox(hcfg: dict, path: Path) -> None:
    """Refuse, in one line, any checkpoint whose computation growlm's decoder cannot reproduce."""
    kind = hcfg.get("model_type")
    if kind != "gpt_neox":
        raise GrowlmError(f"{path} holds a {kind!r} model; import_hf reads GPT-NeoX (GPTNeoXForCausalLM) checkpoints only")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hcfg.get(key), int):
            raise GrowlmError(f"cannot import {path}: {HF_CONFIG} has no integer {key}")
    _, factor, rope_type = _rotary(hcfg)
    d = hcfg["hidden_size"]
    problems = {
        "it uses parallel residuals (use_parallel_residual=true); growlm blocks are sequential":
            hcfg.get("use_parallel_residual", True),
        f"its rotary embedding covers {factor:g} of each head; growlm rotates the full head": factor != 1.0,
        f"its RoPE type is {rope_type!r}; growlm has plain RoPE": rope_type != "default",
        f"its activation is {hcfg.get('hidden_act')!r}; growlm uses exact GELU": hcfg.get("hidden_act", "gelu") != "gelu",
        "it has no attention biases; growlm's attention is biased": not hcfg.get("attention_bias", True),
        f"its FFN width {hcfg.get('intermediate_size')} is not 4 x hidden_size": hcfg.get("intermediate_size") != 4 * d,
    }
    for why, bad in problems.items():
        if bad:
            raise GrowlmError(f"cannot import {path}: {why}")


def _load_hf_weights(hf: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single or sharded safetensors checkpoint (pickled .bin files are never read)."""
    if (hf / HF_WEIGHTS).is_file():
        return load_tensors(hf / HF_WEIGHTS)
    if (hf / HF_WEIGHTS_INDEX).is_file():
        shards = sorted(set(_read_json(hf / HF_WEIGHTS_INDEX).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_tensors(hf / shard))
        return state
    raise GrowlmError(f"{hf} has no {HF_WEIGHTS} (only safetensors checkpoints are imported)")


def _tokenizer_dir(hf: Path, dest: Path) -> Path:
    """A growlm tokenizer dir built from the checkpoint's tokenizer files.

    A checkpoint re-saved by transformers loses ``growlm_tokenizer.json``; then its vocabulary is
    fingerprinted afresh, which gives the same fingerprint as long as the vocabulary is unchanged.
    """
    dest.mkdir()
    if not (hf / HF_TOKENIZER_FILES[0]).is_file():
        raise GrowlmError(f"{hf} has no {HF_TOKENIZER_FILES[0]}; growlm needs the model's tokenizer")
    for name in (*HF_TOKENIZER_FILES, TOKENIZER_META):
        if (hf / name).is_file():
            shutil.copy2(hf / name, dest / name)
    if not (dest / TOKENIZER_META).is_file():
        try:
            vocab = tokenizers.Tokenizer.from_file(str(hf / HF_TOKENIZER_FILES[0])).get_vocab(with_added_tokens=True)
        except Exception as e:  # the Rust parser raises plain Exception subclasses
            raise GrowlmError(one_line(f"cannot read {hf / HF_TOKENIZER_FILES[0]}: {e}")) from None
        strings = sorted(vocab, key=vocab.__getitem__)
        if [vocab[s] for s in strings] != list(range(len(strings))):
            raise GrowlmError(f"{hf / HF_TOKENIZER_FILES[0]}: token ids are not dense 0..{len(strings) - 1}")
        _write_json(dest / TOKENIZER_META, {
            "format": TOKENIZER_FORMAT, "version": TOKENIZER_VERSION, "fingerprint": vocab_fingerprint(strings),
            "vocab_size": len(strings), "scheme": "imported", "recipe": {"source": "huggingface"},
        })
    return dest


def _check_shapes(state: dict[str, torch.Tensor], hcfg: dict, hf: Path) -> None:
    """Refuse in one line a checkpoint whose tensors disagree with its ``config.json`` (an edited
    ``vocab_size`` or ``hidden_size``), naming the key and the tensor, before a model is built."""
    v, d = hcfg["vocab_size"], hcfg["hidden_size"]
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
    identity recorded at export is kept while the embedding is unchanged; otherwise the substrate is
    recorded as kind ``imported`` with a fresh fingerprint. ``out_dir`` must not exist yet.
    """
    hf, out = Path(hf_dir), Path(out_dir)
    if out.exists():
        raise GrowlmError(f"refusing to overwrite existing {out}")
    if not hf.is_dir():
        raise GrowlmError(f"Hugging Face checkpoint dir not found: {hf}")
    hcfg = _read_json(hf / HF_CONFIG)
    _check_neox(hcfg, hf)
    record = _read_json(hf / EXPORT_META) if (hf / EXPORT_META).is_file() else None
    if record is not None and record.get("format") != EXPORT_FORMAT:
        raise GrowlmError(f"{hf / EXPORT_META} is not a growlm export record")
    n_layers, n_heads = int(hcfg["num_hidden_layers"]), int(hcfg["num_attention_heads"])
    state = from_neox_state(_load_hf_weights(hf), n_layers, n_heads, bool(hcfg.get("tie_word_embeddings")))
    _check_shapes(state, hcfg, hf)
    lifted = state["embed.weight"]
    state["embed.weight"] = table = _unlift(lifted, record and record.get("substrate_width"))
    theta, _, _ = _rotary(hcfg)
    cfg = ModelConfig(
        vocab_size=int(hcfg["vocab_size"]), d_model=int(hcfg["hidden_size"]), n_heads=n_heads, n_layers=n_layers,
        context=int(hcfg.get("max_position_embeddings", 2048)), embed_dim=int(table.shape[1]),
        trainable_embedding=bool(record and record["config"].get("trainable_embedding")),
        rope_theta=theta, norm_eps=float(hcfg.get("layer_norm_eps", 1e-5)),
    )
    model = GrowLM(cfg)
    # load_state_dict copies into growlm's float32 parameters, whatever the checkpoint's dtype
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a tensor whose shape disagrees with config.json
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), one_line(str(e)))
        raise GrowlmError(f"cannot import {hf}: {detail[:300]}") from None
    model.embed.weight.requires_grad_(cfg.trainable_embedding)
    if record is not None and sha256_tensors({"weight": lifted}) == record.get("embedding_sha256"):
        substrate = record["substrate"]
    else:
        recipe = {"source": "huggingface", "model_type": "gpt_neox", "width": cfg.embed_dim}
        substrate = {"kind": "imported", "fingerprint": substrate_fingerprint(recipe, table.float()), "recipe": recipe}
    extra = {"imported_from": {"format": "huggingface", "model_type": "gpt_neox", "name": hf.name,
                               "source_fingerprint": record["source"]["fingerprint"] if record else None}}
    with tempfile.TemporaryDirectory() as td:
        tok_dir = _tokenizer_dir(hf, Path(td) / "tokenizer")
        lineage: list[str] = []
        if record is not None:
            source = record["source"]
            lineage = list(source.get("lineage", []))
            # an untouched export imports as the very same model, so it keeps its place in the lineage
            fp = model_fingerprint(cfg.to_dict(), substrate["fingerprint"], Tokenizer.load(tok_dir).fingerprint,
                                   base_state(model), {})
            if fp != source["fingerprint"]:
                lineage.append(source["fingerprint"])
        with _writing(out):
            save_model(model, out, tokenizer_dir=tok_dir, substrate=substrate, extra=extra, lineage=lineage)
    return out
