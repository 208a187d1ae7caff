"""Cost of a mixture: one N-expert forward vs N forwards of one expert, side by side.

The mixture runs every expert, so N × one expert is the floor; the figure is the ratio of the
medians (goal <= 1.1x), i.e. what combining the logits adds. Every rule and the single experts run
in one process, in turn within each repeat, so machine noise hits them alike. Measured for a full-window forward
and for one KV-cached decoding step, for each combine rule.

    python bench/merge_cost.py [--quick] [--json] [--experts 2 --d-model 256 --layers 4 --vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from growlm.mixture import Mixture, Router  # noqa: E402
from growlm.model import GrowLM, ModelConfig  # noqa: E402
from growlm.rules import RULES, Rule, make_rule  # noqa: E402
from timing import interleaved_medians  # noqa: E402


def make_expert(cfg: ModelConfig, seed: int) -> GrowLM:
    g = torch.Generator().manual_seed(seed)
    m = GrowLM(cfg)
    with torch.no_grad():
        m.embed.weight.normal_(0, 0.03, generator=g)
        m.head.weight.normal_(0, 0.02, generator=g)
    for b in m.blocks:
        b.init_weights(g)
    return m.eval()


def mixtures(experts: list[GrowLM]) -> dict[str, Mixture]:
    """One mixture per registered combine rule: a weighted rule with equal weights in probability space
    (the costlier one), a trained rule with a fresh router."""
    n = len(experts)
    width = sum(e.cfg.d_model for e in experts)
    out = {}
    for name in RULES.names():
        kind = RULES.get(name)
        if kind.trained:
            out[name] = Mixture(experts, Rule(name, kind.spaces[0], None), Router(width, [1.0 / n] * n))
        elif kind.weighted:
            out[f"{name}-probs"] = Mixture(experts, make_rule(name, n, [1.0] * n, "probs"))
        else:
            out[name] = Mixture(experts, make_rule(name, n))
    return out


def decode_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One KV-cached generation step: the last token of ``x`` after a cached prompt of the rest."""
    cache = model.make_cache(x.shape[0], x.shape[1])
    model(x[:, :-1], cache=cache)
    prefix = cache.pos

    def step() -> None:
        cache.pos = prefix  # rewind, so every repeat decodes the same position
        for c in getattr(cache, "caches", []):
            c.pos = prefix
        model(x[:, -1:], cache=cache)
    return step


def side_by_side(mixes: dict[str, Mixture], experts: list[GrowLM], make: Callable, repeats: int,
                 device: torch.device) -> dict[str, dict]:
    """Every rule's mixture and the N single experts, timed in turn in each round so that noise, and the
    allocator's state, which one call leaves to the next, fall on all alike. ``make(model)`` gives the
    call to time."""
    singles = [make(e) for e in experts]
    fns = {"N x one": lambda: [f() for f in singles], **{name: make(mix) for name, mix in mixes.items()}}
    med = interleaved_medians(fns, repeats, device=device)
    one = med.pop("N x one")
    return {name: {"mixture_ms": round(1e3 * t, 3), "n_single_ms": round(1e3 * one, 3), "ratio": round(t / one, 4)}
            for name, t in med.items()}


@torch.no_grad()
def measure(n: int, d_model: int, layers: int, vocab: int, batch: int, context: int, repeats: int,
            device: torch.device) -> dict:
    cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=max(1, d_model // 64), n_layers=layers,
                      context=context, embed_dim=d_model)
    experts = [make_expert(cfg, s).to(device) for s in range(n)]
    mixes = {name: mix.to(device) for name, mix in mixtures(experts).items()}
    x = torch.randint(0, vocab, (batch, context), device=device)
    full = side_by_side(mixes, experts, lambda m: (lambda: m(x)), repeats, device)
    step = side_by_side(mixes, experts, lambda m: decode_step(m, x), repeats, device)
    rows = {name: {"forward": full[name], "decode_step": step[name]} for name in mixes}
    return {"device": str(device), "experts": n, "d_model": d_model, "layers": layers, "vocab": vocab,
            "batch": batch, "context": context, "repeats": repeats, "threads": torch.get_num_threads(),
            "rules": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.layers, a.vocab, a.context, a.repeats = 128, 2, 2048, 128, 5
    res = measure(a.experts, a.d_model, a.layers, a.vocab, a.batch, a.context, a.repeats, torch.device(a.device))
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['experts']} experts, d {res['d_model']}, {res['layers']} layers, V {res['vocab']}, "
          f"batch {res['batch']} x {res['context']} on {res['device']} ({res['threads']} threads)")
    print(f"{'rule':16s} {'what':12s} {'mixture ms':>11s} {'N x one ms':>11s} {'ratio':>7s}")
    for name, r in res["rules"].items():
        for what, m in r.items():
            print(f"{name:16s} {what:12s} {m['mixture_ms']:11.3f} {m['n_single_ms']:11.3f} {m['ratio']:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
