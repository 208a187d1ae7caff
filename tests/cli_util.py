"""Helpers for tests that drive the real ``growlm`` command line as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

SMALL_PLAN = """\
[substrate]
kind = "binary"
bits = 16
[tokenizer]
corpus = ["train.txt"]
[model]
d_model = 32
n_heads = 2
context = 32
[data]
train = ["train.txt"]
valid = ["valid.txt"]
[train]
batch_size = 4
lr = 3e-3
seed = 0
checkpoint_every = 3
log_every = 2
[[stage]]
grow = 2
tokens = 1280
[[stage]]
grow = 1
tokens = 1280
lora = { rank = 2, blocks = "frozen", targets = ["qkv", "fc"] }
"""


def write_plan(d: Path, text: str, corpus_dir: Path) -> Path:
    for name in ("train.txt", "valid.txt"):
        (d / name).write_bytes((corpus_dir / name).read_bytes())
    plan = d / "plan.toml"
    plan.write_text(text)
    return plan


def child_env(*first: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a child that imports growlm from this checkout: ``first`` and
    ``src`` go before any PYTHONPATH already set (a GPU machine's carried packages, say), never instead."""
    path = [str(p) for p in (*first, REPO / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def growlm(*args: str, env: dict | None = None, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would."""
    e = child_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "growlm", *args], capture_output=True, text=True, env=e, check=check, **kw)


def tensors_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
