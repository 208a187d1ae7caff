"""Sliding-window perplexity and bits per byte.

Each text is tokenized on its own (no BOS is added) and cut into windows of the model's context
``C``. Window ends advance by ``stride`` (``C, C + stride, …``, the last one clamped to the end of the
text) and each window starts ``C`` tokens before its end, so every window is full length whenever the
text allows. A window scores only the tokens no earlier window scored, each given everything before
it in the window: every token after the first is scored exactly once, with at least ``C - stride``
tokens of left context (all of it inside the first window). The first token of a text is never
scored, since nothing precedes it. For a text that fits one window this is exactly the causal-LM loss
with ``labels = input_ids``.

``bits_per_byte`` = (sum of the NLL of the scored tokens) / ln 2 / ``n_bytes``, where ``n_bytes``
is the UTF-8 length of the text the scored tokens cover: the whole text minus its first token
(``len(text.encode()) - len(decode([first_id]).encode())``). It does not depend on the tokenizer, so
models with different vocabularies can be compared. ``bits_per_char`` divides by the characters
(code points) instead: it compares scripts, where bytes do not (a Cyrillic letter is two bytes in
UTF-8, a Han character three, a Latin letter one).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from growlm.corpus import regular_file
from growlm.data import text_pieces
from growlm.errors import GrowlmError
from growlm.evaluation import LM, model_device

# Characters of a file encoded at a time: the tokenizer's working memory per character is large
# (about 100 bytes), and windows are scored as soon as they are complete anyway.
_CHUNK_CHARS = 1 << 16


@dataclass(frozen=True)
class Window:
    """Token ids fed to the model, of which the last ``n_scored`` are targets."""

    ids: list[int]
    n_scored: int


class _WindowStream:
    """The windows of one token sequence, made as its ids arrive (see the module docstring).

    Only the ids a later window can still reach are kept, so a text of any length needs memory
    bounded by the context, the stride and the ids of one fed piece.
    """

    def __init__(self, context: int, stride: int) -> None:
        if not 1 <= stride < context:
            # a window must keep at least one token of left context for its first target
            raise GrowlmError(f"stride must be between 1 and the model context minus one ({context - 1}), got {stride}")
        self.context, self.stride = context, stride
        self._buf: list[int] = []
        self._base = 0  # position of _buf[0] in the whole sequence
        self.seen = 0  # ids fed so far
        self._scored_to = 1  # the first token has no left context and is never a target
        self._end = context  # where the next full window ends

    def feed(self, ids: Sequence[int]) -> list[Window]:
        """Add the next ids; returns the windows they complete."""
        self._buf.extend(ids)
        self.seen += len(ids)
        out = []
        while self.seen >= self._end:
            out.append(self._window(self._end))
            self._end += self.stride
        # the last window of the text may begin up to stride + context before the next end
        keep_from = max(0, self._end - self.stride - self.context)
        if keep_from > self._base:
            del self._buf[: keep_from - self._base]
            self._base = keep_from
        return out

    def finish(self) -> list[Window]:
        """The last window, clamped to the end of the sequence, if any token is still unscored."""
        return [self._window(self.seen)] if self._scored_to < self.seen else []

    def _window(self, end: int) -> Window:
        begin = max(0, end - self.context)
        w = Window(self._buf[begin - self._base : end - self._base], end - self._scored_to)
        self._scored_to = end
        return w


def windows(ids: Sequence[int], context: int, stride: int) -> list[Window]:
    """The scoring windows of one token sequence (see the module docstring)."""
    stream = _WindowStream(context, stride)
    return stream.feed(ids) + stream.finish()


def window_nll(model: LM, batch: Sequence[Window]) -> list[float]:
    """Summed NLL (nats) of each window's scored tokens; one forward pass, windows padded on the right."""
    device = model_device(model)
    width = max(len(w.ids) for w in batch)
    idx = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    for i, w in enumerate(batch):
        idx[i, :len(w.ids)] = torch.tensor(w.ids, device=device)
    logits = model(idx)
    out = []
    for i, w in enumerate(batch):
        # right padding never reaches earlier positions of a causal model, so positions < len(ids) are exact
        n = len(w.ids)
        pred = logits[i, n - 1 - w.n_scored:n - 1].float()
        tgt = idx[i, n - w.n_scored:n]
        # per-token losses in float32, summed in float64 so long texts do not accumulate rounding
        out.append(F.cross_entropy(pred, tgt, reduction="none").double().sum().item())
    return out


def score_windows(model: LM, wins: Sequence[Window], batch_size: int,
                  advance: Callable[[int], object] | None = None) -> list[float]:
    """Summed NLL of every window, in input order, batching windows of similar length together.

    ``advance(k)`` is called after each batch of ``k`` windows (a progress bar's ``update``).
    """
    model.eval()
    order = sorted(range(len(wins)), key=lambda i: -len(wins[i].ids))  # longest first: little padding
    out = [0.0] * len(wins)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            for i, v in zip(chunk, window_nll(model, [wins[i] for i in chunk]), strict=True):
                out[i] = v
            if advance is not None:
                advance(len(chunk))
    return out


def _pieces(item: str | Path, cut_chars: Sequence[str]) -> Iterator[str]:
    """The text of one item in bounded pieces whose ids, encoded one by one, are those of the whole
    text: a string is one piece, a file is streamed (an empty file is a text with nothing to score)."""
    if isinstance(item, str):
        if item:
            yield item
        return
    p = Path(item)
    if regular_file(p, "text file").st_size:
        yield from text_pieces(p, cut_chars, what="text file", chunk_chars=_CHUNK_CHARS)


def perplexity(model: LM, tokenizer, texts: str | Path | Iterable[str | Path], *, stride: int | None = None,
               batch_size: int = 4, progress: bool = False) -> dict:
    """Sliding-window perplexity of ``texts`` (strings are texts, ``Path`` objects are UTF-8 files).

    Texts are scored independently (no window crosses from one into the next) and pooled:
    returns ``loss`` (mean NLL per scored token, nats), ``ppl`` (= exp(loss)), ``bits_per_byte``,
    ``bits_per_char``, ``n_tokens``, ``n_bytes``, ``n_chars``, ``n_texts``, ``context``, ``stride``
    (default ``context // 2``) and ``unk_rate`` (the share of all encoded tokens that are ``<unk>``:
    text the vocabulary cannot hold, which a score over it says nothing about). Files are read,
    encoded and scored in bounded pieces, so memory does not grow with their size.
    """
    if isinstance(texts, str | Path):
        texts = [texts]
    if batch_size <= 0:
        raise GrowlmError(f"batch_size must be positive, got {batch_size}")
    context = model.cfg.context
    stride = max(1, context // 2) if stride is None else stride
    _WindowStream(context, stride)  # checks the stride before any file is read
    unk_id = tokenizer.unk_id
    nll = 0.0
    n_tokens = n_bytes = n_chars = n_texts = n_ids = n_unk = 0
    pending: list[Window] = []
    with tqdm(unit="window", desc="perplexity", disable=not progress) as bar:

        def score_pending() -> None:
            nonlocal nll
            for v in score_windows(model, pending, batch_size, bar.update):
                nll += v  # in window order, as one sum over all windows would add them
            pending.clear()

        for t in texts:
            n_texts += 1
            stream = _WindowStream(context, stride)
            first_id, text_bytes, text_chars = None, 0, 0
            for piece in _pieces(t, tokenizer.cut_chars):
                ids = tokenizer.encode(piece)
                if first_id is None and ids:
                    first_id = ids[0]
                text_bytes += len(piece.encode("utf-8"))
                text_chars += len(piece)
                n_ids += len(ids)
                n_unk += ids.count(unk_id)
                pending += stream.feed(ids)
                if len(pending) >= batch_size:
                    score_pending()
            pending += stream.finish()
            if stream.seen >= 2:
                first = tokenizer.decode([first_id])
                n_bytes += max(0, text_bytes - len(first.encode("utf-8")))
                n_chars += max(0, text_chars - len(first))
                n_tokens += stream.seen - 1
        score_pending()
    if n_tokens == 0:
        raise GrowlmError("nothing to score: every text is shorter than two tokens")
    loss = nll / n_tokens
    return {
        "loss": loss,
        # exp overflows past a loss of ~709 nats (a diverged or hostile model): its perplexity is infinite
        "ppl": math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf,
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "bits_per_char": nll / math.log(2) / n_chars if n_chars else float("nan"),
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_chars": n_chars,
        "n_texts": n_texts,
        "context": context,
        "stride": stride,
        "unk_rate": n_unk / n_ids if n_ids else 0.0,
    }
