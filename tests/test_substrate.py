"""Substrates: determinism, save/load verification, and the properties of each kind."""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from growlm.errors import GrowlmError
from growlm.substrate import KINDS, META_FILE, WEIGHT_FILE, GlyphRenderer, Substrate, build_substrate
from growlm.substrate import glyph as glyph_mod

FONT = glyph_mod.DEFAULT_FONT
needs_font = pytest.mark.skipif(not Path(FONT).is_file(), reason="GNU Unifont not installed")


@dataclass
class StubTokenizer:
    """Stand-in for growlm.tokenizer.Tokenizer: only what substrates use."""

    strings: list[str]
    fingerprint: str = "stub-tokenizer"
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.strings)

    def token_strings(self) -> list[str]:
        return list(self.strings)


SMALL = StubTokenizer(["<pad>", "a", "b", "th", "the", "中", "Ж", " ", "\n", "<unused_9>"])


def build(kind: str, **kw) -> Substrate:
    if kind == "glyph":
        kw.setdefault("tokenizer", SMALL)
    else:
        kw.setdefault("vocab_size", 300)
    kw.setdefault("dim", {"binary": 27, "random-bits": 128}.get(kind, 64))
    return build_substrate(kind, **kw)


# --- common contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_bytes_and_fingerprint(kind: str, tmp_path: Path) -> None:
    if kind == "glyph" and not Path(FONT).is_file():
        pytest.skip("GNU Unifont not installed")
    a, b = build(kind), build(kind)
    assert a.fingerprint == b.fingerprint
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    for name in (WEIGHT_FILE, META_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([WEIGHT_FILE, META_FILE])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    if kind == "glyph" and not Path(FONT).is_file():
        pytest.skip("GNU Unifont not installed")
    s = build(kind)
    s.save(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHT_FILE))
    assert list(tensors) == ["weight"]
    assert tensors["weight"].dtype == torch.float32
    assert tuple(tensors["weight"].shape) == (s.vocab_size, s.dim)
    meta = json.loads((tmp_path / META_FILE).read_text())
    expected = {
        "kind",
        "parameters",
        "recipe",
        "tokenizer_fingerprint",
        "fingerprint",
        "vocab_size",
        "dim",
        "lift",
    }
    assert expected <= set(meta)
    assert ("font_sha256" in meta) == (kind == "glyph")
    t = Substrate.load(tmp_path)
    assert (t.kind, t.lift, t.recipe, t.fingerprint) == (s.kind, s.lift, s.recipe, s.fingerprint)
    assert torch.equal(t.table, s.table)
    assert torch.equal(t.weight, s.weight)
    assert t.trainable == (kind == "trainable")


def test_load_detects_tampered_table(tmp_path: Path) -> None:
    build("trainable").save(tmp_path)
    w = load_file(str(tmp_path / WEIGHT_FILE))["weight"]
    w[3, 5] += 1e-3
    save_file({"weight": w}, str(tmp_path / WEIGHT_FILE))
    with pytest.raises(GrowlmError, match="fingerprint mismatch") as e:
        Substrate.load(tmp_path)
    assert "\n" not in str(e.value)


def test_load_detects_tampered_lifted_column(tmp_path: Path) -> None:
    s = build("binary")
    assert s.lift == 3
    s.save(tmp_path)
    w = load_file(str(tmp_path / WEIGHT_FILE))["weight"]
    w[7, 1] = 1.0 - w[7, 1]  # not a column the table is read from
    save_file({"weight": w}, str(tmp_path / WEIGHT_FILE))
    with pytest.raises(GrowlmError, match=WEIGHT_FILE):
        Substrate.load(tmp_path)


def test_load_detects_edited_recipe(tmp_path: Path) -> None:
    build("random-bits").save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["recipe"]["seed"] = 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GrowlmError, match="fingerprint mismatch"):
        Substrate.load(tmp_path)
    meta["recipe"]["seed"] = 0
    meta["dim"] = 64
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GrowlmError, match="does not match"):
        Substrate.load(tmp_path)
    meta["dim"], meta["parameters"] = 128, {}
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GrowlmError, match="inconsistent substrate metadata"):
        Substrate.load(tmp_path)


def test_load_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(GrowlmError, match="not found"):
        Substrate.load(tmp_path / "nope")
    build("binary").save(tmp_path)
    (tmp_path / WEIGHT_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(GrowlmError, match=f"corrupt substrate weights .*{WEIGHT_FILE}") as e:
        Substrate.load(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(GrowlmError, match=META_FILE):
        Substrate.load(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(GrowlmError, match=f"missing: .*{META_FILE}"):
        Substrate.load(tmp_path)


def test_unknown_kind_and_bad_arguments() -> None:
    with pytest.raises(GrowlmError, match="glyph, binary, random-bits, trainable"):
        build_substrate("pixels", dim=8, vocab_size=4)
    with pytest.raises(GrowlmError, match="dim"):
        build_substrate("binary", dim=0, vocab_size=4)
    with pytest.raises(GrowlmError, match="tokenizer or a vocab_size"):
        build_substrate("binary", dim=8)
    with pytest.raises(GrowlmError, match="needs a tokenizer"):
        build_substrate("glyph", dim=8, vocab_size=4)
    with pytest.raises(GrowlmError, match="disagrees"):
        build_substrate("binary", dim=4, tokenizer=SMALL, vocab_size=11)


# --- binary ----------------------------------------------------------------------------------------


def test_binary_code_properties() -> None:
    s = build_substrate("binary", dim=27, vocab_size=300)
    k = math.ceil(math.log2(300))
    assert s.table.shape == (300, k) and s.lift == 27 // k and s.dim == 27
    assert set(s.weight.unique().tolist()) <= {0.0, 1.0}
    assert torch.linalg.matrix_rank(s.weight).item() <= k
    assert s.table[5].tolist() == [0.0] * (k - 3) + [1.0, 0.0, 1.0]  # MSB first
    assert torch.equal(s.weight[:, :3], s.table[:, :1].expand(-1, 3))  # repeat_interleave lift
    assert len({tuple(r) for r in s.table.tolist()}) == 300


def test_binary_bits_and_errors() -> None:
    s = build_substrate("binary", dim=1024, tokenizer=SMALL, bits=16)
    assert s.table.shape == (10, 16) and s.lift == 64
    assert s.recipe["tokenizer_fingerprint"] == "stub-tokenizer"
    assert build_substrate("binary", dim=8, vocab_size=65536 // 4096).table.shape[1] == 4
    with pytest.raises(GrowlmError, match=r"the substrate's width 30 \(model.d_model in a plan, --dim for substrate build\) is not a multiple of its code width k=16"):
        build_substrate("binary", dim=30, vocab_size=65536)
    with pytest.raises(GrowlmError, match="at least 9"):
        build_substrate("binary", dim=16, vocab_size=300, bits=8)


# --- random bits -----------------------------------------------------------------------------------


def test_random_bits_unique_and_seeded() -> None:
    s = build_substrate("random-bits", dim=1024, vocab_size=2000)
    assert s.table.shape == (2000, 64) and s.lift == 16
    assert set(s.table.unique().tolist()) == {0.0, 1.0}
    assert len({tuple(r) for r in s.table.tolist()}) == 2000
    other = build_substrate("random-bits", dim=1024, vocab_size=2000, seed=1)
    assert not torch.equal(s.table, other.table) and s.fingerprint != other.fingerprint


def test_random_bits_collision_free_in_tight_spaces() -> None:
    full = build_substrate("random-bits", dim=4, vocab_size=16, bits=4)  # every 4-bit code once
    assert len({tuple(r) for r in full.table.tolist()}) == 16
    # 24 bits for 20,000 tokens: ~12 birthday collisions expected, each redrawn.
    s = build_substrate("random-bits", dim=24, vocab_size=20000, bits=24, seed=3)
    assert len({tuple(r) for r in s.table.tolist()}) == 20000
    with pytest.raises(GrowlmError, match="unique codes"):
        build_substrate("random-bits", dim=4, vocab_size=17, bits=4)
    with pytest.raises(GrowlmError, match="multiple of its code width k=64"):
        build_substrate("random-bits", dim=100, vocab_size=10)


# --- trainable -------------------------------------------------------------------------------------


def test_trainable_init() -> None:
    s = build_substrate("trainable", dim=256, vocab_size=512, seed=7)
    assert s.trainable and s.lift == 1 and s.weight.shape == (512, 256)
    assert abs(s.table.std().item() - 0.02) < 1e-3 and abs(s.table.mean().item()) < 1e-3
    assert s.fingerprint != build_substrate("trainable", dim=256, vocab_size=512, seed=8).fingerprint
    assert not build("binary").trainable


# --- glyph -----------------------------------------------------------------------------------------


def test_polar_snake_order_and_augmentation_draws() -> None:
    order = glyph_mod._polar_snake_index()
    assert sorted(order.tolist()) == list(range(1024))
    assert order[0] == 16 * 32 + 16  # r = 0 first: the centre pixel (16, 16)
    # The notebook re-seeds the global RNGs with 42 on every call: same draws as our private ones.
    random.seed(42)
    easy = (random.uniform(-4, 4), random.randint(-2, 2), random.randint(-2, 2))
    assert easy == (glyph_mod._augment(glyph_mod.GLYPH_PARAMS["easy"]).angle,) + easy[1:]
    r = GlyphRenderer(FONT) if Path(FONT).is_file() else None
    if r is not None:
        np.random.seed(42)
        assert np.array_equal(r._noise_mask(64, 0.01), np.random.rand(32, 64) < 0.01)


@needs_font
def test_glyph_rows_unit_norm_and_distinct() -> None:
    s = build("glyph")
    assert s.table.shape == (10, 64) and s.lift == 1 and s.table.dtype == torch.float32
    assert torch.allclose(s.table.norm(dim=1), torch.ones(10), atol=1e-5)
    visible = [i for i, t in enumerate(SMALL.strings) if t not in (" ", "\n")]
    rows = s.table[visible]
    assert torch.cdist(rows, rows).add(torch.eye(len(visible))).min() > 1e-3  # tiny vocab, distinct rows
    # As in the paper, inkless glyphs of one script class render to the same (noise-only) bitmap.
    assert torch.equal(s.table[SMALL.strings.index(" ")], s.table[SMALL.strings.index("\n")])
    assert s.recipe["basis"] == "reference" and len(s.recipe["font_sha256"]) == 64


@needs_font
def test_glyph_vector_depends_on_string_only() -> None:
    a = build_substrate("glyph", dim=256, tokenizer=StubTokenizer(["a", "b", "th"]))
    b = build_substrate("glyph", dim=256, tokenizer=StubTokenizer(["x", "th", "a", "<pad>"]))
    assert torch.equal(a.table[0], b.table[2])  # "a"
    assert torch.equal(a.table[2], b.table[1])  # "th"
    assert not torch.equal(a.table[0], a.table[1])


@needs_font
def test_glyph_wide_dim_zero_pads() -> None:
    s = build_substrate("glyph", dim=1100, tokenizer=SMALL)
    assert s.table.shape == (10, 1100)
    assert torch.count_nonzero(s.table[:, 1024:]) == 0
    assert torch.allclose(s.table.norm(dim=1), torch.ones(10), atol=1e-5)
    # Padding only appends zeros: the first 1024 columns equal the dim-1024 substrate.
    assert torch.equal(s.table[:, :1024], build_substrate("glyph", dim=1024, tokenizer=SMALL).table)


@needs_font
def test_glyph_vocab_basis_matches_sklearn_pca() -> None:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize

    strings = [chr(c) for c in range(0x21, 0x21 + 200)] + ["th", "ing", "中文"]
    s = build_substrate("glyph", dim=32, tokenizer=StubTokenizer(strings), basis="vocab")
    renderer = GlyphRenderer(FONT)
    bits = np.stack([renderer.bits(t) for t in strings]).astype(np.float64)
    ref = normalize(PCA(n_components=32, svd_solver="full").fit_transform(bits))
    assert s.recipe["basis"] == "vocab"
    np.testing.assert_allclose(s.table.numpy(), ref, atol=1e-4)
    with pytest.raises(GrowlmError, match="reference, vocab"):
        build_substrate("glyph", dim=32, tokenizer=SMALL, basis="pixels")


@needs_font
def test_glyph_parallel_render_equals_serial() -> None:
    strings = [chr(c) for c in range(0x3000, 0x3000 + 4200)] + ["ab", "<s>", ""]
    serial = glyph_mod.render_packed(strings, FONT, workers=1)
    assert np.array_equal(glyph_mod.render_packed(strings, FONT, workers=2), serial)
    assert not serial[-1].any()  # the empty string is a blank cell


@needs_font
def test_reference_basis_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A glyph build writes the reference basis to the cache, later builds reuse it, and a broken one is
    rebuilt, to the same basis. The glyph builds of a test run share the run's cache, so the 65,536 code
    points are rendered once a run: this test breaks a private copy of it, and its rebuild renders a
    sample of them afresh (which must equal the cached bits) and takes the rest from the intact copy."""
    build("glyph")
    (shared,) = glyph_mod.cache_dir().glob("glyph-basis-*.safetensors")  # written by a build: nothing else does
    monkeypatch.setenv("GROWLM_CACHE", str(tmp_path))
    path = Path(shutil.copy2(shared, tmp_path / shared.name))
    stamp = path.stat().st_mtime_ns
    build("glyph")
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    before = build("glyph").fingerprint

    cached, render, rendered = load_file(str(shared))["bits"].numpy(), glyph_mod.render_packed, []

    def render_reference(tokens, font_path, workers=None):
        if len(tokens) != glyph_mod.REFERENCE_SIZE:  # a vocabulary's multi-character tokens: rendered as ever
            return render(tokens, font_path, workers)
        assert tokens == [chr(i) for i in range(glyph_mod.REFERENCE_SIZE)]
        sample = list(range(0, glyph_mod.REFERENCE_SIZE, 64))  # one code point in 64, across the whole BMP
        assert np.array_equal(render([tokens[i] for i in sample], font_path, 1), cached[sample])
        rendered.append(len(tokens))
        return cached.copy()

    monkeypatch.setattr(glyph_mod, "render_packed", render_reference)
    path.write_bytes(b"corrupt")  # a broken cache is rebuilt, to the same basis
    assert build("glyph").fingerprint == before
    assert rendered == [glyph_mod.REFERENCE_SIZE]  # rebuilt from a rendering, not read from anywhere
    assert path.stat().st_size > 1_000_000


def test_missing_font_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import growlm.substrate.glyph as glyph

    missing = tmp_path / "no-font.otf"
    with pytest.raises(GrowlmError, match=r"font not found: .*no-font.otf \(font_path\)$") as e:
        build_substrate("glyph", dim=16, tokenizer=SMALL, font_path=str(missing))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(glyph, "DEFAULT_FONT", missing)  # the install hint is for the font growlm looks for itself
    with pytest.raises(GrowlmError, match="the default font.*apt-get install"):
        build_substrate("glyph", dim=16, tokenizer=SMALL)
    monkeypatch.setenv("GROWLM_FONT", str(missing))
    with pytest.raises(GrowlmError, match="font not found"):
        build_substrate("glyph", dim=16, tokenizer=SMALL)
