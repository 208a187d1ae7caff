"""Hugging Face interop: export to a stock GPTNeoXForCausalLM and import back, number for number."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_of
from growlm.errors import GrowlmError
from growlm.interop import EXPORT_META, export_hf, import_hf
from growlm.loading import load_model
from growlm.store.model import save_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "Модель растёт слой за слоем.",
    "冻结的基底是共享的接口。",
    "<s>special</s> tokens <unk> and an unseen ✓ char",
]


@pytest.fixture(scope="module")
def hf_model(hf_export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_export).eval()


def _logits_hf(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logits_growlm(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def test_export_writes_a_standard_checkpoint(hf_export, tiny_model_dir):
    names = {p.name for p in hf_export.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", EXPORT_META} <= names
    cfg = json.loads((hf_export / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"] and cfg["use_parallel_residual"] is False
    assert cfg["rotary_pct"] == 1.0 and cfg["tie_word_embeddings"] is False and cfg["max_position_embeddings"] == 128
    record = json.loads((hf_export / EXPORT_META).read_text())
    meta = load_model(tiny_model_dir).meta
    assert record["source"]["fingerprint"] == meta.fingerprint
    assert record["substrate_fingerprint"] == meta.substrate_fingerprint
    assert record["tokenizer_fingerprint"] == meta.tokenizer_fingerprint
    assert load_file(str(hf_export / "model.safetensors"))["gpt_neox.embed_in.weight"].shape == (cfg["vocab_size"], 64)


def test_exported_logits_match(hf_model, tiny_model_dir):
    saved = load_model(tiny_model_dir)
    assert type(hf_model).__name__ == "GPTNeoXForCausalLM"
    g = torch.Generator().manual_seed(1)
    for length in (1, 17, 128):
        ids = torch.randint(0, saved.model.cfg.vocab_size, (2, length), generator=g)
        diff = (_logits_hf(hf_model, ids) - _logits_growlm(saved.model, ids)).abs().max().item()
        assert diff < 1e-4, f"length {length}: max |logit diff| {diff}"


def test_greedy_generation_matches(hf_model, tiny_model_dir):
    saved = load_model(tiny_model_dir)
    tok = saved.tokenizer()
    for text in TEXTS[:3]:
        ids = torch.tensor([tok.encode(text)])
        ours = saved.model.generate(ids, 20, eos_id=tok.eos_id)
        theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        assert theirs.tolist() == ours.tolist()


def test_auto_tokenizer_matches(hf_export, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = load_model(tiny_model_dir).tokenizer()
    hf_tok = AutoTokenizer.from_pretrained(hf_export)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_import_round_trip_is_the_same_model(hf_export, tiny_model_dir, tmp_path):
    src = load_model(tiny_model_dir)
    back = load_model(import_hf(hf_export, tmp_path / "imported"))
    assert back.model.cfg == src.model.cfg  # substrate width 16 restored from the lifted [V, 64] matrix
    for key in ("substrate_fingerprint", "tokenizer_fingerprint", "substrate", "fingerprint", "lineage"):
        assert getattr(back.meta, key) == getattr(src.meta, key), key
    ids = torch.randint(0, src.model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits_growlm(back.model, ids), _logits_growlm(src.model, ids))


def test_import_of_a_checkpoint_resaved_by_transformers(hf_export, hf_model, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    resaved = tmp_path / "resaved"
    hf_model.save_pretrained(resaved)  # transformers' own names and config keys, no growlm_export.json
    AutoTokenizer.from_pretrained(hf_export).save_pretrained(resaved)
    src = load_model(tiny_model_dir)
    back = load_model(import_hf(resaved, tmp_path / "imported"))
    assert back.model.cfg.embed_dim == 64 and back.meta.substrate.kind == "imported"
    assert back.meta.tokenizer_fingerprint == src.meta.tokenizer_fingerprint
    ids = torch.randint(0, src.model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_logits_growlm(back.model, ids), _logits_growlm(src.model, ids))


def test_import_of_a_changed_embedding_is_a_new_substrate(hf_export, tiny_model_dir, tmp_path):
    changed = tmp_path / "changed"
    copy_of(hf_export, changed)
    state = load_file(str(changed / "model.safetensors"))
    state["gpt_neox.embed_in.weight"] = state["gpt_neox.embed_in.weight"] + 0.01 * torch.randn_like(
        state["gpt_neox.embed_in.weight"])
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    src = load_model(tiny_model_dir).meta
    back = load_model(import_hf(changed, tmp_path / "imported"))
    assert back.model.cfg.embed_dim == 64 and back.meta.substrate.kind == "imported"
    assert back.meta.substrate_fingerprint != src.substrate_fingerprint
    assert back.meta.tokenizer_fingerprint == src.tokenizer_fingerprint
    assert back.meta.lineage == [*src.lineage, src.fingerprint]


def test_export_merges_lora_adapters(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from growlm.lora import add_lora

    src = load_model(tiny_model_dir)
    model = src.model
    model.lora_records.append(add_lora(model, "s1", rank=2, alpha=4, blocks=[1], targets=["qkv", "fc"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    adapted = tmp_path / "adapted"
    save_model(model, adapted, tokenizer_dir=src.tokenizer_dir, substrate=src.meta.substrate.to_json())
    out = export_hf(adapted, tmp_path / "hf")
    assert json.loads((out / EXPORT_META).read_text())["lora_merged"] is True
    ids = torch.randint(0, model.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(4))
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = _logits_growlm(load_model(adapted).model, ids)
    assert (_logits_hf(hf_model, ids) - reference).abs().max().item() < 1e-4
    base = _logits_growlm(load_model(tiny_model_dir).model, ids)
    assert (base - reference).abs().max().item() > 1e-3  # the adapters really changed the model


def test_refuses_existing_out_dir(hf_export, tiny_model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(GrowlmError, match="refusing to overwrite"):
        export_hf(tiny_model_dir, tmp_path / "taken")
    with pytest.raises(GrowlmError, match="refusing to overwrite"):
        import_hf(hf_export, tmp_path / "taken")
    assert not any((tmp_path / "taken").iterdir())


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "llama"}, "GPT-NeoX"),
    ({"use_parallel_residual": True}, "parallel residuals"),
    ({"rotary_pct": 0.25, "rope_parameters": None}, "rotary embedding covers 0.25"),
    ({"hidden_act": "relu"}, "exact GELU"),
])
def test_import_refuses_other_architectures(hf_export, tmp_path, change, message):
    other = tmp_path / "other"
    copy_of(hf_export, other)
    cfg = json.loads((other / "config.json").read_text()) | change
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GrowlmError, match=message) as err:
        import_hf(other, tmp_path / "imported")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "imported").exists()
