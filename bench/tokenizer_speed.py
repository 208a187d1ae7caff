"""Encoding speed of the bvv241 tokenizer on one CPU core, next to a raw ``tokenizers`` byte-level BPE.

Mixed English/Russian/Chinese text (a few MB, built by shuffling varied sentences) is encoded
(a) as one document and (b) as a batch of lines, by growlm's Tokenizer and by a byte-level BPE
trained with ``tokenizers`` on the same text in the same run (its ``encode``/``encode_batch``, and
``encode_batch_fast``, the offset-free call growlm uses). Reported: median MB/s (UTF-8 bytes) over
repeated runs after a warm-up. Goal: >= 5 MB/s/core for growlm.

    python bench/tokenizer_speed.py [--mb 4] [--repeats 5] [--json]
"""

from __future__ import annotations

import os

# One core for both tokenizers: must be set before tokenizers starts its thread pool.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from collections.abc import Callable  # noqa: E402

import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from growlm.tokenizer import Tokenizer, build_preset  # noqa: E402
from timing import median_seconds  # noqa: E402

SENTENCES = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "A model grows layer by layer on a frozen substrate.",
        "Researchers published the results of their experiments yesterday.",
        "The committee will meet again next Thursday to discuss the budget.",
        "She walked along the river, thinking about the letter she had received.",
        "Modern compilers perform aggressive optimisations on intermediate code.",
        "In 1969, astronauts first set foot on the surface of the Moon.",
        "Would you like another cup of tea before the train leaves?",
    ],
    "ru": [
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Модель растёт слой за слоем на замороженной основе.",
        "Вчера исследователи опубликовали результаты своих экспериментов.",
        "Комитет снова соберётся в следующий четверг, чтобы обсудить бюджет.",
        "Она шла вдоль реки и думала о письме, которое получила утром.",
        "Современные компиляторы выполняют сложные оптимизации промежуточного кода.",
        "Зимой в деревне было тихо, только снег скрипел под ногами.",
        "Не хотите ли ещё чашку чая, пока поезд не ушёл?",
    ],
    "zh": [
        "我们的模型一层一层地生长。",
        "冻结的基底是共享的接口。",
        "研究人员昨天发表了他们的实验结果。",
        "委员会将在下周四再次开会讨论预算。",
        "她沿着河边散步，想着早上收到的那封信。",
        "现代编译器会对中间代码进行复杂的优化。",
        "冬天的村庄很安静，只有脚下的雪在咯吱作响。",
        "火车开走之前，您还想再喝一杯茶吗？",
    ],
}


def mixed_text(mb: float, seed: int = 0) -> list[str]:
    """Lines of shuffled en/ru/zh sentences (2-8 per line, one language per line) totalling ~``mb`` MB."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < mb * 1e6:
        lang = rng.choice(list(SENTENCES))
        sep = "" if lang == "zh" else " "
        line = sep.join(rng.choice(SENTENCES[lang]) for _ in range(rng.randint(2, 8)))
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
    return lines


def our_tokenizer() -> tuple[Tokenizer, str]:
    """The paper's preset, from the n-gram list the package ships."""
    return build_preset("bvv241-2-3"), "bvv241-2-3 preset"


def byte_level_bpe(lines: list[str], vocab_size: int = 32_000) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE trained on the benchmark text itself."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def mb_per_s(fn: Callable[[], object], n_bytes: int, repeats: int) -> float:
    """Median throughput of ``fn`` over ``repeats`` timed runs, after one warm-up run."""
    return n_bytes / median_seconds(fn, repeats, warmup=1) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="size of the generated text in MB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()

    lines = mixed_text(a.mb)
    text = "\n".join(lines)
    n_bytes = len(text.encode("utf-8"))
    ours, ours_kind = our_tokenizer()
    raw = byte_level_bpe(lines)

    assert ours.decode(ours.encode(text)) == text
    result = {
        "bytes": n_bytes,
        "lines": len(lines),
        "threads": 1,
        "repeats": a.repeats,
        "ours": ours_kind,
        "ours_vocab": ours.vocab_size,
        "ours_bytes_per_token": round(n_bytes / len(ours.encode(text)), 3),
        "raw_bpe_vocab": raw.get_vocab_size(),
        "raw_bpe_bytes_per_token": round(n_bytes / len(raw.encode(text).ids), 3),
        "ours_document_mb_s": mb_per_s(lambda: ours.encode(text), n_bytes, a.repeats),
        "ours_lines_mb_s": mb_per_s(lambda: ours.encode_batch(lines), n_bytes, a.repeats),
        "raw_bpe_document_mb_s": mb_per_s(lambda: raw.encode(text), n_bytes, a.repeats),
        "raw_bpe_lines_mb_s": mb_per_s(lambda: raw.encode_batch(lines), n_bytes, a.repeats),
        # the same offset-free call that growlm uses internally, for a like-for-like comparison
        "raw_bpe_lines_fast_mb_s": mb_per_s(lambda: raw.encode_batch_fast(lines), n_bytes, a.repeats),
    }
    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    if a.json:
        print(json.dumps(result))
        return
    print(f"{n_bytes / 1e6:.1f} MB mixed en/ru/zh text, {len(lines):,} lines, 1 thread, median of {a.repeats}")
    print(f"ours ({ours_kind}, vocab {ours.vocab_size:,}): {result['ours_bytes_per_token']} bytes/token")
    print(f"raw byte-level BPE (vocab {raw.get_vocab_size():,}): {result['raw_bpe_bytes_per_token']} bytes/token")
    print(f"{'':12}{'document MB/s':>16}{'lines MB/s':>14}")
    print(f"{'ours':12}{result['ours_document_mb_s']:>16}{result['ours_lines_mb_s']:>14}")
    print(f"{'raw BPE':12}{result['raw_bpe_document_mb_s']:>16}{result['raw_bpe_lines_mb_s']:>14}")
    print(f"raw BPE lines with encode_batch_fast (no offsets): {result['raw_bpe_lines_fast_mb_s']} MB/s")


if __name__ == "__main__":
    main()
