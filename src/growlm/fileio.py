"""All-or-nothing file writes, and descriptor reads with one-line errors.

Every artefact growlm writes (weights, shards, checkpoints, descriptors) goes through a temp file
or temp dir beside its final name and appears by an atomic rename, so a crash, a kill or a full
disk never leaves a half-written file that looks valid; the partial temp file is removed and the
error says which file could not be written and why.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from growlm.errors import GrowlmError


class WriteError(GrowlmError):
    """A file could not be written (disk full, file too large, permissions); nothing was replaced."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"could not write {path}: {reason}; nothing was replaced")
        self.path, self.reason = path, reason


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temp file beside ``path`` for binary writing; on success it replaces ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise WriteError(path, str(e.strerror or e)) from e
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, all or nothing."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place only when complete.

    An existing ``final`` is never touched: completed artefacts are immutable.
    """
    final = Path(final)
    if final.exists():
        raise GrowlmError(f"refusing to overwrite existing {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.replace(tmp, final)
    except WriteError as e:  # name what the user asked for, not our temp dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(final / e.path.name, e.reason) from e
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(final, str(e.strerror or e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_descriptor(f: str | Path, fmt: str, what: str) -> dict:
    """A JSON descriptor whose ``format`` must be ``fmt``, or a one-line error naming the file."""
    f = Path(f)
    if not f.is_file():
        raise GrowlmError(f"{f.parent} is not a growlm {what} dir (no {f.name})")
    try:
        desc = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrowlmError(f"{f} is corrupt: {e}") from e
    if not isinstance(desc, dict) or desc.get("format") != fmt:
        raise GrowlmError(f"{f} is not a growlm {what} description")
    return desc


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written all or nothing (never a pickle)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))
