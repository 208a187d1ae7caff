"""The bvv241 tokenizer and the corpus reader: paper ids, round trips, unknown characters, files, errors."""

from __future__ import annotations

import hashlib
import json
import random
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from growlm.cli import main
from growlm.corpus import iter_text_chunks, read_text
from growlm.errors import GrowlmError
from growlm.plan import TokenizerSpec
from growlm.tokenizer import (
    META_FILE,
    SPECIAL_TOKENS,
    Tokenizer,
    build_preset,
    build_tokenizer,
    mine_ngrams,
    packaged_ngram_list,
)

REPO = Path(__file__).resolve().parents[1]
# The published list ships inside the package (growlm/ngrams/), so the paper's ids are tested on any checkout.
NGRAM_LIST = Path(str(packaged_ngram_list("bvv241-2-3")))
PAPER_IDS = [104, 56035, 111, 32, 57811, 32, 116, 56117]  # "hello the test" in the paper's notebook
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces that exercise merges, combining marks, RTL, CJK, controls and whitespace runs.
FRAGMENTS = [
    "the ", "hello", "test", "Модель растёт", "模型一层", "こんにちは", "한국어", "שלום", "مرحبا", "\u202e", "\u200f",
    "e\u0301", "\u0308", "  ", "\t\t", "\r\n", "\n\n\n", "\u3000", "\u00a0", "\x00", "\x1b", "\x7f", ".", ",",
]  # fmt: skip


def one_line_message(excinfo: pytest.ExceptionInfo) -> str:
    """The raised error's message, one non-empty line (cli_util.one_line_error checks a command's stderr)."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The paper's tokenizer, built as a user builds it: one command, no n-gram list to find."""
    out = tmp_path_factory.mktemp("preset") / "bvv241"
    assert main(["tokenizer", "build", "--preset", "bvv241-2-3", "--out", str(out)]) == 0
    return Tokenizer.load(out)


@pytest.fixture(scope="module")
def full(corpus_dir: Path) -> Tokenizer:
    return build_tokenizer([corpus_dir / "en.txt", corpus_dir / "ru.txt", corpus_dir / "train.txt"])


@pytest.fixture(scope="module")
def compact(corpus_dir: Path) -> Tokenizer:
    return build_tokenizer([corpus_dir / "train.txt"], compact=True)


# ----------------------------------------------------------------------------------------------
# the paper's preset


def test_preset_reproduces_paper(preset: Tokenizer) -> None:
    assert preset.encode("hello the test") == PAPER_IDS
    assert preset.decode(PAPER_IDS) == "hello the test"
    # the shipped list is the author's _n-gramms-2-3.txt byte for byte (growlm/ngrams/NOTICE)
    sha = "eb4dc1453e5b369fdbf241ffbb1df97f44c738b3051a5a8a008653f24101148e"
    assert preset.meta["recipe"]["ngram_list_sha256"] == sha
    assert preset.meta["ngram_count"] == 8177
    assert preset.meta["merge_count"] == 12224
    assert preset.vocab_size == 65536
    strings = preset.token_strings()
    assert len(strings) == len(set(strings)) == 65536
    assert strings[57344:57367] == list(SPECIAL_TOKENS)
    assert (preset.pad_id, preset.bos_id, preset.eos_id, preset.unk_id) == (57344, 57345, 57346, 57347)
    assert strings[57367] == "<special_token_57367>" and strings[0xE0FF] == "<special_token_57599>"
    assert strings[65535] == "<unused_65535>"
    assert sum(s.startswith("<unused_") for s in strings) == 16  # 15 empty n-gram slots + 0xFFFF
    assert all(strings[i] == chr(i) for i in [*range(0, 0xD800, 97), 0xD7FF, *range(0xF900, 0xFFFF, 31), 0xFFFE])
    ngrams = strings[0xD800:0xE000] + strings[0xE100:0xF900 - 15]
    assert ngrams == sorted(ngrams, key=lambda g: (-len(g), g)) and {len(g) for g in ngrams} == {2, 3}
    assert preset.meta["scheme"] == "bvv241" and preset.meta["recipe"]["preset"] == "bvv241-2-3"


def test_preset_errors(tmp_path: Path) -> None:
    with pytest.raises(GrowlmError, match="bvv241-2-3") as e:
        build_preset("bvv999", NGRAM_LIST)
    one_line_message(e)
    with pytest.raises(GrowlmError, match="not found") as e:
        build_preset("bvv241-2-3", tmp_path / "missing.txt")
    one_line_message(e)
    bad = tmp_path / "bad.txt"
    bad.write_text("[{'lang': 'en', 'top_ngrams': {2: __import__('os')}}]", encoding="utf-8")
    with pytest.raises(GrowlmError, match="not a Python literal") as e:
        build_preset("bvv241-2-3", bad)
    one_line_message(e)


def test_other_ngram_list_and_shipped_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --ngram-list still takes another list; its digest, not the shipped one's, goes in the recipe.
    own = tmp_path / "own.txt"
    own.write_text("[{'lang': 'xx', 'top_ngrams': {2: [('qz', 9)], 3: [('qzq', 4)]}}]", encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "build", "--preset", "bvv241-2-3", "--ngram-list", str(own), "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.meta["ngram_count"] == 2 and tok.encode("qzq") == [0xD800]
    assert tok.meta["recipe"]["ngram_list_sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    assert main(["tokenizer", "build", "--preset", "bvv999", "--out", str(tmp_path / "no")]) == 2
    assert "unknown tokenizer preset 'bvv999'" in capsys.readouterr().err
    # the list travels with its licence and attribution
    notice = (NGRAM_LIST.parent / "NOTICE").read_text(encoding="utf-8")
    assert "AVBochkov/PGT" in notice and "Apache License, Version 2.0" in notice
    assert "Apache License" in (NGRAM_LIST.parent / "LICENSE").read_text(encoding="utf-8")


def test_paper_plans_need_no_ngram_list() -> None:
    assert TokenizerSpec(preset="bvv241-2-3").ngram_list is None
    plans = sorted((REPO / "configs" / "paper").glob("*.toml"))
    assert plans
    for plan in plans:
        spec = TokenizerSpec(**tomllib.loads(plan.read_text(encoding="utf-8"))["tokenizer"])
        assert (spec.preset, spec.ngram_list) == ("bvv241-2-3", None), plan.name


# ----------------------------------------------------------------------------------------------
# round trips and unknown characters


@st.composite
def bmp_text(draw: st.DrawFn, alphabet: st.SearchStrategy[str]) -> str:
    parts = draw(st.lists(st.one_of(alphabet, st.sampled_from(FRAGMENTS)), max_size=40))
    return "".join(parts)


# Every BMP character the full vocabulary holds: no surrogates (Cs), private use (Co), or U+FFFF.
FULL_CHARS = st.characters(max_codepoint=0xFFFE, exclude_categories=("Cs", "Co"), exclude_characters="\uffff")


@HYPOTHESIS
@given(text=bmp_text(FULL_CHARS))
def test_full_roundtrip(full: Tokenizer, text: str) -> None:
    ids = full.encode(text)
    assert full.unk_id not in ids or "<unk>" in text
    assert full.decode(ids) == text


@HYPOTHESIS
@given(data=st.data())
def test_compact_roundtrip(compact: Tokenizer, corpus_dir: Path, data: st.DataObject) -> None:
    alphabet = sorted(set(read_text(corpus_dir / "train.txt")))
    words = ["The quick", "Модель", "模型", "  ", "\n"]
    text = "".join(data.draw(st.lists(st.one_of(st.sampled_from(alphabet), st.sampled_from(words)), max_size=60)))
    ids = compact.encode(text)
    assert compact.unk_id not in ids
    assert compact.decode(ids) == text


def test_preset_roundtrip_long_text(preset: Tokenizer) -> None:
    # Long texts are cut at whitespace for speed; the ids must equal encoding the text whole.
    rng = random.Random(0)
    text = "".join(rng.choice(FRAGMENTS) for _ in range(6000)) + "x" * 9000 + " 模型" * 3000
    ids = preset.encode(text)
    assert ids == preset._tok.encode(text, add_special_tokens=False).ids
    assert preset.decode(ids) == text
    assert preset.encode_batch([text, "", "hello"]) == [ids, [], preset.encode("hello")]


def test_unknown_characters_become_unk(preset: Tokenizer, compact: Tokenizer) -> None:
    unk = preset.unk_id
    # outside the BMP, private use (those ids hold n-grams/specials), U+FFFF, a lone surrogate
    assert preset.encode("a\U0001f600b\ue000\uf8ff\uffff\ud800c") == [97, unk, 98, unk, unk, unk, unk, 99]
    assert preset.decode(preset.encode("a\U0001f600")) == "a<unk>"
    assert "@" not in compact.token_strings()
    ids = compact.encode("The @ \U0001f600")
    assert ids.count(compact.unk_id) == 2 and compact.decode(ids) == "The <unk> <unk>"
    assert compact.encode_batch(["The", "x\udfffy"]) == [
        compact.encode("The"),
        compact.encode("x") + [compact.unk_id] + compact.encode("y"),
    ]
    with pytest.raises(TypeError):
        compact.encode_batch(["ok", 3])
    assert "unk" in preset.meta["unknown_rule"]


def test_specials_in_text_and_decode_errors(preset: Tokenizer) -> None:
    assert preset.encode("a</s>") == [97, preset.eos_id]
    assert preset.decode([preset.bos_id, 104, preset.pad_id]) == "<s>h<pad>"
    with pytest.raises(GrowlmError, match="outside the vocabulary") as e:
        preset.decode([65536])
    one_line_message(e)


# ----------------------------------------------------------------------------------------------
# building from a corpus


def test_mining_rules(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("ab1c d\u2019e\n我们 的x\n", encoding="utf-8")
    counts, chars = mine_ngrams(f, (2, 3))
    # words only on the first line (digit deleted, curly quote -> '); non-space chars on the CJK line
    assert set(counts[2]) == {"ab", "bc", "d'", "'e", "我们", "们的", "的x"}
    assert set(counts[3]) == {"abc", "d'e", "我们的", "们的x"}
    assert {"1", "\u2019", "\n", " "} <= chars


def test_compact_layout(compact: Tokenizer, corpus_dir: Path) -> None:
    strings = compact.token_strings()
    n_special = len(SPECIAL_TOKENS)
    assert strings[:n_special] == list(SPECIAL_TOKENS) and compact.pad_id == 0 and compact.unk_id == 3
    alphabet = sorted(set(read_text(corpus_dir / "train.txt")))
    assert strings[n_special : n_special + len(alphabet)] == alphabet
    ngrams = strings[n_special + len(alphabet) :]
    assert ngrams and ngrams == sorted(ngrams, key=lambda g: (-len(g), g))
    assert compact.vocab_size == n_special + len(alphabet) + compact.meta["ngram_count"]
    assert compact.meta["scheme"] == "bvv241-compact"


def test_full_layout_from_corpus(full: Tokenizer) -> None:
    strings = full.token_strings()
    n = full.meta["ngram_count"]
    assert full.vocab_size == 65536 and strings[57344:57367] == list(SPECIAL_TOKENS)
    assert all(len(g) > 1 for g in strings[0xD800 : 0xD800 + min(n, 2048)])
    assert full.encode("the") == [strings.index("the")]


def test_fingerprint_stable_and_distinct(full: Tokenizer, compact: Tokenizer, corpus_dir: Path) -> None:
    again = build_tokenizer([corpus_dir / "en.txt", corpus_dir / "ru.txt", corpus_dir / "train.txt"])
    assert again.fingerprint == full.fingerprint and len(full.fingerprint) == 64
    other = build_tokenizer([corpus_dir / "en.txt"])
    assert len({full.fingerprint, compact.fingerprint, other.fingerprint}) == 3


def test_too_many_ngrams(tmp_path: Path) -> None:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzабвгдежзийклмнопрстуфхцчшщ"
    words = ("".join(rng.choice(letters) for _ in range(8)) for _ in range(6000))
    f = tmp_path / "random.txt"
    f.write_text(" ".join(words), encoding="utf-8")
    with pytest.raises(GrowlmError, match=r"n-grams do not fit the 8,192 free n-gram slots") as e:
        build_tokenizer([f], top_k=100_000)
    assert one_line_message(e).split()[0].replace(",", "").isdigit()
    assert build_tokenizer([f], top_k=100_000, compact=True).meta["ngram_count"] > 8192


# ----------------------------------------------------------------------------------------------
# files: save / load / transformers


def test_save_load_roundtrip(compact: Tokenizer, tmp_path: Path) -> None:
    d = compact.save(tmp_path / "tok")
    names = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "growlm_tokenizer.json"}
    assert names <= {p.name for p in d.iterdir()}
    meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    assert meta["format"] == "growlm-tokenizer" and meta["version"] == 1
    assert meta["fingerprint"] == compact.fingerprint and meta["vocab_size"] == compact.vocab_size
    assert {"scheme", "recipe", "unknown_rule"} <= meta.keys()
    loaded = Tokenizer.load(d)
    assert loaded.token_strings() == compact.token_strings() and loaded.fingerprint == compact.fingerprint
    text = "The quick brown fox. Модель растёт. 我们的模型"
    assert loaded.encode(text) == compact.encode(text) and loaded.decode(loaded.encode(text)) == text


def test_load_errors(compact: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(GrowlmError, match="not found") as e:
        Tokenizer.load(tmp_path / "nope")
    assert str(tmp_path / "nope") in one_line_message(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrowlmError, match="not a growlm tokenizer directory") as e:
        Tokenizer.load(tmp_path / "empty")
    one_line_message(e)
    d = compact.save(tmp_path / "tok")
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # swap two ids: same strings, different vocabulary
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(GrowlmError, match="fingerprint mismatch") as e:
        Tokenizer.load(d)
    assert str(d) in one_line_message(e)


def test_transformers_loads_identical_ids(preset: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = preset.save(tmp_path / "bvv")
    texts = ["hello the test", "Модель растёт слой за слоем. 我们的模型一层一层地生长。", "a  b\n\tc </s> x . y", "😀\ue000"]
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(d))
    assert (auto.bos_token, auto.eos_token, auto.unk_token, auto.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert auto.pad_token_id == preset.pad_id and auto.eos_token_id == preset.eos_id
    for t in texts:
        ids = preset.encode(t)
        assert fast.encode(t, add_special_tokens=False) == ids
        assert auto.encode(t, add_special_tokens=False) == ids
        assert auto.encode(t) == ids  # no post-processor: nothing is added
        assert auto.decode(ids) == preset.decode(ids)


# ----------------------------------------------------------------------------------------------
# corpus reading


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(GrowlmError, match="corpus file not found: ") as e:
        read_text(tmp_path / "missing.txt")
    one_line_message(e)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(GrowlmError, match="corpus file is empty: ") as e:
        read_text(tmp_path / "empty.txt")
    one_line_message(e)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo wörld\n".encode() * 3 + b"ok \xff tail")
    for chunk in (1, 2, 3, 7, 1 << 20):
        with pytest.raises(GrowlmError, match=r"is not UTF-8: invalid byte 0xff at byte offset 45$") as e:
            list(iter_text_chunks(bad, chunk))
        one_line_message(e)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(b"abc\xe4\xb8")
    with pytest.raises(GrowlmError, match="invalid byte 0xe4 at byte offset 3"):
        read_text(truncated)
    with pytest.raises(GrowlmError, match="corpus file not found"):
        build_tokenizer([tmp_path / "missing.txt"])


def test_corpus_chunks_bounded_and_lossless(tmp_path: Path) -> None:
    text = "é中😀a" * 5000  # one long line of 1-, 2-, 3- and 4-byte characters
    f = tmp_path / "line.txt"
    f.write_text(text, encoding="utf-8")
    for size in (1, 2, 3, 5, 4096):
        chunks = list(iter_text_chunks(f, size))
        assert "".join(chunks) == text and max(map(len, chunks)) <= size
