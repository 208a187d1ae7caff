"""Data at scale (issue 28), side by side in one run: ``growlm data prepare`` at 1 and 2 workers, today's
in-training tokenizer path and the ``tokenizers`` library's own ``encode_batch`` on the same text; the loader's
tokens/s over 1 billion prepared tokens against what the paper-9l step consumes on an H200; and the peak RSS of a
training process over those tokens against the same process over a small prepared set.

The text: JSONL files of mixed English/Russian/Chinese documents (about 2 KB each, built deterministically from
varied sentences), tokenized with the paper's 65,536-id vocabulary (``bvv241-2-3``). The 1B tokens are synthetic:
one block of random ids written as every shard (2 GB on disk for 1B tokens: free space is checked first), with a
real manifest and sha256s. Everything is written under ``--dir`` and removed at the end.

    python bench/prepare_speed.py [--mb 32] [--files 8] [--tokens 1e9] [--steps 20] [--repeats 2] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from growlm import data
from growlm.data import Batches, Source, tokenize_file
from growlm.prepare import prepare
from growlm.shards import (
    Manifest,
    PrepareOptions,
    ShardRecord,
    SplitRecord,
    TokenizerRecord,
    Totals,
    write_manifest,
)
from growlm.tokenizer import Tokenizer, build_preset

H200_STEP_TOKENS_PER_S = 254_234  # paper-9l-unicode monolithic step on one H200 (bench/README.md)
V3_TOKENS = 68.9e9  # the paper's v3 run
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A model grows layer by layer on a frozen substrate.",
    "Researchers published the results of their experiments yesterday.",
    "The committee will meet again next Thursday to discuss the budget.",
    "She walked along the river, thinking about the letter she had received.",
    "Modern compilers perform aggressive optimisations on intermediate code.",
    "In 1969, astronauts first set foot on the surface of the Moon.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.", "Модель растёт слой за слоем на замороженной основе.",
    "Вчера исследователи опубликовали результаты своих экспериментов.",
    "Она шла вдоль реки и думала о письме, которое получила утром.",
    "我们的模型一层一层地生长。", "冻结的基底是共享的接口。", "研究人员昨天发表了他们的实验结果。",
]


def write_corpus(d: Path, files: int, mb: float) -> list[Path]:
    """``files`` JSONL files of about ``mb`` MB in all: documents of 10-30 random sentences."""
    rng = random.Random(0)
    out = []
    for i in range(files):
        p = d / f"part-{i:02d}.jsonl"
        size = 0
        with open(p, "w", encoding="utf-8") as f:
            while size < mb * 1e6 / files:
                line = json.dumps({"text": " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(10, 30)))},
                                  ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
        out.append(p)
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def synthetic(d: Path, tok: Tokenizer, tokens: int, shard_tokens: int = 1 << 26) -> Path:
    """A prepared folder of ``tokens`` synthetic tokens, with its manifest: one block of random ids, drawn once and
    written as every shard (fast: the page cache's write speed; all-zero holes would train a degenerate model)."""
    (d / "train").mkdir(parents=True)
    block = np.random.default_rng(0).integers(0, tok.vocab_size, size=min(shard_tokens, tokens), dtype=np.uint16)
    shards, digests = [], {}
    left, k = tokens, 0
    while left > 0:
        n = min(shard_tokens, left)
        f = d / "train" / f"{k:05d}.u16"
        f.write_bytes(memoryview(block[:n]))
        if n not in digests:
            digests[n] = hashlib.sha256(memoryview(block[:n])).hexdigest()
        shards.append(ShardRecord(file=f"train/{k:05d}.u16", tokens=n, documents=0, sha256=digests[n]))
        left, k = left - n, k + 1
    split = SplitRecord(tokens=tokens, documents=0, shards=shards)
    write_manifest(d, Manifest(
        tokenizer=TokenizerRecord(fingerprint=tok.fingerprint, vocab_size=tok.vocab_size, eos_id=tok.eos_id, path="-"),
        token_bytes=2, sources=[], splits={"train": split},
        totals=Totals(tokens=tokens, documents=0, shards=len(shards), source_bytes=0),
        options=PrepareOptions(shuffle=False, valid_fraction=0.0, tasks=len(shards)), command="bench/prepare_speed.py",
        datatrove="-"))
    return d


def loader_rate(d: Path, tok: Tokenizer, cache: Path, batches: int) -> tuple[float, float]:
    """Seconds to open a prepared folder (its checks: the first time, the sha256 of every shard) and the tokens/s
    of Batches.next() over it, at paper-9l's context and batch (1,024 x 192)."""
    t0 = time.perf_counter()
    b = Batches([Source([d])], tok, context=1024, batch_size=192, seed=0, cache_dir=cache)
    opened = time.perf_counter() - t0
    for _ in range(3):
        b.next()
    t = timed(lambda: [b.next() for _ in range(batches)])
    return opened, batches * b.tokens_per_batch / t


RSS_CHILD = """
import json, resource, sys
from growlm.training import train
train(sys.argv[1], sys.argv[2], progress=False, log=lambda _: None)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def training_rss(tmp: Path, name: str, data_dir: Path, tok_dir: Path, steps: int) -> float:
    """Peak RSS (MB) of a process training a small model for ``steps`` steps on ``data_dir``."""
    plan = tmp / f"{name}.toml"
    plan.write_text(f"""[substrate]\nkind = "binary"\nbits = 16\n[tokenizer]\ndir = "{tok_dir}"\n[model]
d_model = 128\nn_heads = 4\ncontext = 1024\n[data]\ntrain = ["{data_dir}"]\n[train]\nbatch_size = 8\ndevice = "cpu"
checkpoint_every = 1000\n[[stage]]\ngrow = 2\ntokens = {steps * 8 * 1024}\n""")
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(plan), str(tmp / f"run-{name}")], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["maxrss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=32, help="MB of JSONL text to tokenize")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tokens", type=float, default=1e9, help="synthetic prepared tokens for the loader and RSS")
    ap.add_argument("--steps", type=int, default=20, help="training steps of each RSS process")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir); removed at the end")
    ap.add_argument("--quick", action="store_true", help="4 MB, 50M tokens, 4 steps, 1 repeat")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.mb, a.tokens, a.steps, a.repeats = 4, 5e7, 4, 1
    tmp = Path(tempfile.mkdtemp(prefix="growlm-prepare-bench-", dir=a.dir))
    free = shutil.disk_usage(tmp).free
    if free < 2 * a.tokens * 1.2 + 2e9:
        raise SystemExit(f"{tmp}: {free / 1e9:.0f} GB free, {2 * a.tokens / 1e9:.1f} GB of synthetic shards would not fit")
    try:
        res = run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"] = {"cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "free_disk_gb": round(free / 1e9)}
    res["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(res, indent=None if a.json else 2))


def run(a: argparse.Namespace, tmp: Path) -> dict:
    tok = build_preset("bvv241-2-3")
    tok_dir = tok.save(tmp / "tok")
    files = write_corpus(tmp, a.files, a.mb)
    mb = sum(f.stat().st_size for f in files) / 1e6
    quiet = dict(log=lambda _: None)
    times: dict[str, list[float]] = {"prepare_1": [], "prepare_2": [], "in_training": [], "encode_batch": [],
                                     "encode_batch_fast": []}
    texts = [json.loads(line)["text"] for f in files for line in f.open(encoding="utf-8")]
    n_tokens = 0
    for r in range(a.repeats):  # interleaved, so a busier moment weighs on every path alike
        for w in (1, 2):
            out = tmp / f"prep-{w}-{r}"
            with contextlib.redirect_stdout(io.StringIO()):  # each task's progress line
                times[f"prepare_{w}"].append(timed(lambda w=w, out=out: prepare(files, tok_dir, out, workers=w, **quiet)))
            n_tokens = json.loads((out / "manifest.json").read_text())["totals"]["tokens"]
            shutil.rmtree(out)
        cache = tmp / f"cache-{r}"
        times["in_training"].append(timed(lambda cache=cache: [tokenize_file(f, tok, cache) for f in files]))
        shutil.rmtree(cache)
        backend = tok._tok  # the tokenizers.Tokenizer itself: its batch calls over every document, on all cores
        times["encode_batch"].append(timed(lambda backend=backend, texts=texts: backend.encode_batch(texts, add_special_tokens=False)))
        times["encode_batch_fast"].append(timed(lambda backend=backend, texts=texts: backend.encode_batch_fast(texts, add_special_tokens=False)))
    med = {k: float(np.median(v)) for k, v in times.items()}
    rate = {k: n_tokens / v for k, v in med.items()}
    per_core = rate["prepare_1"]
    efficiency = rate["prepare_2"] / (2 * per_core)
    out: dict = {
        "text_mb": round(mb, 1), "tokens": n_tokens, "seconds": {k: round(v, 2) for k, v in med.items()},
        "tokens_per_s": {k: round(v) for k, v in rate.items()},
        "mb_per_s": {k: round(mb / v, 2) for k, v in med.items()},
        "scaling_efficiency_2_workers": round(efficiency, 3),
        "v3_prepare_minutes": {  # an extrapolation: the measured per-core rate and 2-worker efficiency held at scale
            "one_64_core_node": round(V3_TOKENS / (64 * per_core * efficiency) / 60, 1),
            "eight_64_core_nodes": round(V3_TOKENS / (8 * 64 * per_core * efficiency) / 60, 1),
        },
    }
    del texts
    # the loader and the training process over synthetic prepared tokens
    big = synthetic(tmp / "big", tok, int(a.tokens))
    small = synthetic(tmp / "small", tok, 1 << 22)
    cache = tmp / "loader-cache"
    verify_s, rate = loader_rate(big, tok, cache, 100)
    loader = {"materialised_order": rate}
    old, data.MATERIALISE_MAX = data.MATERIALISE_MAX, 0  # the order of a source above 4M sequences
    try:
        reopen_s, loader["feistel_order"] = loader_rate(big, tok, cache, 100)
    finally:
        data.MATERIALISE_MAX = old
    goal = 20 * H200_STEP_TOKENS_PER_S
    out["loader"] = {"tokens_per_s": {k: round(v) for k, v in loader.items()}, "goal_tokens_per_s": goal,
                     "ratio_to_h200_step": {k: round(v / H200_STEP_TOKENS_PER_S, 1) for k, v in loader.items()},
                     "first_open_s": round(verify_s, 2), "reopen_s": round(reopen_s, 3)}
    rss_small = training_rss(tmp, "small", small, tok_dir, a.steps)
    rss_big = training_rss(tmp, "big", big, tok_dir, a.steps)
    out["training_rss_mb"] = {"prepared_tokens": int(a.tokens), "big": round(rss_big), "small_4M_tokens": round(rss_small),
                              "above_small": round(rss_big - rss_small), "goal_above_mb": 1024}
    return out


if __name__ == "__main__":
    main()
