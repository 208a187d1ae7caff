"""The trunk-activation cache: a grow stage computes the frozen trunk once per training sequence.

In a grow stage the embedding and every block below the new ones are frozen, so their output for a
given sequence never changes. The cache keeps that output in a memory-mapped file, one slot per
packed training sequence; from the second epoch on a step costs only the new blocks and the head.
The values are the very floats the trunk computes, so a run with the cache gives the same weights
as one without. The file is named by the frozen trunk's fingerprint, so a different trunk never
reads stale activations; a killed run leaves at worst unfilled slots, which are recomputed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from growlm.model import GrowLM


class TrunkCache:
    """Activations after the first ``depth`` blocks for every (source, sequence) of a stage's data."""

    def __init__(self, root: Path, key: str, n_sequences: list[int], context: int, d_model: int, depth: int) -> None:
        self.depth = depth
        self.offsets = np.concatenate([[0], np.cumsum(n_sequences)]).astype(np.int64)
        n = int(self.offsets[-1])
        root.mkdir(parents=True, exist_ok=True)
        stem = root / f"trunk-{key[:16]}-d{depth}-{n}x{context}x{d_model}"
        mode = "r+" if stem.with_suffix(".f32").exists() else "w+"
        self.values = np.memmap(stem.with_suffix(".f32"), dtype=np.float32, mode=mode, shape=(n, context, d_model))
        self.filled = np.memmap(stem.with_suffix(".filled"), dtype=np.bool_, mode=mode, shape=(n,))
        self.hits = self.misses = 0

    def trunk(self, model: GrowLM, x: torch.Tensor, ids: list[tuple[int, int]]) -> torch.Tensor:
        """The trunk output for batch ``x`` whose rows are the sequences ``ids``: read, or compute and store."""
        flat = np.array([self.offsets[s] + q for s, q in ids], dtype=np.int64)
        have = self.filled[flat]
        if have.all():
            self.hits += len(flat)
            return torch.from_numpy(np.ascontiguousarray(self.values[flat])).to(x.device)
        h = model.trunk(x, self.depth)
        new = flat[~have]
        self.values[new] = h[torch.from_numpy(~have).to(h.device)].float().cpu().numpy()
        self.filled[new] = True  # after the values: an interrupted write leaves the slot unfilled
        self.hits += int(have.sum())
        self.misses += len(new)
        return h
