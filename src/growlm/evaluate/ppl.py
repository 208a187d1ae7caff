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
models with different vocabularies can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from growlm.errors import GrowlmError
from growlm.evaluate import LM, model_device


@dataclass(frozen=True)
class Window:
    """Token ids fed to the model, of which the last ``n_scored`` are targets."""

    ids: list[int]
    n_scored: int


def windows(ids: Sequence[int], context: int, stride: int) -> list[Window]:
    """The scoring windows of one token sequence (see the module docstring)."""
    if not 1 <= stride < context:
        # a window must keep at least one token of left context for its first target
        raise GrowlmError(f"stride must be between 1 and the model context minus one ({context - 1}), got {stride}")
    out: list[Window] = []
    scored_to = 1  # the first token has no left context and is never a target
    end = min(context, len(ids))
    while scored_to < len(ids):
        begin = max(0, end - context)
        out.append(Window(list(ids[begin:end]), end - scored_to))
        scored_to = end
        end = min(end + stride, len(ids))
    return out


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


def _read(item: str | Path) -> str:
    if isinstance(item, str):
        return item
    try:
        return Path(item).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise GrowlmError(f"text file not found: {item}") from e
    except IsADirectoryError as e:
        raise GrowlmError(f"{item} is a directory, not a text file") from e
    except UnicodeDecodeError as e:
        raise GrowlmError(f"{item} is not UTF-8 text: {e}") from e


def perplexity(model: LM, tokenizer, texts: str | Path | Iterable[str | Path], *, stride: int | None = None,
               batch_size: int = 4, progress: bool = False) -> dict:
    """Sliding-window perplexity of ``texts`` (strings are texts, ``Path`` objects are UTF-8 files).

    Texts are scored independently (no window crosses from one into the next) and pooled:
    returns ``loss`` (mean NLL per scored token, nats), ``ppl`` (= exp(loss)), ``bits_per_byte``,
    ``n_tokens``, ``n_bytes``, ``n_texts``, ``context`` and ``stride`` (default ``context // 2``).
    """
    if isinstance(texts, str | Path):
        texts = [texts]
    if batch_size <= 0:
        raise GrowlmError(f"batch_size must be positive, got {batch_size}")
    context = model.cfg.context
    stride = max(1, context // 2) if stride is None else stride
    all_windows: list[Window] = []
    n_bytes = n_texts = 0
    for t in texts:
        text = _read(t)
        ids = tokenizer.encode(text)
        n_texts += 1
        if len(ids) < 2:
            continue
        all_windows += windows(ids, context, stride)
        n_bytes += max(0, len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8")))
    n_tokens = sum(w.n_scored for w in all_windows)
    if n_tokens == 0:
        raise GrowlmError("nothing to score: every text is shorter than two tokens")
    with tqdm(total=len(all_windows), unit="window", desc="perplexity", disable=not progress) as bar:
        nll = sum(score_windows(model, all_windows, batch_size, bar.update))
    loss = nll / n_tokens
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_texts": n_texts,
        "context": context,
        "stride": stride,
    }
