"""The demo's settings and the small pure functions its runs and its report share: sizes, languages,
experts, run names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from growlm.store import stages


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run (``full`` fits ``make demo``'s 10 minutes on 2 cores, ``quick`` a minute)."""

    d_model: int
    n_heads: int
    context: int
    batch_size: int
    depth: int  # blocks of the grown models and of the monolithic baselines
    tokens: int  # training tokens per model: a grown model's stages share them, a baseline trains on all
    expert_tokens: int  # the Chinese specialist's (the English and Russian ones train on ``tokens``)
    lr: float
    eval_every: int  # steps between the validation points of the equal-compute curves
    max_chars: int  # per language, training text
    tokenizer_chars: int  # per language, the text the vocabulary is built from (every rare character
    # is a row of the head, which the English models would pay for at every token)
    eval_chars: int  # per language, validation text
    seeds: int  # of the headline comparison
    bench_limit: int
    sample_tokens: int
    tune_tokens: int


# Small batches, many steps, a modest rate: at this size the number of updates is what learns. Measured
# on 400k English tokens, monolithic: batch 8 x 128 at lr 5e-3 reached 3.09 bits/byte, 8 x 64 2.93,
# 4 x 64 2.88, and 4 x 64 at lr 2e-3 2.67; batch 8 x 64 at lr 2e-3 runs 1.5x as fast as 4 x 64 and
# on 520k tokens lands within 0.03 of it (2.64), which is what fits make demo's ten minutes.
FULL = Scale(d_model=128, n_heads=4, context=64, batch_size=8, depth=4, tokens=520_000, expert_tokens=260_000,
             lr=2e-3, eval_every=100, max_chars=2_000_000, tokenizer_chars=300_000, eval_chars=20_000, seeds=2,
             bench_limit=10, sample_tokens=56, tune_tokens=32_768)
QUICK = Scale(d_model=32, n_heads=2, context=32, batch_size=8, depth=2, tokens=8_192, expert_tokens=4_096,
              lr=5e-3, eval_every=8, max_chars=60_000, tokenizer_chars=60_000, eval_chars=4_000, seeds=2,
              bench_limit=4, sample_tokens=24, tune_tokens=2_048)

LANGS = ("en", "ru", "zh")
ZH_CHARS = 300_000  # Debian's FreeBSD tips in Chinese; past them its Tang and Song poetry begins
# the paper's rule, the paper's rule after its post-merge head tuning, and Branch-Train-Merge's rule
MIXTURES = ("mixture-mean-logits", "mixture-mean-logits+head", "mixture-mean-probs")
PROMPTS = {"en": "To be, or not to be", "ru": "Жизнь — это", "zh": "春眠不觉晓"}
HEADLINE = ("grown-glyph", "monolithic-glyph")
# Averaging logits multiplies the experts' distributions, so an expert that never saw a script gives its
# tokens almost no probability and vetoes them whatever the others say. Measured at full scale, the
# paper's merge scored on Russian: 3.29 bits/byte from an English-only and a Russian-only expert, against
# the Russian expert's 1.80; 3.55 when only the Russian expert had also seen English (the paper's experts
# share one language); 1.97 when each expert's data held a 10% share of the other's language (English
# 3.30). Sharing Chinese too (80/10/10) cost both languages (en 3.43, ru 2.04). So each specialist is
# (its language, the languages it shares); the Chinese expert joins later and shares both.
SPECIALISTS = {"specialist-en": ("en", ("ru",)), "specialist-ru": ("ru", ("en",)), "specialist-zh": ("zh", ("en", "ru"))}
SHARE = 0.1  # of a specialist's tokens, per shared language
EXPERTS = ("specialist-en", "specialist-ru")  # the mixtures' experts
EVERY_STAGE = ("grown-glyph", "grown-binary16")  # scored at every depth, the rest at their end
# a word of three or more letters in the language's own script (an English word in a Russian sample is
# not a Russian word); Chinese is written without spaces, so it has no word rate
WORDS = {"en": re.compile(r"[A-Za-z]{3,}"), "ru": re.compile(r"[А-Яа-яЁё]{3,}")}


def seeded(name: str, seed: int) -> str:
    """The run name of ``name`` trained with ``seed`` (seed 0 keeps the plain name)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def share_weights(shared: tuple[str, ...]) -> list[float]:
    """A specialist's data weights: its own language first, then :data:`SHARE` for each ``shared`` one."""
    return [1 - SHARE * len(shared), *(SHARE for _ in shared)]


def specialist_data(data: dict, lang: str, shared: tuple[str, ...]) -> dict:
    """A specialist's data table: its language's training text and each ``shared`` language's, weighted
    by :func:`share_weights`; validated on its own language."""
    return {"train": [data[x]["train"] for x in (lang, *shared)], "weights": share_weights(shared),
            "valid": [data[lang]["valid"]]}


def final_stage(run: Path) -> Path:
    """The last finished stage dir of ``run``."""
    return stages(run)[-1][1]


def final_key(runs: dict[str, Path], name: str) -> str:
    """The scores' key of run ``name``'s final stage, ``NAME/stage-N``."""
    return f"{name}/{final_stage(runs[name]).name}"


def loss_text(x: float | None) -> str:
    """A loss read off a curve, or why there is none."""
    return "not reached" if x is None else f"{x:.3f}"
