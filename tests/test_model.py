"""The paper's decoder: exact published parameter counts, forward, KV-cached generation, info."""

from __future__ import annotations

import json

import pytest
import torch

from cli_util import growlm
from growlm.errors import GrowlmError
from growlm.model import GrowLM, ModelConfig, count_params_meta, preset_config

PAPER = {  # paper.md §1.3
    "paper-9l-unicode": (247_585_792, 180_476_928),
    "paper-9l-16bit": (181_525_504, 180_476_928),
    "paper-16l-16bit": (269_699_072, 268_650_496),
}


@pytest.mark.parametrize("name", PAPER)
def test_presets_reproduce_the_published_counts(name):
    cfg, _ = preset_config(name)
    counts = count_params_meta(cfg)
    assert (counts["params_total"], counts["params_trainable"]) == PAPER[name]


def test_info_preset_json_and_unknown_preset():
    r = growlm("info", "--preset", "paper-9l-unicode", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {k: info[k] for k in ("n_layers", "d_model", "n_heads", "vocab_size")} == \
        {"n_layers": 9, "d_model": 1024, "n_heads": 32, "vocab_size": 65536}
    assert (info["params_total"], info["params_trainable"]) == PAPER["paper-9l-unicode"]
    r = growlm("info", "--preset", "paper-99l")
    assert r.returncode == 2 and "unknown preset" in r.stderr and "paper-9l-unicode" in r.stderr


def tiny(lift: int = 4, layers: int = 2, trainable: bool = False) -> GrowLM:
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=4, n_layers=layers, context=64, embed_dim=32 // lift,
                      trainable_embedding=trainable)
    m = GrowLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.embed.weight.copy_(torch.randint(0, 2, m.embed.weight.shape, generator=g).float())
        m.head.weight.normal_(0, 0.05, generator=g)
    for b in m.blocks:
        b.init_weights(g, std=0.05)
    return m.eval()


def test_substrate_is_lifted_and_frozen_unless_trainable():
    m = tiny(lift=4)
    ids = torch.tensor([[3, 5]])
    x = m.embed(ids)
    assert x.shape == (1, 2, 32)
    assert torch.equal(x[0, 0], m.embed.weight[3].repeat_interleave(4))
    assert not m.embed.weight.requires_grad and tiny(lift=1, trainable=True).embed.weight.requires_grad
    counts = m.param_counts()
    assert counts["params_total"] - counts["params_trainable"] == 97 * 8


def test_forward_matches_a_causal_reference():
    """Changing a future token never changes earlier logits; the loss is the mean next-token CE."""
    m = tiny()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(ids)
        ids2 = ids.clone()
        ids2[:, 10] = (ids2[:, 10] + 1) % 97
        assert torch.allclose(m(ids2)[:, :10], logits[:, :10], atol=1e-6)
        loss = m(ids[:, :-1], targets=ids[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert abs(float(loss) - float(ref)) < 1e-5


def test_kv_cache_matches_uncached_forward_and_generation():
    m = tiny(layers=3)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)
        cache = m.make_cache(2, 24)
        parts = [m(ids[:, :9], cache=cache), m(ids[:, 9:10], cache=cache), m(ids[:, 10:], cache=cache)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    prompt = ids[:, :5]
    assert torch.equal(m.generate(prompt, 30), m.generate(prompt, 30, use_cache=False))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = m.generate(prompt, 30, temperature=1.0, top_k=10, generator=g1)
    b = m.generate(prompt, 30, temperature=1.0, top_k=10, generator=g2, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 35)


@pytest.fixture
def lce_chunks(monkeypatch) -> list:
    """The rows per chunk of every call of torch's ``linear_cross_entropy`` (None: torch's own pick)."""
    chunks: list = []
    real_op = getattr(torch.nn.functional, "linear_cross_entropy", None)  # absent before torch 2.13

    def recording(*a, options, **k):
        chunks.append(options.batch_chunk_size)
        return real_op(*a, options=options, **k)

    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", recording, raising=False)
    return chunks


@pytest.mark.parametrize("torch_op", [True, False], ids=["linear_cross_entropy", "checkpointed"])
def test_chunked_cross_entropy_equals_the_plain_one(torch_op, monkeypatch, lce_chunks):
    import growlm.model as model

    if torch_op and model._LINEAR_CE_OPTIONS is None:
        pytest.skip("this torch has no chunked linear_cross_entropy (2.13 on)")
    if not torch_op:  # the fallback for an older torch (a GPU machine keeps its own build)
        monkeypatch.setattr(model, "_LINEAR_CE_OPTIONS", None)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (4, 50), generator=g)
    t[0, :7] = -100  # ignored positions (padding) count in neither the sum nor the mean
    a = model.chunked_cross_entropy(x, w, t, chunk_rows=37)
    ga = torch.autograd.grad(a, (x, w))
    b = torch.nn.functional.cross_entropy((x @ w.t()).reshape(-1, 300), t.reshape(-1))
    gb = torch.autograd.grad(b, (x, w))
    assert abs(float(a.detach()) - float(b.detach())) < 1e-5
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ga, gb, strict=True))
    assert lce_chunks == ([37] if torch_op else [])
    # under bf16 autocast the chunks compute bf16 logits and an fp32 loss, as the unchunked path does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a16 = model.chunked_cross_entropy(x, w, t, chunk_rows=37)
        b16 = model.chunked_cross_entropy(x, w, t, chunk_rows=1000)
    ga16, gb16 = torch.autograd.grad(a16, (x, w)), torch.autograd.grad(b16, (x, w))
    assert a16.dtype == torch.float32 and abs(a16.item() - b16.item()) < 1e-5 and len(lce_chunks) == int(torch_op)
    assert abs(a16.item() - b.item()) > 1e-4  # bf16 really ran
    # the weight gradient sums bf16 products chunk by chunk: equal to bf16 rounding (0.3% of its largest entry)
    assert all(p.dtype == torch.float32 and (p - q).abs().max() <= 1e-2 * q.abs().max()
               for p, q in zip(ga16, gb16, strict=True))


def test_cross_entropy_takes_torchs_chunked_op_from_one_cpu_chunk_on(lce_chunks):
    import growlm.model as model

    if model._LINEAR_CE_OPTIONS is None:
        pytest.skip("this torch has no chunked linear_cross_entropy (2.13 on)")
    chunks = lce_chunks
    w = torch.randn(64, 8, requires_grad=True)
    for rows, expect in ((model._LINEAR_CE_CPU_CHUNK - 1, []), (model._LINEAR_CE_CPU_CHUNK, [model._LINEAR_CE_CPU_CHUNK])):
        chunks.clear()
        x = torch.randn(rows, 8, requires_grad=True)
        t = torch.randint(0, 64, (rows,))
        loss = model.chunked_cross_entropy(x, w, t)
        assert chunks == expect
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(x @ w.t(), t), atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the plain bf16 path, at any size
            model.chunked_cross_entropy(x, w, t)
        assert chunks == expect


@pytest.mark.parametrize("bad, match", [
    ({"d_model": 30, "n_heads": 4}, "not divisible"),
    ({"d_model": 32, "n_heads": 32}, "must be even"),
    ({"d_model": 32, "n_heads": 4, "embed_dim": 5}, "not a multiple"),
    ({"d_model": 32, "n_heads": 4, "vocab_size": 0}, "vocab_size must be positive"),
])
def test_bad_configs_are_clear_errors(bad, match):
    with pytest.raises(GrowlmError, match=match):
        ModelConfig(**{"vocab_size": 10, **bad})


@pytest.mark.parametrize("frozen", [0, 2])
def test_flop_model_matches_torch_flop_counter(frozen):
    """``flop_per_token`` (the MFU numerator) against the matmul and attention FLOPs torch counts in a real
    training step: monolithic, and a grow stage whose first ``frozen`` blocks run forward only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from growlm.growth import set_trainable
    from growlm.model import flop_per_token
    from growlm.plan import StageSpec

    cfg = ModelConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=3, context=32)
    model = GrowLM(cfg)
    spec = StageSpec(grow=3 - frozen, tokens=1) if frozen else StageSpec(grow=0, train="all", tokens=1)
    set_trainable(model, spec, list(range(frozen, 3)))
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    # the math backend runs attention as matmuls the counter sees (it has no rule for the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, targets=x).backward()
    counted = counter.get_total_flops() / x.numel()
    # the model counts biases and norm weights as parameters (6 FLOPs each): 1.6% at d 64, 0.1% at d 1024
    assert counted == pytest.approx(flop_per_token(cfg, frozen=frozen), rel=0.02)
