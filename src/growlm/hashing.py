"""Content hashes: the fingerprints that make the docking port checkable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and no whitespace, so equal content always hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor (contiguous, on CPU)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a set of tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(canonical_json([name, str(t.dtype), list(t.shape)]))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
