"""Visual Unicode glyph substrate (paper §2.2): render → augment → polar-snake bits → PCA → L2.

Rendering follows the bvv241-2-3 builder notebook: GNU Unifont at size 32, one 32×32 cell per
character, each character centred in its cell, the fixed-seed augmentation (easy scripts: ±4°,
±2 px, 1 % noise, blur 0.5; complex scripts: 0.1 % noise only), multi-character strips squeezed
back to one cell by Pillow's "BILINEAR" request on a mode-"1" image (which Pillow performs as
NEAREST), and the 1,024 pixels read in polar-snake order (sorted by (r, θ, x, y)), ink = 1.

Where this module departs from the paper, on purpose:

* **Basis.** The paper fits PCA on its own vocabulary, which makes a token's vector depend on
  every other token. By default (``basis="reference"``) the PCA basis is fitted once on a fixed
  reference set — the bit vectors of all 65,536 BMP code points ``chr(0)..chr(0xFFFF)`` — and
  every token is projected on it, so a token's vector is a function of its string alone (a
  compact vocabulary gets exactly the vectors of the full one). ``basis="vocab"`` is the
  paper-exact variant. The reference basis (and the reference bits, which the full code-point
  vocabulary reuses) is cached on disk under ``$GROWLM_CACHE`` or ``~/.cache/growlm``.
* **PCA numerics.** Covariance in float64 (the Gram matrix of 0/1 bits is exact integer
  arithmetic) and ``numpy.linalg.eigh``; components sorted by decreasing variance, each signed so
  that its largest-magnitude loading is positive (sklearn's ``svd_flip`` convention). No
  whitening. Reference components are rounded to a 2^-40 grid, so each dot product with a 0/1
  bit vector is exact in float64 whatever the BLAS summation order: the vector of a string is
  bit-identical whichever rows share its batch.
* **dim ≠ 1,024.** ``dim < 1024`` keeps the top ``dim`` components; ``dim > 1024`` (the cell has
  only 1,024 pixels) zero-pads the components before normalisation. With ``basis="vocab"`` at
  most ``V`` components are taken and the rest zero-padded too.
* **Font.** The installed Unifont OTF (Debian ``fonts-unifont``) replaces the paper's Unifont
  14.0.01 TTF; its sha256 is recorded. ``ImageFont.Layout.BASIC`` is used because the default
  Raqm layout crashes on some control characters. Unrenderable characters (lone surrogates)
  leave a blank cell, as in the paper; the empty string is a blank cell. As in the paper, inkless
  strings of one script class (space, newline, other controls) share one noise-only bitmap and
  hence one vector.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from safetensors import safe_open
from safetensors.numpy import save as _save_np

from growlm.errors import GrowlmError
from growlm.files import atomic_write_bytes
from growlm.hashing import canonical_json, sha256_file
from growlm.substrate.base import Substrate, make_substrate
from growlm.substrate.registry import Params, Vocab, register

DEFAULT_FONT = "/usr/share/fonts/opentype/unifont/unifont.otf"
FONT_HINT = "install it with: apt-get install -y --no-install-recommends fonts-unifont"
CELL = 32
PIXELS = CELL * CELL
REFERENCE_SIZE = 0x10000
BASES = ("reference", "vocab")

# Everything that shapes the bit vectors or the basis; hashed into the cache name and the recipe.
GLYPH_PARAMS: dict = {
    "version": 1,
    "cell": CELL,
    "font_size": 32,
    "layout_engine": "basic",
    "augment": "bvv241-2-3",
    "augment_seed": 42,
    "easy": {"rotation": 4.0, "shift": 2, "noise": 0.01, "blur": 0.5},
    "complex": {"rotation": 0.0, "shift": 0, "noise": 0.001, "blur": 0.0},
    "multi_char_resize": "nearest",
    "order": "polar-snake",
    "pca": "cov-f64-eigh",
    "normalise": "l2",
    "pad": "zeros",
    "reference": "bmp-65536",
}

# Serial rendering below this many strings: starting worker processes costs more than it saves.
_PARALLEL_MIN = 4096
_COMPONENT_GRID = 2.0**-40


def resolve_font(font_path: str | Path | None) -> Path:
    """The font to render with: ``font_path``, else ``$GROWLM_FONT``, else the Debian Unifont; a file
    Pillow reads as a font, or a one-line error naming the setting it came from."""
    env = os.environ.get("GROWLM_FONT")
    path = Path(font_path or env or DEFAULT_FONT)
    source = "font_path" if font_path else "$GROWLM_FONT" if env else "the default font"
    if not path.exists():
        # the install hint only helps when the missing font is the one growlm looks for by default
        hint = f"; {FONT_HINT}" if source == "the default font" else ""
        raise GrowlmError(f"font not found: {path} ({source}){hint}")
    if not path.is_file():
        raise GrowlmError(f"{source} {path} is not a font file (a directory or a special file)")
    try:
        ImageFont.truetype(str(path), GLYPH_PARAMS["font_size"], layout_engine=ImageFont.Layout.BASIC)
    except OSError as e:
        raise GrowlmError(f"{source} {path} is not a font Pillow can read ({e})") from None
    return path


def cache_dir() -> Path:
    """Where the reference basis is cached: ``$GROWLM_CACHE`` or ``~/.cache/growlm``."""
    env = os.environ.get("GROWLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "growlm"


def _params_hash() -> str:
    return hashlib.sha256(canonical_json(GLYPH_PARAMS)).hexdigest()


def _is_easy(ch: str) -> bool:
    c = ord(ch)
    # Latin (incl. Ext-A/B), then Greek/Coptic, Cyrillic + Supplement, Armenian (contiguous).
    return c <= 0x024F or 0x0370 <= c <= 0x058F


def _polar_snake_index(cell: int = CELL) -> np.ndarray:
    """Flat (row-major) pixel indices in polar-snake order: sorted by (r, θ, x, y) about the centre."""
    c = cell / 2
    keyed = sorted(
        (math.hypot(x - c, y - c), math.atan2(y - c, x - c), x, y) for x in range(cell) for y in range(cell)
    )
    return np.array([y * cell + x for _, _, x, y in keyed], dtype=np.int64)


@dataclass(frozen=True)
class _Augment:
    angle: float
    dx: int
    dy: int
    noise: float
    blur: float


def _augment(params: dict) -> _Augment:
    # The notebook re-seeds random/np.random with 42 inside every call, so every token of one
    # class gets the same draws: compute them once from a private generator with the same stream.
    rng = random.Random(GLYPH_PARAMS["augment_seed"])
    angle = rng.uniform(-params["rotation"], params["rotation"])
    dx = rng.randint(-params["shift"], params["shift"])
    dy = rng.randint(-params["shift"], params["shift"])
    return _Augment(angle, dx, dy, params["noise"], params["blur"])


class GlyphRenderer:
    """Renders strings to 1,024-bit polar-snake vectors (bool), reproducing the notebook exactly."""

    def __init__(self, font_path: str | Path) -> None:
        self.font = ImageFont.truetype(
            str(font_path), GLYPH_PARAMS["font_size"], layout_engine=ImageFont.Layout.BASIC
        )
        self.easy = _augment(GLYPH_PARAMS["easy"])
        self.complex = _augment(GLYPH_PARAMS["complex"])
        self.order = _polar_snake_index()
        self._uniform: dict[int, np.ndarray] = {}

    def _noise_mask(self, width: int, noise: float) -> np.ndarray:
        # np.random.seed(42); np.random.rand(H, W) — the same for every token of a given width.
        u = self._uniform.get(width)
        if u is None:
            u = self._uniform[width] = np.random.RandomState(GLYPH_PARAMS["augment_seed"]).rand(CELL, width)
        return u < noise

    def bits(self, token: str) -> np.ndarray:
        """The token's 1,024 bits (True = ink) in polar-snake order."""
        if not token:
            return np.zeros(PIXELS, dtype=bool)
        width = CELL * len(token)
        img = Image.new("L", (width, CELL), 255)
        draw = ImageDraw.Draw(img)
        for i, ch in enumerate(token):
            try:
                left, top, right, bottom = self.font.getbbox(ch)
                x = i * CELL + (CELL - (right - left)) // 2
                y = (CELL - (bottom - top)) // 2 - top
                draw.text((x, y), ch, font=self.font, fill=0)
            except Exception:  # the paper swallows drawing errors: the cell stays blank
                pass
        aug = self.easy if all(_is_easy(ch) for ch in token) else self.complex
        if aug.angle:
            img = img.rotate(aug.angle, expand=0, fillcolor=255)
        if aug.dx or aug.dy:
            shifted = Image.new("L", img.size, 255)
            shifted.paste(img, (aug.dx, aug.dy))
            img = shifted
        arr = np.array(img)
        arr[self._noise_mask(width, aug.noise)] = 0
        img = Image.fromarray(arr)
        if aug.blur:
            img = img.filter(ImageFilter.GaussianBlur(aug.blur))
        ink = np.asarray(img) < 128
        if width != CELL:
            # The notebook asks for BILINEAR on the thresholded mode-"1" image; Pillow does NEAREST.
            white = Image.fromarray(~ink)
            ink = ~np.asarray(white.resize((CELL, CELL), Image.Resampling.BILINEAR))
        return ink.reshape(-1)[self.order]

    def packed(self, tokens: list[str]) -> np.ndarray:
        """``[N, 128]`` uint8: the bits of each token, packed (MSB-first within each byte)."""
        out = np.zeros((len(tokens), PIXELS // 8), dtype=np.uint8)
        for i, t in enumerate(tokens):
            out[i] = np.packbits(self.bits(t))
        return out


_worker: GlyphRenderer | None = None


def _init_worker(font_path: str) -> None:
    global _worker
    _worker = GlyphRenderer(font_path)


def _render_chunk(tokens: list[str]) -> np.ndarray:
    assert _worker is not None
    return _worker.packed(tokens)


def render_packed(tokens: list[str], font_path: str | Path, workers: int | None = None) -> np.ndarray:
    """Packed bits ``[N, 128]`` uint8 of ``tokens``, rendered over ``workers`` processes
    (default ``os.cpu_count()``; serial for small inputs or ``workers <= 1``)."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers <= 1 or len(tokens) < _PARALLEL_MIN:
        return GlyphRenderer(font_path).packed(tokens)
    size = max(256, min(4096, -(-len(tokens) // (workers * 8))))
    chunks = [tokens[i : i + size] for i in range(0, len(tokens), size)]
    # fork avoids re-importing torch in every worker; workers use only Pillow and numpy.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=(str(font_path),),
    ) as ex:
        parts = list(ex.map(_render_chunk, chunks))
    return np.concatenate(parts) if parts else np.zeros((0, PIXELS // 8), dtype=np.uint8)


def _unpack(packed: np.ndarray, dtype: type) -> np.ndarray:
    return np.unpackbits(packed, axis=1).astype(dtype)


def fit_pca(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of 0/1 bit vectors: ``(mean [1024], components [1024, 1024] as columns, variances)``,
    by decreasing variance, each component signed so its largest-|.| loading is positive."""
    n = packed.shape[0]
    gram = np.zeros((PIXELS, PIXELS), dtype=np.float64)
    total = np.zeros(PIXELS, dtype=np.float64)
    for a in range(0, n, 8192):
        x = _unpack(packed[a : a + 8192], np.float32)
        # float32 is exact here (integer counts ≤ 8192 < 2^24) and twice as fast as float64.
        gram += (x.T @ x).astype(np.float64)
        total += x.sum(axis=0, dtype=np.float64)
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / max(n - 1, 1)
    variances, vectors = np.linalg.eigh(cov)
    variances, vectors = variances[::-1].copy(), vectors[:, ::-1].copy()
    peak = vectors[np.abs(vectors).argmax(axis=0), np.arange(PIXELS)]
    vectors *= np.where(peak < 0, -1.0, 1.0)
    return mean, vectors, variances


def project(packed: np.ndarray, mean: np.ndarray, components: np.ndarray, dim: int) -> np.ndarray:
    """Centre, rotate onto the first ``dim`` components (zero-padding past the last one) and
    L2-normalise each row; float32 ``[N, dim]``. An all-zero row stays zero."""
    k = min(dim, components.shape[1])
    comps = components[:, :k]
    offset = mean @ comps
    out = np.zeros((packed.shape[0], dim), dtype=np.float32)
    for a in range(0, packed.shape[0], 4096):
        y = _unpack(packed[a : a + 4096], np.float64) @ comps - offset
        norm = np.sqrt(np.square(y).sum(axis=1, keepdims=True))
        out[a : a + 4096, :k] = y / np.where(norm > 0, norm, 1.0)
    return out


@dataclass
class ReferenceBasis:
    """The PCA basis fitted on all 65,536 BMP code points, plus their packed bits."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    bits: np.ndarray  # [65536, 128] uint8, row i = chr(i)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the cache file."""
        return {
            "mean": self.mean,
            "components": self.components,
            "variances": self.variances,
            "bits": self.bits,
        }


def _arrays_sha(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(canonical_json([name, str(a.dtype), list(a.shape)]))
        h.update(a.tobytes())
    return h.hexdigest()


def reference_basis_path(font_sha256: str) -> Path:
    """Cache file of the reference basis for a font and the current glyph parameters."""
    return cache_dir() / f"glyph-basis-{font_sha256[:16]}-{_params_hash()[:16]}.safetensors"


def _read_cached(path: Path) -> ReferenceBasis | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            recorded = (f.metadata() or {}).get("sha256")
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 — safe_open is not iterable
    except Exception:  # an unreadable cache is simply rebuilt
        return None
    if recorded != _arrays_sha(arrays) or set(arrays) != {"mean", "components", "variances", "bits"}:
        return None
    shapes = (arrays["bits"].shape, arrays["components"].shape)
    if shapes != ((REFERENCE_SIZE, PIXELS // 8), (PIXELS, PIXELS)):
        return None
    return ReferenceBasis(**arrays)


def reference_basis(font_path: Path, font_sha256: str, workers: int | None = None) -> ReferenceBasis:
    """Load the cached reference basis, or render the 65,536 BMP code points, fit it and cache it."""
    path = reference_basis_path(font_sha256)
    if path.is_file() and (cached := _read_cached(path)) is not None:
        return cached
    bits = render_packed([chr(i) for i in range(REFERENCE_SIZE)], font_path, workers)
    mean, components, variances = fit_pca(bits)
    # On a 2^-40 grid every partial sum of a 0/1-weighted dot product is exact in float64, so a
    # token's projection cannot depend on BLAS blocking, i.e. on which other rows share its batch.
    components = np.round(components / _COMPONENT_GRID) * _COMPONENT_GRID
    basis = ReferenceBasis(mean, components, variances, bits)
    arrays = basis.to_arrays()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _save_np(arrays, metadata={"sha256": _arrays_sha(arrays)}))
    except OSError:
        pass  # an unwritable cache only costs the next build the same rendering time
    return basis


def _vocab_bits(
    tokens: list[str], font_path: Path, workers: int | None, ref: ReferenceBasis | None
) -> np.ndarray:
    """Packed bits of every token; single BMP characters come from the reference bits when known."""
    out = np.zeros((len(tokens), PIXELS // 8), dtype=np.uint8)
    todo: list[int] = []
    for i, t in enumerate(tokens):
        if ref is not None and len(t) == 1 and ord(t) < REFERENCE_SIZE:
            out[i] = ref.bits[ord(t)]
        else:
            todo.append(i)
    if todo:
        out[todo] = render_packed([tokens[i] for i in todo], font_path, workers)
    return out


def build_glyph(
    tokens: list[str],
    *,
    dim: int,
    font_path: str | None = None,
    workers: int | None = None,
    basis: str = "reference",
    tokenizer_fingerprint: str | None = None,
) -> Substrate:
    """Glyph substrate ``[V, dim]`` (lift 1) for the token strings ``tokens`` (id order)."""
    if basis not in BASES:
        raise GrowlmError(f"unknown glyph basis {basis!r}; choose one of: {', '.join(BASES)}")
    if not tokens:
        raise GrowlmError("glyph substrate needs a non-empty vocabulary")
    font = resolve_font(font_path)
    font_sha = sha256_file(font)
    if basis == "reference":
        ref = reference_basis(font, font_sha, workers)
        table = project(_vocab_bits(tokens, font, workers, ref), ref.mean, ref.components, dim)
    else:
        packed = _vocab_bits(tokens, font, workers, None)
        mean, components, _ = fit_pca(packed)
        # sklearn's PCA cannot return more components than samples; keep at most V, pad the rest.
        table = project(packed, mean, components[:, : min(len(tokens), PIXELS)], dim)
    recipe = {
        "kind": "glyph",
        "dim": dim,
        "bits": PIXELS,
        "seed": None,
        "params": GLYPH_PARAMS,
        "basis": basis,
        "font_sha256": font_sha,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": len(tokens),
    }
    return make_substrate("glyph", torch.from_numpy(table), 1, recipe)


class GlyphParams(Params):
    """``font_path`` (default: the bundled font; in a plan, relative to the plan file), ``workers``
    (rendering processes), ``basis`` (``"reference"`` or ``"vocab"``, see :func:`build_glyph`)."""

    font_path: str | Path | None = None
    workers: int | None = None
    basis: str = "reference"


def _glyph(vocab: Vocab, *, dim: int, font_path: str | Path | None, workers: int | None, basis: str) -> Substrate:
    strings = vocab.strings("it renders the token strings")
    return build_glyph(strings, dim=dim, font_path=font_path, workers=workers, basis=basis,
                       tokenizer_fingerprint=vocab.fingerprint)


register("glyph", _glyph, GlyphParams)
