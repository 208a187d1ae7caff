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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from growlm.growth import set_trainable  # noqa: E402
from growlm.model import GrowLM, ModelConfig, block_param_count, compiled_blocks, head_param_count  # noqa: E402
from growlm.plan import StageSpec  # noqa: E402
from growlm.training import make_optimizer, optimizer_step  # noqa: E402
from timing import interleaved_medians  # noqa: E402


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


def stepper(model: GrowLM, trunk: torch.Tensor | None = None, trunk_depth: int | None = None,
            lr: float = 1e-4, autocast: torch.dtype | None = None):
    """One training step exactly as ``growlm train`` takes it: the loop's optimizer and ``optimizer_step``
    (forward, backward, clip 1.0, fused AdamW with the on-device non-finite guard)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr, weight_decay=0.0)
    device = params[0].device
    halted = torch.zeros((), device=device)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal halted
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(x, targets=y, trunk=trunk, trunk_depth=trunk_depth)
        taken = optimizer_step(loss, params, opt, 1.0, halted)
        halted = taken.halted
        return taken.loss

    return step


def measure(cfg: ModelConfig, layers: int, new: int, batch: int, repeats: int, device: torch.device | None = None,
            autocast: torch.dtype | None = None, compile: bool = False) -> dict:
    """Interleaved timings of monolithic, grow and trunk-cached steps of ``cfg`` (``layers + new`` blocks)."""
    device = device or torch.device("cpu")
    context, vocab = cfg.context, cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, context), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, context), generator=g).to(device)

    mono = make_model(cfg).to(device)
    set_trainable(mono, StageSpec(grow=0, train="all", tokens=1), [])
    grown = make_model(cfg).to(device)
    set_trainable(grown, StageSpec(grow=new, tokens=1), list(range(layers, layers + new)))
    cached = make_model(cfg).to(device)
    set_trainable(cached, StageSpec(grow=new, tokens=1), list(range(layers, layers + new)))
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        trunk = cached.trunk(x, layers)

    runs = {"mono": stepper(mono, autocast=autocast), "grow": stepper(grown, autocast=autocast),
            "cached": stepper(cached, trunk, layers, autocast=autocast)}
    fns = {name: (lambda f=f: f(x, y)) for name, f in runs.items()}
    # as the training loop compiles: per block, so the three models share their block graphs
    with compiled_blocks(torch.nn.ModuleList([mono, grown, cached]), compile):
        # warm-up: compilation, allocator, kernels, optimizer state
        med = interleaved_medians(fns, repeats, warmup=3 if compile else 2, device=device)
    pb, h = block_param_count(cfg), head_param_count(cfg)
    L, k = layers, new
    tokens = batch * context
    return {
        "config": {"d_model": cfg.d_model, "layers_frozen": L, "new": k, "vocab": vocab, "batch": batch,
                   "context": context, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
                   "autocast": str(autocast) if autocast else None, "compile": compile},
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
    cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_heads=max(1, a.d_model // 64), n_layers=a.layers + a.new,
                      context=context)
    r = measure(cfg, a.layers, a.new, a.batch, repeats)
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
