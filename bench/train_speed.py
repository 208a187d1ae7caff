"""Training and generation speed, each figure against a reference measured in the same run.

* ``utilisation``: achieved FLOP/s of a monolithic fp32 training step (d 256, L 8, vocab 8,192)
  over this machine's fp32 matmul peak, measured here with a large ``torch.mm``.
* ``bf16``: the same step under CPU bf16 autocast vs fp32 (tokens/s), and the validation loss of
  both after equal tokens on the same learnable data.
* ``hf``: our monolithic step vs ``transformers`` GPT-NeoX of the same dims, batch and dtype.
* ``kv``: KV-cached vs uncached greedy generation of 256 new tokens.
* ``memory``: peak resident memory of a grow step vs a monolithic step (separate processes).

    python bench/train_speed.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from growlm.growth import set_trainable  # noqa: E402
from growlm.model import GrowLM, ModelConfig, flop_per_token  # noqa: E402
from growlm.plan import StageSpec  # noqa: E402
from stage_cost import make_model, stepper  # noqa: E402
from timing import interleaved_medians, square_mm  # noqa: E402


def config(d: int, layers: int, vocab: int, context: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, n_heads=max(1, d // 64), n_layers=layers, context=context)


def monolithic(cfg: ModelConfig) -> GrowLM:
    m = make_model(cfg)
    set_trainable(m, StageSpec(grow=0, train="all", tokens=1), [])
    return m


def utilisation(cfg: ModelConfig, batch: int, repeats: int) -> dict:
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
    step = stepper(monolithic(cfg))
    mm, mm_flops = square_mm(2048)  # the peak, timed in turn with the step so noise hits both alike
    med = interleaved_medians({"step": lambda: step(x, x), "mm": mm}, repeats)
    achieved = flop_per_token(cfg) * batch * cfg.context / med["step"]
    peak = mm_flops / med["mm"]
    return {"achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9, "ratio": achieved / peak, "goal": 0.60}


def markov_data(vocab: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Learnable synthetic text: each token depends on the previous one through a sparse random table."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = torch.empty(n_tokens, dtype=torch.long)
    out[0] = 0
    choice = torch.randint(0, 4, (n_tokens,), generator=g)
    for i in range(1, n_tokens):
        out[i] = nxt[out[i - 1], choice[i]]
    return out


def bf16_vs_fp32(cfg: ModelConfig, batch: int, repeats: int, steps: int) -> dict:
    data = markov_data(cfg.vocab_size, (steps + 4) * batch * (cfg.context + 1) + 1)
    rows = data[: (len(data) - 1) // (cfg.context + 1) * (cfg.context + 1)].view(-1, cfg.context + 1)
    valid = rows[-4 * batch:]
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    models = {name: monolithic(cfg) for name in dtypes}
    step_fns = {name: stepper(models[name], lr=3e-3, autocast=dt) for name, dt in dtypes.items()}
    first = rows[:batch]
    med = interleaved_medians({name: (lambda s=s: s(first[:, :-1], first[:, 1:])) for name, s in step_fns.items()},
                              repeats)
    res = {}
    for name, dtype in dtypes.items():  # then equal tokens of training each, and the validation loss
        for i in range(steps):
            batch_rows = rows[i * batch:(i + 1) * batch]
            step_fns[name](batch_rows[:, :-1], batch_rows[:, 1:])
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            vl = float(models[name](valid[:, :-1], targets=valid[:, 1:]))
        res[name] = {"tokens_per_s": batch * cfg.context / med[name], "valid_loss": vl}
    return {"speedup": res["bf16"]["tokens_per_s"] / res["fp32"]["tokens_per_s"],
            "loss_rel_diff": abs(res["bf16"]["valid_loss"] - res["fp32"]["valid_loss"]) / res["fp32"]["valid_loss"],
            "cpu_has_bf16": torch.backends.mkldnn.is_available() and "avx512_bf16" in _cpu_flags(), **res}


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def vs_transformers(cfg: ModelConfig, batch: int, repeats: int) -> dict:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from growlm.interop import hf_config

    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_config(cfg, cfg.n_layers, bos_id=1, eos_id=2, pad_id=0,
                                                       dtype=torch.float32)))
    hf.train()
    hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)  # the same optimizer kernel as ours
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))

    def hf_step() -> None:  # as HF's Trainer steps: clip 1.0 (its max_grad_norm), then AdamW
        hf(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hopt.step()
        hopt.zero_grad(set_to_none=True)

    ours = stepper(monolithic(cfg))
    med = interleaved_medians({"ours": lambda: ours(x, x), "hf": hf_step}, repeats)
    t_ours, t_hf = med["ours"], med["hf"]
    return {"ours_tokens_per_s": batch * cfg.context / t_ours, "hf_tokens_per_s": batch * cfg.context / t_hf,
            "ratio": t_hf / t_ours, "goal": 1.0}


@torch.no_grad()
def kv_cache(cfg: ModelConfig, new_tokens: int, repeats: int) -> dict:
    model = make_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    # in turn, like every ratio here: decoding one token at a time reads all the weights per token, so it
    # moves with the machine's memory bandwidth, which the neighbours on a shared host vary
    med = interleaved_medians({"cached": lambda: model.generate(prompt, new_tokens),
                               "uncached": lambda: model.generate(prompt, new_tokens, use_cache=False)},
                              max(3, repeats // 2), warmup=1)
    cached, uncached = med["cached"], med["uncached"]
    return {"cached_tokens_per_s": new_tokens / cached, "uncached_tokens_per_s": new_tokens / uncached,
            "speedup": uncached / cached, "goal": 5.0}


def peak_memory_child(kind: str, d: int, layers: int, vocab: int, context: int, batch: int) -> None:
    """Run 3 steps of one kind (none for ``base``) and print this process's peak RSS in MB (a fresh process)."""
    cfg = config(d, layers + 1, vocab, context)
    model = make_model(cfg)
    if kind == "grow":
        set_trainable(model, StageSpec(grow=1, tokens=1), [layers])
    else:
        set_trainable(model, StageSpec(grow=0, train="all", tokens=1), [])
    x = torch.randint(0, vocab, (batch, context))
    step = stepper(model)
    for _ in range(3 if kind != "base" else 0):
        step(x, x)
    print(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the current address space; ru_maxrss would
    carry over the parent's high-water mark across fork+exec on Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(d: int, layers: int, vocab: int, context: int, batch: int) -> dict:
    """Peak RSS of a grow and a monolithic step, each above a process that only built the model."""
    out = {}
    for kind in ("base", "grow", "mono"):
        r = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--d-model", str(d), "--layers",
                            str(layers), "--vocab", str(vocab), "--context", str(context), "--batch", str(batch)],
                           capture_output=True, text=True, check=True)
        out[f"{kind}_mb"] = float(r.stdout.strip().splitlines()[-1])
    out["grow_mb"] -= out["base_mb"]
    out["mono_mb"] -= out["base_mb"]
    out["ratio"] = out["grow_mb"] / max(out["mono_mb"], 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--memory-child", choices=("base", "grow", "mono"))
    a = ap.parse_args()
    if a.memory_child:
        peak_memory_child(a.memory_child, a.d_model, a.layers, a.vocab, a.context, a.batch)
        return
    repeats = 3 if a.quick else 7
    context = 128 if a.quick else a.context
    cfg = config(a.d_model, a.layers, a.vocab, context)
    res = {
        "utilisation": utilisation(cfg, a.batch, repeats),
        "bf16": bf16_vs_fp32(config(a.d_model, 2, 512, 64), a.batch, repeats, 20 if a.quick else 60),
        "hf": vs_transformers(cfg, a.batch, repeats),
        "kv": kv_cache(config(a.d_model, a.layers, a.vocab, 512), 64 if a.quick else 256, repeats),
        "memory": peak_memory(a.d_model, a.layers, a.vocab, context, a.batch),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
