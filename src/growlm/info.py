"""``growlm info``: what a preset, a model dir, a run or a mixture is, as one JSON object."""

from __future__ import annotations

from pathlib import Path

from growlm.model import count_params_meta, preset_config
from growlm.store import MixtureDir, RunDir, resolve, stages
from growlm.store.mixture import info_mixture


def info_preset(name: str) -> dict:
    """Shape and exact parameter counts of a named paper preset (no weights are allocated)."""
    cfg, kind = preset_config(name)
    counts = count_params_meta(cfg)
    return {"preset": name, "substrate": kind, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size, "context": cfg.context,
            "embed_dim": cfg.embed_dim, "params_total": counts["params_total"],
            "params_trainable": counts["params_trainable"]}


def info_model(path: Path) -> dict:
    """Description of a saved model dir, a mixture dir, or a run (its stages)."""
    found = resolve(path)
    if isinstance(found, MixtureDir):
        return info_mixture(found.path)
    if isinstance(found, RunDir):
        return {"run": str(found.path), "stages": [info_model(s) for _, s in stages(found)]}
    meta = found.meta
    cfg = meta["config"]
    out = {
        "path": str(found.path), "n_layers": cfg["n_layers"], "d_model": cfg["d_model"], "n_heads": cfg["n_heads"],
        "vocab_size": cfg["vocab_size"], "context": cfg["context"], "substrate": meta["substrate"]["kind"],
        "params_total": meta["params_total"], "params_trainable": meta["params_trainable"],
        "params_active": meta.get("params_active", meta["params_trainable"]),
        "blocks": meta["blocks"], "substrate_fingerprint": meta["substrate_fingerprint"],
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"], "fingerprint": meta["fingerprint"],
        "lineage": meta["lineage"], "lora": meta.get("lora"),
    }
    for k in ("stage", "metrics", "merged_from"):
        if k in meta:
            out[k] = meta[k]
    if isinstance(meta.get("audit"), dict):  # what trained and what stayed frozen; the start hashes stay in model.json
        out["audit"] = {k: v for k, v in meta["audit"].items() if k != "start_sha256"}
    return out
