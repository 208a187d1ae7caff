"""Streaming, validated reading of UTF-8 text corpora.

Corpora can be large (a 100 MB file that is one single line is fine), so text is read in bounded
chunks and decoded incrementally: a multi-byte character split across two reads is carried over,
never broken. Every problem with a corpus file raises :class:`GrowlmError` with a one-line message
naming the file (and, for bad UTF-8, the first invalid byte and its offset in the file).
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from growlm.errors import GrowlmError

_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def regular_file(path: str | Path, what: str) -> os.stat_result:
    """The ``stat`` of ``path`` after checking that it names an existing regular file (symlinks followed).

    A FIFO, socket or device would block a reader forever or never end, so each is refused in one
    line naming the file, before anything opens it. ``what`` names the role in messages
    (``"corpus file"`` gives ``corpus file not found: PATH``).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise GrowlmError(f"{what} not found: {p}") from None
    except OSError as e:  # a symlink loop, a component that is a file, no permission
        raise GrowlmError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GrowlmError(f"{what} {p} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _SPECIAL_KINDS if test(st.st_mode)), "a special file")
        raise GrowlmError(f"{what} {p} is {kind}, not a regular file; only regular files are read")
    return st


def _open_checked(path: str | Path, what: str) -> Path:
    """The path, after checking that it names a non-empty regular file."""
    p = Path(path)
    if regular_file(p, what).st_size == 0:
        raise GrowlmError(f"{what} is empty: {p}")
    return p


def iter_text_chunks(path: str | Path, chunk_chars: int = 1 << 20, what: str = "corpus file") -> Iterator[str]:
    """Yield the text of a UTF-8 file in order, in chunks of at most ``chunk_chars`` characters.

    Memory stays bounded by the chunk size whatever the line lengths. Raises :class:`GrowlmError`
    if the file is missing, empty or not valid UTF-8 (the error names the first bad byte and its
    byte offset), or if it is not a regular file (see :func:`regular_file`); messages call it
    ``what``. Errors surface lazily, when the offending chunk is reached.
    """
    if chunk_chars < 1:
        raise GrowlmError(f"chunk_chars must be positive, got {chunk_chars}")
    p = _open_checked(path, what)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    fed = 0  # bytes handed to the decoder so far
    try:
        f = open(p, "rb")  # noqa: SIM115 (closed by the with below; open errors need their own message)
    except OSError as e:
        raise GrowlmError(f"cannot read {what} {p}: {e.strerror or e}") from None
    with f:
        while True:
            # A read of n bytes never decodes to more than n characters, so chunks stay bounded.
            block = f.read(chunk_chars)
            final = not block
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character carried over
            try:
                text = decoder.decode(block, final)
            except UnicodeDecodeError as e:
                # The decoder reports positions within (carried-over bytes + this block).
                offset = fed - pending + e.start
                raise GrowlmError(
                    f"{what} {p} is not UTF-8: invalid byte 0x{e.object[e.start]:02x} at byte offset {offset}"
                ) from None
            fed += len(block)
            if text:
                yield text
            if final:
                return


def read_text(path: str | Path) -> str:
    """The whole text of a small, validated UTF-8 corpus file (use :func:`iter_text_chunks` for big ones)."""
    return "".join(iter_text_chunks(path))
