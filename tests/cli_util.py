"""Helpers for tests that drive the ``growlm`` command line as a user would, and check what it leaves.

``growlm(...)`` runs a command in this process (``cli.main``: the same parser, handlers and exit codes as the
console script, without a Python start-up and a torch import per call). ``growlm_process(...)`` runs it in a
child process: only for guarantees that need one (kill -9, signals, resource limits, a lock held by another
process, torchrun, the console script itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from growlm import cli
from growlm.hashing import sha256_file

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
    """``d/plan.toml`` with ``text``, beside copies of the corpus's train.txt and valid.txt."""
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


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def growlm(*args: str, env: dict | None = None, cwd: Path | str | None = None,
           check: bool = False) -> subprocess.CompletedProcess:
    """``growlm ARGS`` in this process: its exit code (argparse's usage errors included), stdout and stderr,
    as a child's would be. ``env`` is set for the call; a fault that kills or signals the process needs
    :func:`growlm_process`."""
    env = env or {}
    fault = env.get("GROWLM_FAULT", "")
    assert not fault.startswith(("kill", "sig")), "a fault that kills or signals needs growlm_process"
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with _environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    r = subprocess.CompletedProcess(["growlm", *argv], rc, out.getvalue(), err.getvalue())
    if check:
        r.check_returncode()
    return r


def growlm_process(*args: str, env: dict | None = None, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """``python -m growlm ARGS`` in a child process, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "growlm", *map(str, args)], capture_output=True, text=True,
                          env=child_env(**(env or {})), check=check, **kw)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """The command failed with exit code 2 and exactly one ``growlm: error:`` line naming every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("growlm: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` by relative path, links not followed: a file's sha256 and mode, a link's
    target, a dir, another kind (a FIFO, say). Equal snapshots: nothing was written, made, removed or changed."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                s = os.lstat(p)
            except OSError:  # removed while walked
                continue
            key = os.path.relpath(p, root)
            if stat.S_ISREG(s.st_mode):
                snap[key] = ("f", sha256_file(Path(p)), stat.S_IMODE(s.st_mode))
            elif stat.S_ISLNK(s.st_mode):
                snap[key] = ("l", os.readlink(p))
            elif stat.S_ISDIR(s.st_mode):
                snap[key] = ("d",)
            else:
                snap[key] = ("o", stat.S_IFMT(s.st_mode))
    return snap


def tensors_equal(a: Path, b: Path) -> bool:
    """The two safetensors files hold the same names and bit-identical tensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
