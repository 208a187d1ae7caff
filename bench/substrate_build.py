"""Benchmark: build the full 65,536-token glyph substrate at dim 1024, cold and with a cached basis.

    PYTHONPATH=src .venv/bin/python bench/substrate_build.py [--vocab bvv241-like|codepoints]
        [--dim 1024] [--workers N] [--json]

"cold" starts from an empty basis cache (renders the 65,536 reference code points, fits the PCA,
then renders the vocabulary's multi-character tokens); "cached" repeats the build with the basis
on disk. The goal is ≤ 120 s cold on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass

from growlm.substrate import build_substrate

V = 65536


@dataclass
class StandInTokenizer:
    """Just what build_substrate reads from a tokenizer."""

    strings: list[str]
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return len(self.strings)

    def token_strings(self) -> list[str]:
        return list(self.strings)


def codepoint_vocab() -> list[str]:
    """Every BMP code point as its own token: ``chr(i)`` for i < 65,536."""
    return [chr(i) for i in range(V)]


def bvv241_like_vocab() -> list[str]:
    """The bvv241-2-3 id layout (paper §2.1) with synthetic n-grams in the private slots: single
    code points at their own ids, 2-3 letter strings at the surrogate and 0xE100-0xF8FF ids,
    ``<special_token_{id}>`` in 0xE000-0xE0FF, ``<unused_65535>`` last."""
    letters = "etaoinshrdlucmfwypvbgkjqxzабвгдежзиклмнопрстуфхцчшщыэюя"
    ngrams = ("".join(p) for n in (2, 3) for p in itertools.product(letters, repeat=n))
    strings = [chr(i) for i in range(V)]
    for i in itertools.chain(range(0xD800, 0xE000), range(0xE100, 0xF900)):
        strings[i] = next(ngrams)
    for i in range(0xE000, 0xE100):
        strings[i] = f"<special_token_{i}>"
    strings[0xFFFF] = "<unused_65535>"
    return strings


def timed_build(tok: StandInTokenizer, dim: int, workers: int | None) -> tuple[float, str]:
    t0 = time.perf_counter()
    sub = build_substrate("glyph", dim=dim, tokenizer=tok, workers=workers)
    return time.perf_counter() - t0, sub.fingerprint


def main() -> None:
    """Run the benchmark and print a summary (or JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", choices=("bvv241-like", "codepoints"), default="bvv241-like")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    strings = bvv241_like_vocab() if args.vocab == "bvv241-like" else codepoint_vocab()
    tok = StandInTokenizer(strings, fingerprint=f"bench-{args.vocab}")
    old = os.environ.get("GROWLM_CACHE")
    with tempfile.TemporaryDirectory(prefix="growlm-bench-cache-") as cache:
        os.environ["GROWLM_CACHE"] = cache
        try:
            cold, fp_cold = timed_build(tok, args.dim, args.workers)
            cached, fp_cached = timed_build(tok, args.dim, args.workers)
        finally:
            if old is None:
                os.environ.pop("GROWLM_CACHE", None)
            else:
                os.environ["GROWLM_CACHE"] = old
    result = {
        "bench": "substrate_build",
        "kind": "glyph",
        "vocab": args.vocab,
        "vocab_size": len(strings),
        "multi_char_tokens": sum(len(s) != 1 for s in strings),
        "dim": args.dim,
        "cpus": os.cpu_count(),
        "workers": args.workers or os.cpu_count(),
        "cold_s": round(cold, 2),
        "cached_s": round(cached, 2),
        "same_fingerprint": fp_cold == fp_cached,
        "fingerprint": fp_cold,
        "goal_s": 120,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"glyph substrate V={result['vocab_size']} ({args.vocab}, {result['multi_char_tokens']} multi-char) "
            f"dim={args.dim} on {result['workers']} workers: cold {cold:.1f} s, cached basis {cached:.1f} s "
            f"(goal ≤ 120 s); fingerprints equal: {result['same_fingerprint']}"
        )


if __name__ == "__main__":
    main()
