"""Shared fixtures: a tiny real tokenizer, substrate and saved model, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXT_EN = (
    "The quick brown fox jumps over the lazy dog. A model grows layer by layer on a frozen substrate.\n"
    "Question: What is the capital of France?\nAnswer: Paris\n"
    "Options: A) red B) green C) blue D) yellow\n"
)
TEXT_RU = "Съешь же ещё этих мягких французских булок, да выпей чаю. Модель растёт слой за слоем.\n"
TEXT_ZH = "我们的模型一层一层地生长。冻结的基底是共享的接口。\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small mixed-language corpus (train/valid files)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text((TEXT_EN + TEXT_RU + TEXT_ZH) * 40, encoding="utf-8")
    (d / "valid.txt").write_text((TEXT_EN + TEXT_RU + TEXT_ZH) * 4, encoding="utf-8")
    (d / "en.txt").write_text(TEXT_EN * 60, encoding="utf-8")
    (d / "ru.txt").write_text(TEXT_RU * 60, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    """A compact bvv241-style tokenizer over the fixture corpus, saved to disk."""
    from growlm.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer([corpus_dir / "train.txt"], compact=True).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-block model over the 16-bit binary substrate, saved as a model dir."""
    return save_tiny_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("model") / "tiny", seed=0)


def save_tiny_model(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A 2-block model over the 16-bit binary substrate of ``tokenizer_dir``, its weights drawn from
    ``seed``, saved as the model dir ``out``: models of different seeds share one docking port."""
    from growlm.model import GrowLM, ModelConfig
    from growlm.store.model import save_model
    from growlm.substrate import build_substrate
    from growlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    sub = build_substrate("binary", dim=64, tokenizer=tok, bits=16)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_layers=2, context=128, embed_dim=16)
    torch.manual_seed(seed)
    model = GrowLM(cfg)
    with torch.no_grad():
        model.embed.weight.copy_(sub.table)
        g = torch.Generator().manual_seed(seed)
        for blk in model.blocks:
            blk.init_weights(g)
        model.head.weight.normal_(0, 0.02, generator=g)
    save_model(model, out, tokenizer_dir=tokenizer_dir,
               substrate={"kind": sub.kind, "fingerprint": sub.fingerprint, "recipe": sub.recipe})
    return out
