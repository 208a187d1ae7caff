"""Modular composition: combine rules, the docking-port check, mixture dirs, router and head tuning."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_util import snapshot
from growlm.cli import main
from growlm.compose import Tuning, add_expert, merge
from growlm.errors import GrowlmError
from growlm.growth import grow
from growlm.loading import load_mixture, load_model
from growlm.plan import TrainSpec
from growlm.store.mixture import HEADS, MIXTURE_JSON, ROUTER, info_mixture
from growlm.store.model import save_model


def _variant(src: Path, out: Path, *, seed: int, grow_by: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A saved expert derived from ``src``: perturbed head, optionally ``grow_by`` extra blocks."""
    saved = load_model(src)
    model = saved.model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.add_(0.05 * torch.randn(model.head.weight.shape, generator=g))
    grow(model, grow_by, "random", g)
    save_model(model, out, tokenizer_dir=tokenizer_dir or saved.tokenizer_dir, substrate=saved.meta.substrate.to_json())
    return out


@pytest.fixture(scope="module")
def experts(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """Three experts over one docking port; the third is one block deeper."""
    d = tmp_path_factory.mktemp("experts")
    return [_variant(tiny_model_dir, d / "a", seed=1), _variant(tiny_model_dir, d / "b", seed=2),
            _variant(tiny_model_dir, d / "c", seed=3, grow_by=1)]


@pytest.fixture(scope="module")
def idx(tiny_model_dir) -> torch.Tensor:
    v = load_model(tiny_model_dir).model.cfg.vocab_size
    return torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(0))


def _expert_logits(paths: list[Path], idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([load_model(p).model.eval()(idx) for p in paths])


# ----------------------------------------------------------------------------------------------
# Combine rules, exact


@pytest.mark.parametrize("combine,weights,space", [
    ("mean-logits", None, "logits"),
    ("mean-probs", None, "logits"),
    ("weighted", [2.0, 1.0, 1.0], "logits"),
    ("weighted", [0.0, 3.0, 1.0], "probs"),
])
def test_combine_rules_exact(experts, idx, tmp_path, combine, weights, space):
    out = merge(experts, tmp_path / "mix", combine=combine, weights=weights, space=space)
    mix, _ = load_mixture(out)
    with torch.no_grad():
        got = mix(idx)
    la, lb, lc = _expert_logits(experts, idx).double()  # the reference, computed without rounding noise
    if combine == "mean-logits":
        want = (la + lb + lc) / 3
    elif combine == "mean-probs":
        want = torch.log((la.softmax(-1) + lb.softmax(-1) + lc.softmax(-1)) / 3)
    elif space == "logits":
        want = 0.5 * la + 0.25 * lb + 0.25 * lc
    else:
        want = torch.log(0.75 * lb.softmax(-1) + 0.25 * lc.softmax(-1))
    assert (got.double() - want).abs().max().item() <= 1e-6
    # the loss is the cross-entropy of the combined distribution
    y = torch.roll(idx, -1, 1)
    with torch.no_grad():
        loss = mix(idx, targets=y)
    assert abs(loss.item() - F.cross_entropy(want.flatten(0, 1), y.flatten()).item()) <= 1e-6


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("n", [2, 3])
def test_combine_logits_autograd_and_inputs_untouched(space, n):
    from growlm.rules import combine_logits

    g = torch.Generator().manual_seed(n)
    ls = [torch.randn(2, 3, 7, generator=g, requires_grad=True) for _ in range(n)]
    copies = [t.detach().clone() for t in ls]
    gate = torch.softmax(torch.randn(2, 3, n, generator=g), -1).permute(2, 0, 1).requires_grad_()
    for weights in (None, torch.full((n,), 1.0 / n), gate):
        out = combine_logits(iter(ls), weights, space)
        out.sum().backward()
        assert all(torch.equal(t.detach(), c) for t, c in zip(ls, copies, strict=True))
        with torch.no_grad():
            again = combine_logits(iter(ls), weights, space)
        w = torch.full((n,), 1.0 / n) if weights is None else weights.detach()
        w = w.reshape(*w.shape, *[1] * (4 - w.dim()))  # [N] or [N, B, T] against [N, B, T, V]
        stacked = torch.stack(copies)
        want = (w * stacked).sum(0) if space == "logits" else torch.log((w * stacked.softmax(-1)).sum(0))
        assert (again - want).abs().max().item() <= 1e-6 and (out.detach() - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_logits_reusing_the_inputs(space, dtype, monkeypatch):
    import growlm.rules as rules

    monkeypatch.setattr(rules, "_CPU_CHUNK", 4 * 7)  # four rows per chunk: the 6 rows fold in a full and a part chunk
    n, g = 3, torch.Generator().manual_seed(7)
    ls = [torch.randn(2, 3, 7, generator=g).to(dtype) for _ in range(n)]
    gate = torch.softmax(torch.randn(2, 3, n, generator=g), -1).permute(2, 0, 1)
    for weights in (None, torch.tensor([0.5, 0.3, 0.2]), gate):
        with torch.no_grad():
            want = rules.combine_logits(iter(ls), weights, space)
            given = [t.clone() for t in ls]
            got = rules.combine_logits(iter(given), weights, space, reuse_inputs=True)
        # bf16 logits: the fused in-place ops round once where the reference rounds twice (values ~1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 if got.dtype == torch.bfloat16 else 1e-6)
        # the result lives in the first expert's memory, no fresh [B, T, V] tensor, unless it is wider (bf16 in,
        # fp32 out: log-probabilities, and logits under per-token fp32 weights)
        assert (got.data_ptr() == given[0].data_ptr()) == (got.dtype == dtype)
    # under autograd the inputs are never reused: they stay as given and the gradient flows
    leaves = [t.float().requires_grad_() for t in ls]
    copies = [t.detach().clone() for t in leaves]
    rules.combine_logits(iter(leaves), gate, space, reuse_inputs=True).sum().backward()
    assert all(torch.equal(t.detach(), c) and t.grad is not None for t, c in zip(leaves, copies, strict=True))


def test_round_trip_info_and_cached_generation(experts, idx, tmp_path):
    out = merge(experts[:2], tmp_path / "mix")
    desc = json.loads((out / MIXTURE_JSON).read_text())
    assert desc["format"] == "growlm-mixture" and desc["combine"] == "mean-logits"
    assert [e["path"] for e in desc["experts"]] == ["experts/0", "experts/1"]
    for i, src in enumerate(experts[:2]):  # byte-identical copies
        assert snapshot(out / "experts" / str(i)) == snapshot(src)
    assert (out / "tokenizer").is_dir()
    mix1, tok = load_mixture(out)
    mix2, _ = load_mixture(out)
    with torch.no_grad():
        assert torch.equal(mix1(idx), mix2(idx))
    assert tok.fingerprint == desc["tokenizer_fingerprint"]
    info = info_mixture(out)
    assert info["kind"] == "mixture" and info["n_experts"] == 2 and info["fingerprint"] == desc["fingerprint"]
    assert info["params_total"] == sum(e["params_total"] for e in info["experts"])
    assert info["vocab_size"] == mix1.cfg.vocab_size and info["weights"] == [0.5, 0.5]
    # KV-cached greedy decoding equals the uncached reference, for every expert at once
    prompt = idx[:, :5]
    cached = mix1.generate(prompt, 10)
    uncached = mix1.generate(prompt, 10, use_cache=False)
    assert torch.equal(cached, uncached)


def test_experts_of_different_depth_and_cache_positions(experts, idx, tmp_path):
    mix, _ = load_mixture(merge([experts[0], experts[2]], tmp_path / "mix", combine="mean-probs"))
    assert [len(e.blocks) for e in mix.experts] == [2, 3]
    cache = mix.make_cache(idx.shape[0], idx.shape[1])
    with torch.no_grad():
        a = mix(idx[:, :7], cache=cache)
        b = mix(idx[:, 7:], cache=cache)
        full = mix(idx)
    assert cache.pos == idx.shape[1] and all(c.pos == idx.shape[1] for c in cache.caches)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Refusals: nothing is written


@pytest.fixture(scope="module")
def foreign_expert(tiny_model_dir, foreign_tokenizer, tmp_path_factory) -> Path:
    """Same substrate, but a tokenizer built from other text: another tokenizer fingerprint."""
    return _variant(tiny_model_dir, tmp_path_factory.mktemp("foreign") / "x", seed=9, tokenizer_dir=foreign_tokenizer)


def test_docking_port_mismatch_refused(experts, foreign_expert, tmp_path):
    out = tmp_path / "mix"
    with pytest.raises(GrowlmError, match="tokenizer fingerprint") as e:
        merge([experts[0], foreign_expert], out)
    msg = str(e.value)
    assert "\n" not in msg and str(foreign_expert) in msg and str(experts[0]) in msg
    fps = [json.loads((p / "model.json").read_text())["tokenizer_fingerprint"][:12] for p in (experts[0], foreign_expert)]
    assert all(fp in msg for fp in fps)
    assert list(tmp_path.iterdir()) == []


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with open(dst / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    return dst


@pytest.mark.parametrize("case, message", [
    ("one", "a mixture needs at least two experts, got 1"),
    ("count", "3 weights given for 2 experts"),
    ("negative", "weights must be finite and non-negative"),
    ("zero-sum", "weights must sum to a positive value"),
    ("not-model", r"work/empty is not a growlm model dir \(no model.json\)"),
    ("corrupt", r"checksum mismatch in .*work/bad/model.safetensors"),
    ("weights-unweighted", "weights only apply to combine"),
])
def test_bad_input_refused(experts, tmp_path, case, message):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "mix"
    kw: dict = {}
    paths = experts[:2]
    if case == "one":
        paths = experts[:1]
    elif case == "count":
        kw = {"combine": "weighted", "weights": [1.0, 2.0, 3.0]}
    elif case == "negative":
        kw = {"combine": "weighted", "weights": [1.5, -0.5]}
    elif case == "zero-sum":
        kw = {"combine": "weighted", "weights": [0.0, 0.0]}
    elif case == "not-model":
        (work / "empty").mkdir()
        paths = [experts[0], work / "empty"]
    elif case == "corrupt":
        paths = [experts[0], _corrupt_copy(experts[1], work / "bad")]
    elif case == "weights-unweighted":
        kw = {"weights": [1.0, 1.0]}
    with pytest.raises(GrowlmError, match=message) as e:
        merge(paths, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_tampered_mixture_refused(experts, tmp_path):
    out = merge(experts[:2], tmp_path / "mix")
    cases = {
        "experts/1/model.safetensors": lambda b: b[:-1] + bytes([b[-1] ^ 1]),
        "experts/0/model.json": lambda b: b.replace(b'"lineage"', b'"lineage" ', 1),
        "tokenizer/" + next(p.name for p in (out / "tokenizer").iterdir() if p.is_file()): lambda b: b + b" ",
        MIXTURE_JSON: lambda b: b.replace(b'"mean-logits"', b'"mean-probs"'),
    }
    for rel, edit in cases.items():
        bad = tmp_path / f"bad-{rel.replace('/', '_')}"
        shutil.copytree(out, bad)
        (bad / rel).write_bytes(edit((bad / rel).read_bytes()))
        with pytest.raises(GrowlmError, match="modified|checksum|fingerprint"):
            load_mixture(bad)


# ----------------------------------------------------------------------------------------------
# Continual learning


def test_add_expert_keeps_old_bytes(experts, idx, tmp_path):
    old = merge(experts[:2], tmp_path / "old")
    before = snapshot(old)
    new = add_expert(old, experts[2], tmp_path / "new")
    assert snapshot(old) == before
    for i in range(2):
        assert snapshot(new / "experts" / str(i)) == snapshot(old / "experts" / str(i))
    mix, _ = load_mixture(new)
    assert len(mix.experts) == 3 and mix.rule.combine == "mean-logits"
    with torch.no_grad():
        assert (mix(idx) - _expert_logits(experts, idx).mean(0)).abs().max().item() <= 1e-6
    # the CLI path: a mixture dir among the inputs is expanded into its experts
    assert main(["merge", str(old), str(experts[2]), "--out", str(tmp_path / "cli"), "--combine", "mean-probs"]) == 0
    assert info_mixture(tmp_path / "cli")["n_experts"] == 3
    assert snapshot(old) == before


# ----------------------------------------------------------------------------------------------
# Post-merge training through the one training loop


def test_router_and_head_tuning(experts, corpus_dir, idx, tmp_path, monkeypatch):
    import growlm.training as train_mod

    seen: list[list[str]] = []
    real_checkpoint = train_mod.Loop._checkpoint

    def spy(self, root, *a, **k):
        path = real_checkpoint(self, root, *a, **k)
        seen.append(sorted(p.name for p in path.iterdir()))
        assert path.parent.parent.parent.parent == tmp_path  # the run dir is a temp dir beside the output
        return path

    monkeypatch.setattr(train_mod.Loop, "_checkpoint", spy)
    tuning = Tuning(data=[corpus_dir / "en.txt", corpus_dir / "ru.txt"], router=True, head=True, tokens=4096, lr=3e-3,
                    spec=TrainSpec(batch_size=4, checkpoint_every=2, seed=0, device="cpu", compile=False))
    out = merge(experts[:2], tmp_path / "mix", tuning=tuning)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]  # no temp run dir left behind
    assert seen and all("trainable.safetensors" in names for names in seen)
    desc = json.loads((out / MIXTURE_JSON).read_text())
    assert desc["combine"] == "router" and desc["tensors"] == [HEADS, ROUTER]
    assert [r["stage"] for r in desc["tuning"]] == ["router", "head"]
    for r in desc["tuning"]:
        assert math.isfinite(r["train_loss"]) and r["loss_after"] < r["loss_before"]
    for i, src in enumerate(experts[:2]):  # tuned heads live beside, never inside, the expert copies
        assert snapshot(out / "experts" / str(i)) == snapshot(src)
    mix, _ = load_mixture(out)
    assert mix.router.proj.weight.abs().sum() > 0  # moved away from the zero init
    base = [load_model(p).model for p in experts[:2]]
    assert not torch.equal(mix.experts[0].head.weight, base[0].head.weight)
    mix2, _ = load_mixture(out)
    with torch.no_grad():
        assert torch.equal(mix(idx), mix2(idx))
    # tuned, the gate is per token: two hidden states get two different pairs of weights
    hidden = 10 * torch.randn(1, 2, mix.router.proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate = mix.router(hidden)
    assert gate.shape == (2, 1, 2) and not torch.allclose(gate[:, 0, 0], gate[:, 0, 1])
    assert info_mixture(out)["tuned"] == ["router", "head"]


def test_router_starts_at_the_fixed_rule(experts, idx):
    from growlm.mixture import Mixture, Router
    from growlm.rules import make_rule

    models = [load_model(p).model.eval() for p in experts[:2]]
    fixed = make_rule("weighted", 2, [3.0, 1.0], "probs")
    routed = Mixture(models, type(fixed)("router", "probs", None), Router(2 * models[0].cfg.d_model, fixed.prior(2)))
    with torch.no_grad():
        assert (routed(idx) - Mixture(models, fixed)(idx)).abs().max().item() <= 1e-6


def test_cli_tuning_flags_need_data(experts, tmp_path, capsys):
    argv = ["merge", *map(str, experts[:2]), "--out", str(tmp_path / "mix")]
    assert main([*argv, "--router"]) == 2
    assert capsys.readouterr().err.startswith("growlm: error: --router/--finetune-head need --data")
    assert main([*argv, "--data", str(experts[0] / "model.json")]) == 2
    assert capsys.readouterr().err.startswith("growlm: error: --data only applies to --router or --finetune-head")
    assert main([*argv, "--combine", "weighted", "--weights", "1,x"]) == 2
    assert capsys.readouterr().err == "growlm: error: --weights must be comma-separated numbers, got '1,x'\n"
    assert not (tmp_path / "mix").exists()


# ----------------------------------------------------------------------------------------------
# A small real check: two trained specialists and their mixtures, on both domains


def _plan(path: Path, *, tok: Path, sub: Path, text: Path) -> Path:
    path.write_text(f"""
[tokenizer]
dir = "{tok}"
[substrate]
kind = "binary"
dir = "{sub}"
[model]
d_model = 32
n_heads = 2
context = 32
[data]
train = ["{text}"]
[train]
batch_size = 8
lr = 1e-2
seed = 0
device = "cpu"
checkpoint_every = 1000
[[stage]]
grow = 1
tokens = 8192
""", encoding="utf-8")
    return path


def test_specialists_merge_real(corpus_dir, tiny_tokenizer_dir, tmp_path):
    from growlm.data import validation_batches
    from growlm.substrate import build_substrate
    from growlm.tokenizer import Tokenizer
    from growlm.training import train

    tok = Tokenizer.load(tiny_tokenizer_dir)
    build_substrate("binary", dim=32, tokenizer=tok, bits=16).save(tmp_path / "substrate")
    domains = {"en": corpus_dir / "en.txt", "ru": corpus_dir / "ru.txt"}
    experts = {}
    for name, text in domains.items():
        plan = _plan(tmp_path / f"{name}.toml", tok=tiny_tokenizer_dir, sub=tmp_path / "substrate", text=text)
        experts[name] = train(plan, tmp_path / f"run-{name}", progress=False)[-1]
    models = {f"{n} expert": load_model(p).model.eval() for n, p in experts.items()}
    for combine in ("mean-logits", "mean-probs"):
        out = merge(list(experts.values()), tmp_path / f"mix-{combine}", combine=combine)
        models[combine] = load_mixture(out)[0]

    table: dict[str, dict[str, float]] = {}
    for dom, text in domains.items():
        batches = validation_batches([text], tok, context=32, batch_size=8, cache_dir=tmp_path / "cache", max_batches=4)
        with torch.no_grad():
            for name, m in models.items():
                table.setdefault(name, {})[dom] = sum(float(m(x, targets=y)) for x, y in batches) / len(batches)
    print("\nvalidation loss (nats/token)\n" + f"{'model':14s} {'en':>7s} {'ru':>7s}")
    for name, row in table.items():
        print(f"{name:14s} {row['en']:7.3f} {row['ru']:7.3f}")
    for dom, off in (("en", "ru expert"), ("ru", "en expert")):
        for combine in ("mean-logits", "mean-probs"):
            assert table[combine][dom] < table[off][dom] - 1.0, (combine, dom, table)
