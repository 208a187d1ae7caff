"""The bvv241 Unicode tokenizer scheme (paper §2.1), backed by Hugging Face ``tokenizers``.

Full vocabulary (65,536 ids, exactly the paper's layout)::

    0x0000-0xD7FF   every code point is its own id (monograms)
    0xD800-0xDFFF   n-gram tokens, filled first (n-grams sorted by (-length, text))
    0xE000-0xE0FF   specials: the 23 named ones of SPECIAL_TOKENS, then "<special_token_{id}>"
    0xE100-0xF8FF   more n-gram tokens
    0xF900-0xFFFE   monograms again
    anything empty  "<unused_{id}>" (e.g. 0xFFFF)

Compact vocabulary (``compact=True``, dense ids for small experiments): the 23 named specials first
(so ``<pad>`` = 0), then every code point seen in the corpus in code-point order, then the n-grams
sorted by (-length, text).

The model is ``BPE(vocab, merges, unk_token="<unk>")`` with no normalizer, no pre-tokenizer and no
post-processor, as in the paper; merges are every valid split ``(g[:i], g[i:])`` of every n-gram
``g`` whose halves are both tokens. Because no multi-character token contains whitespace, text can
be cut before a space or newline without changing ids; :meth:`Tokenizer.encode` does so for long
texts to encode the pieces in one fast batch. The decoder concatenates pieces (``decoders.Fuse``),
so ``decode(encode(s)) == s`` for every string the vocabulary can hold.

Unknown characters (see ``UNKNOWN_RULE``): a character the vocabulary cannot hold is encoded as
one ``<unk>`` per character, never dropped. In the full vocabulary these are code points above
U+FFFF, the private-use block U+E000-U+F8FF and U+FFFF (those ids hold n-grams, specials and
fillers); in a compact vocabulary, any character absent from the building corpus. Lone surrogates
(which Python strings may carry but UTF-8 cannot) are unknown characters too. The 23 named
specials written literally in text (e.g. ``"</s>"``) encode to their special ids, as Hugging Face
tokenizers do; ``decode`` writes every special back literally.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from importlib import resources
from importlib.resources.abc import Traversable
from itertools import pairwise
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models

from growlm.corpus import iter_text_chunks, read_text
from growlm.errors import GrowlmError, one_line
from growlm.files import WriteError, atomic_write_bytes
from growlm.hashing import canonical_json, sha256_file

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>", "<emotions>", "</emotions>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "[INST]", "[/INST]",
    "[EOT]", "[USER]", "[ASSISTANT]", "[FIM_PREFIX]", "[FIM_MIDDLE]", "[FIM_SUFFIX]", "[FIM_PAD]",
    "[REPO_NAME]", "[FILE_SEP]",
)  # fmt: skip

UNKNOWN_RULE = (
    "a character the vocabulary cannot hold is encoded as one <unk> per character, never dropped; "
    "full vocabulary: code points above U+FFFF, private-use U+E000-U+F8FF, U+FFFF and lone surrogates; "
    "compact vocabulary: any character absent from the building corpus, and lone surrogates"
)

FORMAT, VERSION = "growlm-tokenizer", 1
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "growlm_tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"

FULL_VOCAB_SIZE = 1 << 16
SPECIAL_BASE, SPECIAL_SLOTS = 0xE000, 256
MONOGRAM_RANGES = (range(0x0000, 0xD800), range(0xF900, 0xFFFF))
NGRAM_SLOTS = (*range(0xD800, 0xE000), *range(0xE100, 0xF900))  # 2,048 + 6,144, filled in this order

# Each preset's published n-gram list ships in growlm/ngrams/ (see the NOTICE there for its source and licence).
PRESETS: dict[str, dict[str, Any]] = {"bvv241-2-3": {"ngrams": (2, 3), "top_k": 338, "list": "ngrams-2-3.txt"}}

# Long texts are cut at whitespace into pieces about this long and encoded as one batch: the BPE
# cost grows with word length, and a batch amortises the Python<->Rust crossing.
_PIECE_CHARS = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")


def _ngram_sort_key(g: str) -> tuple[int, str]:
    return (-len(g), g)


# ----------------------------------------------------------------------------------------------
# the tokenizer object


class Tokenizer:
    """A bvv241-style tokenizer: a ``tokenizers.Tokenizer`` plus its growlm metadata.

    Build one with :func:`build_tokenizer` or :func:`build_preset`, or read one with :meth:`load`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, meta: dict[str, Any]) -> None:
        self._tok = backend
        self.meta = meta
        vocab = backend.get_vocab(with_added_tokens=True)
        strings = [""] * len(vocab)
        for s, i in vocab.items():
            if not 0 <= i < len(vocab) or strings[i]:
                raise ValueError(f"token ids are not dense 0..{len(vocab) - 1} (id {i} for {s!r})")
            strings[i] = s
        self._strings = strings
        # Cutting before a space/newline is id-preserving only while no multi-char token contains it.
        self._cut_chars = [c for c in " \n" if not any(c in s for s in strings if len(s) > 1)]

    # -- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (every id in ``range(vocab_size)`` has a string)."""
        return len(self._strings)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical vocabulary: the JSON list of token strings in id order."""
        return vocab_fingerprint(self._strings)

    @property
    def cut_chars(self) -> tuple[str, ...]:
        """Whitespace characters no multi-character token contains: cutting a text before or after
        one of them never changes its ids, so long texts can be encoded piece by piece."""
        return tuple(self._cut_chars)

    def token_strings(self) -> list[str]:
        """The string of every id in id order, including literal specials and fillers."""
        return list(self._strings)

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>``."""
        return self._special_id("<pad>")

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``."""
        return self._special_id("<s>")

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``."""
        return self._special_id("</s>")

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (what every unknown character encodes to)."""
        return self._special_id("<unk>")

    def _special_id(self, s: str) -> int:
        i = self._tok.token_to_id(s)
        assert i is not None, f"vocabulary has no {s}"
        return i

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added); unknown characters become ``unk_id``."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, as :meth:`encode` would give them, computed in one batch."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one str (use encode)")
        texts = list(texts)
        if all(len(t) <= _PIECE_CHARS for t in texts):
            return self._encode_pieces(texts)
        pieces: list[str] = []
        bounds = [0]
        for text in texts:
            pieces.extend(self._cut(text))
            bounds.append(len(pieces))
        encoded = self._encode_pieces(pieces)
        return [[i for ids in encoded[a:b] for i in ids] for a, b in pairwise(bounds)]

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        try:
            # "fast" skips computing character offsets, which we never use (about 1.5x faster).
            return [e.ids for e in self._tok.encode_batch_fast(pieces, add_special_tokens=False)]
        except TypeError:
            # The Rust side rejects strings that are not valid Unicode (lone surrogates).
            return [self._encode_with_surrogates(p) for p in pieces]

    def _cut(self, text: str) -> list[str]:
        """Split ``text`` before whitespace into pieces of about ``_PIECE_CHARS`` characters."""
        if len(text) <= _PIECE_CHARS or not self._cut_chars:
            return [text]
        pieces, start = [], 0
        while len(text) - start > _PIECE_CHARS:
            end = start + _PIECE_CHARS
            cut = max(text.rfind(c, start + 1, end) for c in self._cut_chars)
            if cut <= start:  # no whitespace in the window: take the next one, however far
                found = [i for c in self._cut_chars if (i := text.find(c, end)) != -1]
                if not found:
                    break
                cut = min(found)
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def _encode_with_surrogates(self, text: str) -> list[int]:
        """Encode a string that may hold lone surrogates, each becoming one ``<unk>``."""
        if not isinstance(text, str):
            raise TypeError(f"cannot encode {type(text).__name__}: expected str")
        ids: list[int] = []
        for k, part in enumerate(_SURROGATE.split(text)):
            if k:
                ids.append(self.unk_id)
            if part:
                ids.extend(self._tok.encode(part, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: token strings concatenated, specials written literally."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self._strings)]
        if bad:
            raise GrowlmError(f"token id {bad[0]} is outside the vocabulary (size {len(self._strings)})")
        return self._tok.decode(ids, skip_special_tokens=False)

    # -- files ------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write the tokenizer to ``out_dir`` and return it.

        Files: ``tokenizer.json`` (Hugging Face ``tokenizers``), ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (so ``transformers.AutoTokenizer.from_pretrained`` loads it
        offline with the same ids), and ``growlm_tokenizer.json`` (metadata and fingerprint).
        Each file is written all or nothing (a full disk leaves no partial file and raises
        :class:`~growlm.files.WriteError`), the metadata last, so a dir with it has the rest.
        """
        d = Path(out_dir)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(d, str(e.strerror or e)) from e
        atomic_write_bytes(d / TOKENIZER_FILE, self._tok.to_str(pretty=True).encode("utf-8"))
        roles = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        extra = [s for s in SPECIAL_TOKENS if s not in roles.values()]
        _write_json(d / SPECIAL_MAP_FILE, {**roles, "additional_special_tokens": extra})
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **roles,
            "additional_special_tokens": extra,
            # transformers would otherwise rewrite " ." to "." on decode, breaking the round trip.
            "clean_up_tokenization_spaces": False,
        }
        _write_json(d / CONFIG_FILE, config)
        _write_json(d / META_FILE, self.meta)
        return d

    @classmethod
    def load(cls, tok_dir: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`, checking its fingerprint.

        Raises :class:`GrowlmError` if ``tok_dir`` is not a growlm tokenizer directory or its
        vocabulary does not match the recorded fingerprint.
        """
        d = Path(tok_dir)
        if not d.is_dir():
            raise GrowlmError(f"tokenizer directory not found: {d}")
        for name in (META_FILE, TOKENIZER_FILE):
            if not (d / name).is_file():
                raise GrowlmError(f"not a growlm tokenizer directory: {d} (missing {name})")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GrowlmError(f"cannot read {META_FILE} in {d}: {one_line(e)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise GrowlmError(f"not a growlm tokenizer directory: {d} ({META_FILE} has no format {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise GrowlmError(f"unsupported tokenizer version {meta.get('version')!r} in {d} (expected {VERSION})")
        try:
            tok = cls(tokenizers.Tokenizer.from_file(str(d / TOKENIZER_FILE)), meta)
        except Exception as e:  # the Rust parser raises plain Exception subclasses
            raise GrowlmError(f"cannot read {TOKENIZER_FILE} in {d}: {one_line(e)}") from None
        recorded, actual = meta.get("fingerprint"), tok.fingerprint
        if recorded != actual:
            raise GrowlmError(
                f"tokenizer fingerprint mismatch in {d}: {META_FILE} records {str(recorded)[:16]}…, "
                f"{TOKENIZER_FILE} gives {actual[:16]}…"
            )
        return tok


def vocab_fingerprint(strings: Sequence[str]) -> str:
    """sha256 of the id-ordered token strings, as canonical JSON."""
    return hashlib.sha256(canonical_json(list(strings))).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# assembling a vocabulary


def _full_layout(ngrams: Sequence[str]) -> list[str]:
    """The paper's 65,536-id layout with ``ngrams`` (already sorted) in the n-gram slots."""
    if len(ngrams) > len(NGRAM_SLOTS):
        raise GrowlmError(
            f"{len(ngrams):,} n-grams do not fit the {len(NGRAM_SLOTS):,} free n-gram slots of the full "
            f"vocabulary; lower top_k, use fewer n values or corpus files, or build with compact=True"
        )
    strings: list[str | None] = [None] * FULL_VOCAB_SIZE
    for r in MONOGRAM_RANGES:
        for i in r:
            strings[i] = chr(i)
    for k in range(SPECIAL_SLOTS):
        i = SPECIAL_BASE + k
        strings[i] = SPECIAL_TOKENS[k] if k < len(SPECIAL_TOKENS) else f"<special_token_{i}>"
    for g, i in zip(ngrams, NGRAM_SLOTS, strict=False):  # fewer n-grams than slots is normal
        strings[i] = g
    return [s if s is not None else f"<unused_{i}>" for i, s in enumerate(strings)]


def _full_alphabet() -> set[str]:
    return {chr(i) for r in MONOGRAM_RANGES for i in r}


def _ranked(counts: Counter[str]) -> list[str]:
    """N-grams best first; ties are broken by text, so the order does not depend on reading order."""
    return sorted(counts, key=lambda g: (-counts[g], g))


def _select_ngrams(groups: Iterable[Sequence[str]], top_k: int, alphabet: set[str], taken: set[str]) -> list[str]:
    """Union of the first ``top_k`` n-grams of every ranked group, sorted by (-length, text).

    N-grams with a character outside ``alphabet`` could never be produced by BPE and are skipped,
    as are strings already in the vocabulary (``taken``).
    """
    chosen = {g for ranked in groups for g in ranked[:top_k]}
    usable = [g for g in chosen if g not in taken and all(c in alphabet for c in g)]
    return sorted(usable, key=_ngram_sort_key)


def _assemble(strings: list[str], ngrams: Sequence[str], *, scheme: str, recipe: dict[str, Any]) -> Tokenizer:
    """A :class:`Tokenizer` over ``strings`` (id order) with merges for ``ngrams`` (sorted)."""
    vocab = {s: i for i, s in enumerate(strings)}
    if len(vocab) != len(strings):
        raise ValueError("duplicate token strings in the vocabulary")
    # All valid splits, in n-gram order: BPE then always prefers the longer, earlier n-gram.
    merges = [(g[:i], g[i:]) for g in ngrams for i in range(1, len(g)) if g[:i] in vocab and g[i:] in vocab]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    backend.decoder = decoders.Fuse()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": vocab_fingerprint(strings),
        "vocab_size": len(strings),
        "scheme": scheme,
        "recipe": recipe,
        "ngram_count": len(ngrams),
        "merge_count": len(merges),
        "special_tokens": {s: vocab[s] for s in SPECIAL_TOKENS},
        "unknown_rule": UNKNOWN_RULE,
    }
    return Tokenizer(backend, meta)


# ----------------------------------------------------------------------------------------------
# mining n-grams from a corpus (the rules of the paper's _n-gramms-from-wiki notebook)

# Documents with any of these characters are counted as character n-grams over non-space characters.
_CJK = re.compile("[\u4e00-\u9fff\u3040-\u309f\u30a0-\u30ff\uac00-\ud7af]")
_WORD = re.compile(r"\b[a-zA-Z\u00C0-\u017F\u0400-\u04FF']+\b")
_PREPROCESS = str.maketrans(
    {"\u2019": "'", "\u2018": "'", "`": "'", **{str(d): None for d in range(10)}, **dict.fromkeys("\t\r\f\v", " ")}
)


def _iter_documents(path: Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The lines of a corpus file, newline kept (a line is one document); over-long lines come in bounded pieces."""
    rest = ""
    for chunk in iter_text_chunks(path, chunk_chars):
        lines = (rest + chunk).split("\n")
        rest = lines.pop()
        for line in lines:
            yield line + "\n"
        if len(rest) > chunk_chars:
            yield rest
            rest = ""
    if rest:
        yield rest


def _count_ngrams(doc: str, ns: Sequence[int], counters: dict[int, Counter[str]]) -> None:
    """Add the n-grams of one document to ``counters[n]``, following the paper's mining rules."""
    cjk = _CJK.search(doc) is not None
    doc = doc.translate(_PREPROCESS)
    units = ["".join(doc.split())] if cjk else _WORD.findall(doc)
    for n in ns:
        counters[n].update(u[i : i + n] for u in units for i in range(len(u) - n + 1))


def mine_ngrams(path: str | Path, ns: Sequence[int] = (2, 3)) -> tuple[dict[int, Counter[str]], set[str]]:
    """N-gram counts per n of one corpus file, and the set of characters it contains (streamed).

    Per document (line): curly single quotes and backticks become ``'``, ASCII digits are deleted,
    ``\\t\\r\\f\\v`` become spaces; a document with a CJK/kana/Hangul character yields n-grams over
    its non-space characters, any other yields n-grams inside the words matched by
    ``\\b[a-zA-Z\\u00C0-\\u017F\\u0400-\\u04FF']+\\b`` only.
    """
    counters: dict[int, Counter[str]] = {n: Counter() for n in ns}
    chars: set[str] = set()
    for doc in _iter_documents(Path(path)):
        chars.update(doc)
        _count_ngrams(doc, ns, counters)
    return counters, chars


def _check_args(ngrams: Sequence[int], top_k: int) -> tuple[int, ...]:
    ns = tuple(sorted(set(ngrams)))
    if not ns or any(not isinstance(n, int) or n < 2 for n in ns):
        raise GrowlmError(f"n-gram lengths must be integers >= 2, got {list(ngrams)}")
    if not isinstance(top_k, int) or top_k < 1:
        raise GrowlmError(f"top_k must be a positive integer, got {top_k!r}")
    return ns


def build_tokenizer(
    corpus: Sequence[Path], *, compact: bool = False, ngrams: Sequence[int] = (2, 3), top_k: int = 338
) -> Tokenizer:
    """Build a bvv241-style tokenizer whose n-grams are mined from ``corpus``.

    Each corpus file is one "language" group: its top ``top_k`` n-grams for every n in ``ngrams``
    are kept, the union is deduplicated and sorted by (-length, text). ``compact=False`` gives the
    paper's 65,536-id layout (GrowlmError if the n-grams overflow its 8,192 slots);
    ``compact=True`` gives dense ids: specials, then the corpus's characters, then the n-grams.
    Corpora are streamed, so memory is bounded by the n-gram counts, not the text size.
    """
    if not corpus:
        raise GrowlmError("build_tokenizer needs at least one corpus file")
    ns = _check_args(ngrams, top_k)
    paths = [Path(p) for p in corpus]
    groups: list[list[str]] = []
    seen: set[str] = set()
    for p in paths:
        counters, chars = mine_ngrams(p, ns)
        groups.extend(_ranked(counters[n]) for n in ns)
        seen |= chars
    if compact:
        alphabet = sorted(seen)
        grams = _select_ngrams(groups, top_k, set(alphabet), set(SPECIAL_TOKENS))
        strings = [*SPECIAL_TOKENS, *alphabet, *grams]
    else:
        grams = _select_ngrams(groups, top_k, _full_alphabet(), set(_full_layout([])))
        strings = _full_layout(grams)
    recipe = {
        "source": "corpus",
        "corpus": [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths],
        "ngrams": list(ns),
        "top_k": top_k,
        "compact": compact,
    }
    return _assemble(strings, grams, scheme="bvv241-compact" if compact else "bvv241", recipe=recipe)


# ----------------------------------------------------------------------------------------------
# presets from the published n-gram list


def _read_ngram_list(path: Path, ns: Sequence[int]) -> list[list[str]]:
    """Per (language, n) ranked n-grams from the published list (a Python literal, never ``eval``-ed).

    The list's own order is the ranking (the paper's ``most_common`` order, ties included).
    """
    if not path.is_file():
        raise GrowlmError(f"n-gram list not found: {path}")
    try:
        data = ast.literal_eval(read_text(path))
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise GrowlmError(f"n-gram list {path} is not a Python literal: {one_line(e)}") from None
    if not isinstance(data, list) or not data:
        raise GrowlmError(f"n-gram list {path} must be a non-empty list of languages")
    groups = []
    for k, entry in enumerate(data):
        top = entry.get("top_ngrams") if isinstance(entry, dict) else None
        if not isinstance(top, dict):
            raise GrowlmError(f"n-gram list {path}: entry {k} has no 'top_ngrams' dict")
        lang = entry.get("lang", k)
        for n in ns:
            pairs = top.get(n)
            if not isinstance(pairs, list) or not all(
                isinstance(p, tuple | list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)
                for p in pairs
            ):
                raise GrowlmError(f"n-gram list {path}: language {lang!r} has no list of (ngram, count) for n={n}")
            groups.append([g for g, _ in pairs])
    return groups


def _preset_spec(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise GrowlmError(f"unknown tokenizer preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def packaged_ngram_list(name: str) -> Traversable:
    """The published n-gram list of preset ``name``, as shipped inside the growlm package."""
    return resources.files("growlm") / "ngrams" / _preset_spec(name)["list"]


def build_preset(name: str, ngram_list: str | Path | None = None) -> Tokenizer:
    """Build a named preset; ``bvv241-2-3`` reproduces the paper's ids.

    The n-grams come from ``ngram_list`` if given, else from the preset's published list shipped
    with the package (:func:`packaged_ngram_list`); the recipe records the list's sha256 either way.
    """
    spec = _preset_spec(name)
    if ngram_list is None:
        with resources.as_file(packaged_ngram_list(name)) as packaged:
            return build_preset(name, packaged)
    path = Path(ngram_list)
    groups = _read_ngram_list(path, spec["ngrams"])
    grams = _select_ngrams(groups, spec["top_k"], _full_alphabet(), set(_full_layout([])))
    recipe = {
        "source": "preset",
        "preset": name,
        "ngram_list_sha256": sha256_file(path),
        "ngrams": list(spec["ngrams"]),
        "top_k": spec["top_k"],
        "compact": False,
    }
    return _assemble(_full_layout(grams), grams, scheme="bvv241", recipe=recipe)
