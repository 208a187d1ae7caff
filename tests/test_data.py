"""Data pipeline: readers, cached shards, packing, deterministic and resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from growlm import data
from growlm.data import (
    Batches,
    Source,
    iter_documents,
    shard_path,
    tokenize_file,
    validation_batches,
)
from growlm.errors import GrowlmError

DOCS = ["The quick brown fox.", "Модель растёт слой за слоем.", "", "我们的模型一层一层地生长。", "Answer: Paris\n"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from growlm.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


def _expected_docs(tok, docs):
    return [i for d in docs for i in [*tok.encode(d), tok.eos_id]]


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": k}, ensure_ascii=False) + "\n" for k, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def _write_arrow_dir(d, docs, column="text"):
    d.mkdir()
    table = pa.table({column: docs[:2]})
    rest = pa.table({column: docs[2:]})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
        w.write_table(rest)  # two record batches, as datasets writes them
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (d / "dataset_info.json").write_text("{}")
    return d


# ----------------------------------------------------------------------------------------------
# readers and shards


def test_text_file_matches_direct_encoding(tok, corpus_dir, tmp_path, monkeypatch):
    # Small chunks force many whitespace cuts: the ids must not change.
    monkeypatch.setattr(data, "_CHUNK_CHARS", 97)
    monkeypatch.setattr(data, "_BATCH_CHARS", 300)
    path = corpus_dir / "train.txt"
    text = path.read_text(encoding="utf-8")
    assert "".join(iter_documents(path)) == text
    shard = tokenize_file(path, tok, tmp_path)
    assert shard.dtype == np.uint16 and shard.ndim == 1
    assert shard.tolist() == [*tok.encode(text), tok.eos_id]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow-dir"])
def test_document_formats_match_direct_encoding(fmt, tok, tmp_path):
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    elif fmt == "parquet":
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path, row_group_size=2)
    else:
        path = _write_arrow_dir(tmp_path / "saved", DOCS)
    assert list(iter_documents(path)) == DOCS
    assert tokenize_file(path, tok, tmp_path / "cache").tolist() == _expected_docs(tok, DOCS)


def test_shard_is_reused_and_keyed_by_content(tok, tmp_path, monkeypatch):
    path = _write_jsonl(tmp_path / "a.jsonl", DOCS)
    first = tokenize_file(path, tok, tmp_path / "cache")
    out = shard_path(path, tok, tmp_path / "cache")
    assert out.is_file() and out.suffix == ".u16"

    def boom(texts):
        raise AssertionError("re-tokenized a cached file")

    monkeypatch.setattr(tok, "encode_batch", boom)
    assert tokenize_file(path, tok, tmp_path / "cache").tolist() == first.tolist()
    # Same content elsewhere: same shard; changed content: a new one.
    copy = _write_jsonl(tmp_path / "b.jsonl", DOCS)
    assert shard_path(copy, tok, tmp_path / "cache") == out
    _write_jsonl(path, DOCS[:2])
    assert shard_path(path, tok, tmp_path / "cache") != out


def test_failed_tokenization_leaves_no_shard(tok, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(data, "_BATCH_CHARS", 200)
    real, calls = tok.encode_batch, []

    def flaky(texts):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed midway")
        return real(texts)

    monkeypatch.setattr(tok, "encode_batch", flaky)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed midway"):
        tokenize_file(corpus_dir / "train.txt", tok, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(tok, "encode_batch", real)
    assert len(tokenize_file(corpus_dir / "train.txt", tok, cache)) > 0


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GROWLM_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "shards"


# ----------------------------------------------------------------------------------------------
# batches


def _batches(tok, corpus_dir, tmp_path, **kw):
    args = {"context": 16, "batch_size": 8, "seed": 0, "cache_dir": tmp_path / "cache"} | kw
    sources = args.pop("sources", [Source([corpus_dir / "train.txt"])])
    return Batches(sources, tok, **args)


def _draw(b, n):
    return [b.next() for _ in range(n)]


def test_batches_shape_shift_and_packing(tok, corpus_dir, tmp_path):
    b = _batches(tok, corpus_dir, tmp_path)
    x, y = b.next()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    shard = tokenize_file(corpus_dir / "train.txt", tok, tmp_path / "cache")
    assert b.n_sequences == len(shard) // 17 and b.tokens_per_batch == 8 * 16
    for row, (s, i) in zip(x, b.last_sequence_ids, strict=True):
        assert s == 0 and row.tolist() == shard[i * 17 : i * 17 + 16].tolist()
    # One epoch visits every sequence exactly once.
    seen = [i for _ in range(b.n_sequences // 8 - 1) for _ in [b.next()] for _, i in b.last_sequence_ids]
    assert len(set(seen)) == len(seen)


def test_batches_deterministic_by_seed(tok, corpus_dir, tmp_path):
    a = _draw(_batches(tok, corpus_dir, tmp_path), 3)
    b = _draw(_batches(tok, corpus_dir, tmp_path), 3)
    c = _draw(_batches(tok, corpus_dir, tmp_path, seed=1), 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


def test_resume_from_state_dict(tok, corpus_dir, tmp_path):
    sources = [Source([corpus_dir / "en.txt"], 1.0), Source([corpus_dir / "ru.txt", corpus_dir / "valid.txt"], 2.0)]
    # A tiny context and many batches so the run crosses epochs of both sources.
    b = _batches(tok, corpus_dir, tmp_path, sources=sources, context=64)
    _draw(b, 5)
    state = json.loads(json.dumps(b.state_dict()))
    assert state["rows"] == 40
    after = _draw(b, 5)
    resumed = _batches(tok, corpus_dir, tmp_path, sources=sources, context=64)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, _draw(resumed, 5), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(GrowlmError, match="seed"):
        _batches(tok, corpus_dir, tmp_path, sources=sources, context=64, seed=9).load_state_dict(state)


def test_resume_across_epochs(tok, corpus_dir, tmp_path):
    b = _batches(tok, corpus_dir, tmp_path, context=128, batch_size=4)
    n_batches = 3 * b.n_sequences // 4 + 1  # well past two epochs
    _draw(b, n_batches)
    assert b.epochs[0] > 2
    state = b.state_dict()
    ids = [b.next() and b.last_sequence_ids for _ in range(5)]
    r = _batches(tok, corpus_dir, tmp_path, context=128, batch_size=4)
    r.load_state_dict(state)
    assert [r.next() and r.last_sequence_ids for _ in range(5)] == ids


def test_mixture_weights(tok, corpus_dir, tmp_path):
    sources = [Source([corpus_dir / "en.txt"], 3.0), Source([corpus_dir / "ru.txt"], 1.0)]
    b = _batches(tok, corpus_dir, tmp_path, sources=sources, batch_size=64)
    picks = [s for _ in range(30) for _ in [b.next()] for s, _ in b.last_sequence_ids]
    frac = picks.count(0) / len(picks)
    assert abs(frac - 0.75) < 0.04, frac


def test_world_size_slices_the_global_batch(tok, corpus_dir, tmp_path):
    sources = [Source([corpus_dir / "en.txt"], 1.0), Source([corpus_dir / "ru.txt"], 1.0)]
    full = _draw(_batches(tok, corpus_dir, tmp_path, sources=sources), 4)
    parts = [_draw(_batches(tok, corpus_dir, tmp_path, sources=sources, rank=k, world_size=2), 4) for k in range(2)]
    for step, (x, y) in enumerate(full):
        for k in range(2):
            xk, yk = parts[k][step]
            assert xk.shape == (4, 16)
            assert torch.equal(xk, x[k::2]) and torch.equal(yk, y[k::2])


def test_validation_batches(tok, corpus_dir, tmp_path):
    path = corpus_dir / "valid.txt"
    shard = tokenize_file(path, tok, tmp_path / "cache")
    vb = validation_batches([path], tok, context=16, batch_size=4, cache_dir=tmp_path / "cache")
    assert len(vb) == (len(shard) // 17) // 4
    flat = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in vb]).flatten()
    assert flat.tolist() == shard[: len(flat)].tolist()  # in order, non-overlapping
    assert len(validation_batches([path], tok, context=16, batch_size=4, cache_dir=tmp_path / "cache",
                                  max_batches=2)) == 2
    (small,) = validation_batches([path], tok, context=16, batch_size=10_000, cache_dir=tmp_path / "cache")
    assert small[0].shape == (len(shard) // 17, 16)


# ----------------------------------------------------------------------------------------------
# errors: GrowlmError, one line, naming the file


def _raises(match, fn, *args, **kw):
    with pytest.raises(GrowlmError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return e


def test_reader_errors(tok, tmp_path):
    cache = tmp_path / "cache"
    _raises("data file not found: .*nope.txt", tokenize_file, tmp_path / "nope.txt", tok, cache)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    _raises("data file is empty: .*empty.jsonl", tokenize_file, tmp_path / "empty.jsonl", tok, cache)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    _raises("bad JSON on line 2 of .*bad.jsonl", tokenize_file, tmp_path / "bad.jsonl", tok, cache)
    (tmp_path / "notext.jsonl").write_text('{"body": "a"}\n', encoding="utf-8")
    _raises('line 1 of .*notext.jsonl has no "text" field', tokenize_file, tmp_path / "notext.jsonl", tok, cache)
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    _raises("latin.jsonl is not UTF-8: invalid byte 0xe9 at byte offset 28 \\(line 2\\)", tokenize_file,
            tmp_path / "latin.jsonl", tok, cache)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    _raises("latin.txt is not UTF-8: .* byte offset 3", tokenize_file, tmp_path / "latin.txt", tok, cache)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    _raises("nocol.parquet has no 'text' column .*body", tokenize_file, tmp_path / "nocol.parquet", tok, cache)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    _raises("cannot read parquet file .*junk.parquet", tokenize_file, tmp_path / "junk.parquet", tok, cache)
    _write_arrow_dir(tmp_path / "saved", DOCS, column="content")
    _raises("data-00000-of-00001.arrow has no 'text' column", tokenize_file, tmp_path / "saved", tok, cache)
    (tmp_path / "plain_dir").mkdir()
    _raises("plain_dir is a folder but not a datasets save_to_disk folder", tokenize_file,
            tmp_path / "plain_dir", tok, cache)
    # Nothing half-written survived any of these.
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_batches_errors(tok, corpus_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The quick fox.", encoding="utf-8")
    _raises(r"source 1 \(.*short.txt\) has only \d+ tokens; at least context\+1 = 65",
            _batches, tok, corpus_dir, tmp_path, context=64,
            sources=[Source([corpus_dir / "en.txt"]), Source([short])])
    _raises("batch_size 6 is not divisible by the world size 4", _batches, tok, corpus_dir, tmp_path,
            batch_size=6, world_size=4)
    _raises("source 0 .*en.txt.* has weight 0", _batches, tok, corpus_dir, tmp_path,
            sources=[Source([corpus_dir / "en.txt"], 0.0)])
    _raises("data file not found: .*missing.txt", _batches, tok, corpus_dir, tmp_path,
            sources=[Source([tmp_path / "missing.txt"])])
    _raises(r"validation data \(.*short.txt\) has only", validation_batches, [short], tok, context=64,
            batch_size=2, cache_dir=tmp_path / "cache")


def test_large_vocab_uses_uint32():
    assert data.token_dtype(65_536) == np.uint16 and data.token_dtype(65_537) == np.uint32


def test_huge_weights_mix_as_their_ratio(tok, corpus_dir, tmp_path):
    """Weights whose sum overflows (1e308 twice) still mix 1:1; every batch from the second file was the result."""
    sources = [Source([corpus_dir / "en.txt"], 1e308), Source([corpus_dir / "ru.txt"], 1e308)]
    b = _batches(tok, corpus_dir, tmp_path, sources=sources, batch_size=64)
    picks = [s for _ in range(30) for _ in [b.next()] for s, _ in b.last_sequence_ids]
    assert abs(picks.count(0) / len(picks) - 0.5) < 0.05


@pytest.mark.parametrize("key, edit", [
    ("data.weights", ('train = ["train.txt"]\n', 'train = ["train.txt", "valid.txt"]\nweights = [inf, 1.0]\n')),
    ("train.lr", ("lr = 3e-3", "lr = inf")),
    ("train.weight_decay", ("lr = 3e-3", "lr = 3e-3\nweight_decay = inf")),
    ("model.rope_theta", ("context = 32", "context = 32\nrope_theta = nan")),
])
def test_plan_numbers_must_be_finite(corpus_dir, tmp_path, key, edit):
    from cli_util import SMALL_PLAN, write_plan
    from growlm.errors import GrowlmError
    from growlm.plan import load_plan

    with pytest.raises(GrowlmError, match=rf"{key}"):
        load_plan(write_plan(tmp_path, SMALL_PLAN.replace(*edit), corpus_dir))
