"""Training speed and MFU of the paper's 9-layer presets on one GPU, monolithic and per grow stage.

For each preset, the three stages of ``configs/paper/9l-*.toml`` (3 new blocks over 0, 3 and 6 frozen)
are timed with the loop's own step (``train.optimizer_step``: fused AdamW, clip, the on-device
non-finite guard; chunked cross-entropy) under bf16 autocast and ``torch.compile``, interleaved with a
monolithic step of the same depth (``stage_cost.measure``). Per stage it reports tokens/s, MFU and the
grow/monolithic time ratio over the FLOP model that counts the head (goal ≤ 1.10×); the 9-block
monolithic step's MFU is the headline (goal ≥ 45% of the datasheet peak on an H100/H200).

MFU = ``flop_per_token`` × tokens/s over a peak: the bf16 matmul peak measured in the same run (a large
``torch.mm``), and the datasheet's dense bf16 peak of the device (``timing.datasheet_peak``, the basis the
field quotes; none for a device the table lacks). FLOPs follow the PaLM/nanoGPT count (6 per trained
parameter, 2 per frozen one, plus attention), so activation recomputation in the chunked cross-entropy
counts as overhead.

    python bench/gpu_speed.py [--json] [--batch 16] [--presets paper-9l-16bit,paper-9l-unicode]
    python bench/gpu_speed.py --device cpu --tiny    # the same code on a small model, fp32, no compile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from growlm.model import ModelConfig, flop_per_token, preset_config  # noqa: E402
from stage_cost import measure  # noqa: E402
from timing import datasheet_peak, matmul_peak  # noqa: E402

STAGES = ((0, 3), (3, 3), (6, 3))  # (frozen, new) of configs/paper/9l-*.toml


def preset_figures(cfg: ModelConfig, batch: int, repeats: int, device: torch.device, dtype: torch.dtype | None,
                   compile: bool, peak: float) -> list[dict]:
    """One row per grow stage: tokens/s, achieved FLOP/s and MFU (over ``peak``) of the grow and the monolithic
    step, and the ratios."""
    rows = []
    tokens = batch * cfg.context
    for frozen, new in STAGES:
        depth_cfg = dataclasses.replace(cfg, n_layers=frozen + new)
        r = measure(depth_cfg, frozen, new, batch, repeats, device, autocast=dtype, compile=compile)
        t_mono, t_grow = r["mono_s_per_token"] * tokens, r["grow_s_per_token"] * tokens
        mono_flops = flop_per_token(depth_cfg) * tokens / t_mono
        grow_flops = flop_per_token(depth_cfg, frozen=frozen) * tokens / t_grow
        rows.append({
            "frozen": frozen, "new": new,
            "mono_tokens_per_s": tokens / t_mono, "mono_flop_per_s": mono_flops, "mono_mfu": mono_flops / peak,
            "grow_tokens_per_s": tokens / t_grow, "grow_flop_per_s": grow_flops, "grow_mfu": grow_flops / peak,
            "measured_ratio": r["measured_ratio"], "flop_ratio_head": r["flop_ratio_head"],
            "ratio_over_model": r["measured_ratio"] / r["flop_ratio_head"],
            "cached_ratio_over_model": r["cached_ratio"] / r["flop_ratio_cached"],
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="paper-9l-16bit,paper-9l-unicode")
    ap.add_argument("--batch", type=int, default=16, help="sequences of the preset's context per step")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="d 64, vocab 512, context 64: a smoke run of this script")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_speed.py: no CUDA device here (use --device cpu --tiny for a smoke run)")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else None
    compile = cuda and not a.no_compile
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (the loss upcast) on tensor cores
    peak = matmul_peak(device, dtype or torch.float32, 8192 if cuda else 1024)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    sheet, sheet_note = datasheet_peak(name)
    out = {"device": name, "dtype": str(dtype or torch.float32), "compile": compile, "batch": a.batch,
           "peak_tflops": peak / 1e12, "datasheet_tflops": sheet / 1e12 if sheet else None, "datasheet": sheet_note,
           "torch": torch.__version__, "presets": {}}
    for name in a.presets.split(","):
        cfg, _ = preset_config(name)
        if a.tiny:
            cfg = dataclasses.replace(cfg, vocab_size=512, d_model=64, n_heads=2, context=64,
                                      embed_dim=min(cfg.embed_dim, 64))
        rows = preset_figures(cfg, a.batch, a.repeats, device, dtype, compile, peak)
        for r in rows:
            for k in ("mono", "grow"):
                r[f"{k}_mfu_datasheet"] = r[f"{k}_flop_per_s"] / sheet if sheet else None
        out["presets"][name] = rows
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['device']}, {out['dtype']}, compile={compile}, batch {a.batch}; "
          f"measured matmul peak {out['peak_tflops']:.3g} TFLOP/s; datasheet: {sheet_note}")
    print(f"{'preset':18} {'stage':>9} {'mono tok/s':>11} {'mono MFU':>9} {'grow tok/s':>11} {'grow MFU':>9} "
          f"{'grow/mono':>9} {'model':>6} {'ratio/model':>11} {'mono MFU (sheet)':>16}")
    for name, rows in out["presets"].items():
        for r in rows:
            sheet_mfu = f"{r['mono_mfu_datasheet']:.1%}" if r["mono_mfu_datasheet"] is not None else "unknown"
            print(f"{name:18} {r['frozen']:>4}+{r['new']:<4} {r['mono_tokens_per_s']:11,.0f} {r['mono_mfu']:9.1%} "
                  f"{r['grow_tokens_per_s']:11,.0f} {r['grow_mfu']:9.1%} {r['measured_ratio']:9.3f} "
                  f"{r['flop_ratio_head']:6.3f} {r['ratio_over_model']:11.2f} {sheet_mfu:>16}")


if __name__ == "__main__":
    main()
