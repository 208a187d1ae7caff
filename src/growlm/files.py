"""All-or-nothing file writes, and descriptor reads with one-line errors.

Every artefact growlm writes (weights, shards, checkpoints, descriptors) goes through a temp file
or temp dir beside its final name and appears by an atomic rename, so a crash, a kill or a full
disk never leaves a half-written file that looks valid; the partial temp file is removed and the
error says which file could not be written and why.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
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


# A temp dir's name carries its owner: ``.NAME.HOST.PID.RANDOM.tmp``. A process killed mid-write
# (SIGKILL, OOM, power) cannot remove its own temp dir, so the next user of NAME removes the
# leftovers whose owner is provably gone: same host, and no such process any more.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TMP_RANDOM = 8


def _temp_dir_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{{{_TMP_RANDOM}}}\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_temp_dirs(final: str | Path) -> list[Path]:
    """Remove the temp dirs that killed writers of ``final`` left beside it; returns what was removed.

    Only dirs named by :func:`atomic_dir` for this very name, made on this host by a process that
    no longer exists, are removed: a live writer's temp dir (or another host's, on a shared disk)
    is never touched. A recycled PID only keeps a leftover a little longer.
    """
    final = Path(final)
    pattern = _temp_dir_pattern(final.name)
    removed = []
    with suppress(OSError):
        for entry in os.scandir(final.parent):
            m = pattern.fullmatch(entry.name)
            if (m and m["host"] == _HOST and not _pid_alive(int(m["pid"]))
                    and entry.is_dir(follow_symlinks=False)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


def _owned_temp_dir(final: Path) -> Path:
    """A fresh, empty temp dir beside ``final``, named for this process, once the leftovers of
    killed owners of the same name are gone. It gets the umask's mode like any other dir
    (tempfile.mkdtemp's 0700 would survive a rename and hide the artefact from everyone else)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(final)
        for _ in range(100):
            tmp = final.parent / f".{final.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(_TMP_RANDOM // 2)}.tmp"
            try:
                tmp.mkdir(mode=0o777)
            except FileExistsError:
                continue
            return tmp
    except OSError as e:
        raise WriteError(final, str(e.strerror or e)) from e
    raise WriteError(final, "could not create a temp dir beside it")


@contextmanager
def scratch_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A work dir ``.NAME.HOST.PID.RANDOM.tmp`` in ``parent``, removed on exit; one a killed
    process left under the same name is removed by the next user (see :func:`remove_stale_temp_dirs`)."""
    tmp = _owned_temp_dir(Path(parent) / name)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place only when complete.

    An existing ``final`` is never touched: completed artefacts are immutable. Temp dirs that
    killed writers of ``final`` left behind are removed first (see :func:`remove_stale_temp_dirs`).
    """
    final = Path(final)
    if final.exists():
        raise GrowlmError(f"refusing to overwrite existing {final}")
    tmp = _owned_temp_dir(final)
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
    except OSError as e:  # unreadable (permissions, an I/O error): said, not a traceback
        raise GrowlmError(f"cannot read {f}: {e.strerror or e}") from None
    if not isinstance(desc, dict) or desc.get("format") != fmt:
        raise GrowlmError(f"{f} is not a growlm {what} description")
    return desc


def check_tree(path: str | Path, what: str) -> None:
    """Refuse a ``what`` dir holding anything but regular files and dirs, naming the first offender.

    Artefact dirs are self-contained: a symlink would let verify vouch for, and merge or export copy
    out, a file that lives elsewhere and can change under the recorded checksums.
    """
    for root, dirs, files in os.walk(path):  # never descends into a symlinked dir: those are refused here
        for name in (*dirs, *files):
            f = Path(root, name)
            mode = os.lstat(f).st_mode
            if stat.S_ISLNK(mode):
                raise GrowlmError(f"{f} is a symlink; a {what} dir holds regular files and dirs only")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise GrowlmError(f"{f} is not a regular file; a {what} dir holds regular files and dirs only")


def check_name(name: object, where: str | Path) -> str:
    """``name`` if it is a plain relative path inside its dir (``a/b.json``; no absolute path, no
    ``..``, ``.`` or empty part, no backslash), else a one-line error naming ``where`` and the entry.
    Descriptors are data: a name must never reach a file outside the dir it describes."""
    if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise GrowlmError(f"{where} lists {name!r}, which is not a plain relative name inside its dir")
    return name


def field(desc: dict, key: str, kinds: tuple[type, ...], f: str | Path, within: str = "") -> Any:
    """``desc[key]`` when it has one of the JSON types ``kinds``, else a one-line error naming the
    file ``f`` and the key (as ``within`` + key; a bool is no number here, a float field takes an int)."""
    if key not in desc:
        raise GrowlmError(f"{f} is corrupt: {within}{key} is missing")
    value = desc[key]
    ok = any(isinstance(value, (int, float)) and not isinstance(value, bool) if k is float
             else isinstance(value, int) and not isinstance(value, bool) if k is int
             else isinstance(value, k) for k in kinds)
    if not ok:
        names = " or ".join({int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
                             dict: "an object", type(None): "null"}[k] for k in kinds)
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise GrowlmError(f"{f} is corrupt: {within}{key} is {shown}, not {names}")
    return value


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written all or nothing (never a pickle)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


# here, beside the writes it interrupts: a test kills a process halfway through writing a checkpoint
def fault_point(where: str, stage: int, step: int, phase: int | None = None) -> None:
    """Deterministic fault injection for the reliability tests.

    ``GROWLM_FAULT="kill@step:2:7"`` sends SIGKILL to this process after step 7 of stage 2
    (``kill@step:2.2:7``: of phase 2 of stage 2, for a stage of several phases);
    ``sigint@step:2:7`` sends SIGINT (Ctrl-C), ``sigterm@...`` SIGTERM; ``kill@checkpoint:2:6`` dies halfway through writing the
    step-6 checkpoint of stage 2. ``GROWLM_FAULT_RANK=R`` limits the fault to data-parallel rank R.
    Unset in normal use: the check is one dict lookup.
    """
    spec = os.environ.get("GROWLM_FAULT")
    if not spec or os.environ.get("GROWLM_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    action, _, point = spec.partition("@")
    if point == f"{where}:{stage if phase is None else f'{stage}.{phase}'}:{step}":
        sig = {"kill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[action]
        os.kill(os.getpid(), sig)
