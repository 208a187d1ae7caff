"""Time per token of a grow stage (k new blocks over L frozen) vs a monolithic step of the same depth.

Both run in one process, interleaved step by step so machine noise hits them alike; the figure is
the median ratio. It is printed next to two FLOP models:

* block-only (the growth issue):   (2L + 6k) / (6(L + k))
* counting the head (performance): (2·L·P_b + 6·(k·P_b + H)) / (6·((L + k)·P_b + H))

and, for the trunk-activation cache (epochs after the first skip the frozen trunk), the same model
without the trunk term: 6·(k·P_b + H) / (6·((L + k)·P_b + H)).

    python bench/stage_cost.py [--quick] [--json] [--d-model 256 --layers 8 --new 1 --vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from growlm.growth import set_trainable  # noqa: E402
from growlm.model import GrowLM, ModelConfig, block_param_count, head_param_count  # noqa: E402
from growlm.plan import StageSpec  # noqa: E402
from timing import once  # noqa: E402


def make_model(cfg: ModelConfig, seed: int = 0) -> GrowLM:
    torch.manual_seed(seed)
    m = GrowLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.embed.weight.normal_(0, 0.03, generator=g)
        m.head.weight.normal_(0, 0.02, generator=g)
    for b in m.blocks:
        b.init_weights(g)
    return m


def stepper(model: GrowLM, trunk: torch.Tensor | None = None, trunk_depth: int | None = None):
    """One optimizer step (forward, backward, AdamW) on fixed data, as the training loop does it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = model(x, targets=y, trunk=trunk, trunk_depth=trunk_depth)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(d_model: int, layers: int, new: int, vocab: int, batch: int, context: int, repeats: int,
            threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=max(1, d_model // 64), n_layers=layers + new,
                      context=context)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, context), generator=g)
    y = torch.randint(0, vocab, (batch, context), generator=g)

    mono = make_model(cfg)
    set_trainable(mono, StageSpec(grow=0, train="all", tokens=1), [])
    grown = make_model(cfg)
    set_trainable(grown, StageSpec(grow=new, tokens=1), list(range(layers, layers + new)))
    cached = make_model(cfg)
    set_trainable(cached, StageSpec(grow=new, tokens=1), list(range(layers, layers + new)))
    trunk = cached.trunk(x, layers)

    runs = {"mono": stepper(mono), "grow": stepper(grown), "cached": stepper(cached, trunk, layers)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        for f in runs.values():
            f(x, y)
    for _ in range(repeats):
        for name, f in runs.items():
            times[name].append(once(lambda f=f: f(x, y)))
    med = {k: statistics.median(v) for k, v in times.items()}
    pb, h = block_param_count(cfg), head_param_count(cfg)
    L, k = layers, new
    tokens = batch * context
    return {
        "config": {"d_model": d_model, "layers_frozen": L, "new": k, "vocab": vocab, "batch": batch,
                   "context": context, "repeats": repeats, "threads": torch.get_num_threads()},
        "mono_s_per_token": med["mono"] / tokens,
        "grow_s_per_token": med["grow"] / tokens,
        "cached_s_per_token": med["cached"] / tokens,
        "measured_ratio": med["grow"] / med["mono"],
        "flop_ratio": (2 * L + 6 * k) / (6 * (L + k)),
        "flop_ratio_head": (2 * L * pb + 6 * (k * pb + h)) / (6 * ((L + k) * pb + h)),
        "cached_ratio": med["cached"] / med["mono"],
        "flop_ratio_cached": (6 * (k * pb + h)) / (6 * ((L + k) * pb + h)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter context (< 60 s)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    a = ap.parse_args()
    repeats = a.repeats or (5 if a.quick else 15)
    context = min(a.context, 128) if a.quick else a.context
    r = measure(a.d_model, a.layers, a.new, a.vocab, a.batch, context, repeats)
    if a.json:
        keys = ("measured_ratio", "flop_ratio", "flop_ratio_head", "cached_ratio", "flop_ratio_cached")
        print(json.dumps({k: round(r[k], 4) for k in keys}))
        return
    print(json.dumps(r, indent=2))
    print(f"grow/mono time per token: {r['measured_ratio']:.3f}  (FLOP model {r['flop_ratio']:.3f} block-only, "
          f"{r['flop_ratio_head']:.3f} with head) -> {r['measured_ratio'] / r['flop_ratio']:.2f}x / "
          f"{r['measured_ratio'] / r['flop_ratio_head']:.2f}x the model")
    print(f"with trunk cache: {r['cached_ratio']:.3f} (model {r['flop_ratio_cached']:.3f})")


if __name__ == "__main__":
    main()
