"""``make bench``: every benchmark, one table of figures against references measured in the same run.

Each script runs in its own process (``--json``); this collects the figures, prints the table and
writes ``bench/results.json``. Timings inside each script are medians of repeated runs after a
warm-up, and every goal is a ratio against a reference measured side by side.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE / script), "--json", *args], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    out = json.loads(r.stdout[r.stdout.index("{"):])
    out["_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def rows(res: dict) -> list[tuple[str, str, str, float | None, str, bool | None]]:
    """(figure, measured, reference, ratio, goal, met) for the table."""
    out = []
    sc, ts, mc, tk, sb = (res.get(k, {}) for k in ("stage_cost", "train_speed", "merge_cost", "tokenizer", "substrate"))
    if "measured_ratio" in sc:
        r = sc["measured_ratio"] / sc["flop_ratio_head"]
        out.append(("grow stage time/token (d256 L8 k1 V8192)", f"{sc['measured_ratio']:.3f} of mono",
                     f"FLOP model {sc['flop_ratio_head']:.3f}", r, "≤ 1.0× model", r <= 1.0))
        r = sc["measured_ratio"] / sc["flop_ratio"]
        out.append(("same, block-only FLOP model (growth issue)", f"{sc['measured_ratio']:.3f}",
                     f"(2L+6k)/(6(L+k)) {sc['flop_ratio']:.3f}", r, "≤ 1.15× (small head)", None))
        r = sc["cached_ratio"] / sc["flop_ratio_cached"]
        out.append(("grow stage with trunk cache", f"{sc['cached_ratio']:.3f} of mono",
                     f"model w/o trunk {sc['flop_ratio_cached']:.3f}", r, "≤ 1.1× model", r <= 1.1))
    if "memory" in ts:
        m = ts["memory"]
        out.append(("peak memory, grow step", f"{m['grow_mb']:.0f} MB", f"mono {m['mono_mb']:.0f} MB", m["ratio"],
                     "reported; < 1", m["ratio"] < 1))
    if "utilisation" in ts:
        u = ts["utilisation"]
        out.append(("CPU utilisation, mono fp32 step", f"{u['achieved_gflops']:.0f} GFLOP/s",
                     f"matmul peak {u['peak_gflops']:.0f} GFLOP/s", u["ratio"], "≥ 0.60", u["ratio"] >= 0.60))
    if "bf16" in ts:
        b = ts["bf16"]
        ok = b["speedup"] >= 1.3 and b["loss_rel_diff"] <= 0.02
        out.append(("bf16 autocast on CPU", f"{b['bf16']['tokens_per_s']:.0f} tok/s, Δloss {b['loss_rel_diff']:.1%}",
                     f"fp32 {b['fp32']['tokens_per_s']:.0f} tok/s", b["speedup"], "≥ 1.3×, Δloss ≤ 2%",
                     ok if b["cpu_has_bf16"] else None))
    if "hf" in ts:
        h = ts["hf"]
        out.append(("mono step vs transformers GPT-NeoX", f"{h['ours_tokens_per_s']:.0f} tok/s",
                     f"HF {h['hf_tokens_per_s']:.0f} tok/s", h["ratio"], "≥ 1.0×", h["ratio"] >= 1.0))
    for rule, r in mc.get("rules", {}).items():
        f = r["forward"]
        out.append((f"{mc['experts']}-expert mixture forward ({rule})", f"{f['mixture_ms']:.0f} ms",
                     f"N × one expert {f['n_single_ms']:.0f} ms", f["ratio"], "≤ 1.1×", f["ratio"] <= 1.1))
    if "kv" in ts:
        k = ts["kv"]
        out.append(("KV-cached generation, 256 new tokens", f"{k['cached_tokens_per_s']:.0f} tok/s",
                     f"uncached {k['uncached_tokens_per_s']:.0f} tok/s", k["speedup"], "≥ 5×", k["speedup"] >= 5))
    if "ours_lines_mb_s" in tk:
        out.append(("tokenizer encode, mixed en/ru/zh, 1 core", f"{tk['ours_lines_mb_s']:.1f} MB/s",
                     f"raw BPE {tk['raw_bpe_lines_mb_s']:.1f} MB/s", tk["ours_lines_mb_s"] / tk["raw_bpe_lines_mb_s"],
                     "≥ 5 MB/s", tk["ours_lines_mb_s"] >= 5))
    for name, stages in res.get("gpu_speed", {}).get("presets", {}).items():
        g = res["gpu_speed"]
        mono = stages[-1]  # the full-depth monolithic step is timed beside the last grow stage
        out.append((f"GPU MFU, {name} monolithic ({g['device']})", f"{mono['mono_tokens_per_s']:,.0f} tok/s",
                     f"{g['dtype'].removeprefix('torch.')} mm peak {g['peak_tflops']:.0f} TFLOP/s", mono["mono_mfu"], "≥ 0.40", mono["mono_mfu"] >= 0.40))
        sheet = mono.get("mono_mfu_datasheet")  # None for a device without a datasheet row: reported, not guessed
        out.append((f"GPU MFU vs datasheet, {name} monolithic", f"{mono['mono_flop_per_s'] / 1e12:,.0f} TFLOP/s",
                     f"datasheet {g['datasheet_tflops']:.0f} TFLOP/s" if sheet is not None else g["datasheet"], sheet,
                     "≥ 0.45", None if sheet is None else sheet >= 0.45))
        worst = max(stages, key=lambda r: r["ratio_over_model"])
        out.append((f"GPU grow stage, {name} (worst of 3)", f"{worst['measured_ratio']:.3f} of mono ({worst['frozen']}+{worst['new']})",
                     f"FLOP model {worst['flop_ratio_head']:.3f}", worst["ratio_over_model"], "≤ 1.10× model",
                     worst["ratio_over_model"] <= 1.10))
    pr = res.get("prepare", {})
    if "tokens_per_s" in pr:
        t = pr["tokens_per_s"]
        out.append(("growlm data prepare, 2 workers vs 1", f"{t['prepare_2']:,.0f} tok/s", f"1 worker {t['prepare_1']:,.0f} tok/s",
                     t["prepare_2"] / t["prepare_1"], "reported; 2.0 is perfect", None))
        out.append(("prepare, 1 worker vs tokenizers' encode_batch_fast", f"{t['prepare_1']:,.0f} tok/s (1 core)",
                     f"{t['encode_batch_fast']:,.0f} tok/s (all cores)", t["prepare_1"] / t["encode_batch_fast"],
                     "reported (the ceiling)", None))
        lo = pr["loader"]
        rate = min(lo["tokens_per_s"].values())
        out.append(("loader over 1B prepared tokens (1,024 x 192)", f"{rate:,.0f} tok/s", "paper-9l step on an H200 254,234",
                     rate / 254_234, "≥ 20×", rate >= lo["goal_tokens_per_s"]))
        m = pr["training_rss_mb"]
        out.append(("training RSS over 1B prepared tokens", f"{m['big']:,} MB", f"over 4M tokens {m['small_4M_tokens']:,} MB",
                     m["big"] / m["small_4M_tokens"], "< 1 GB above", m["above_small"] < m["goal_above_mb"]))
    if "cold_s" in sb:
        out.append(("glyph substrate, 65,536 tokens at d 1024", f"{sb['cold_s']:.1f} s (cached basis {sb['cached_s']:.1f} s)",
                     "—", None, "≤ 120 s", sb["cold_s"] <= 120))
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    q = ("--quick",) if quick else ()
    t0 = time.perf_counter()
    res = {
        "stage_cost": run("stage_cost.py", *q),
        "train_speed": run("train_speed.py", *q),
        "merge_cost": run("merge_cost.py", *q),
        "tokenizer": run("tokenizer_speed.py", *(("--mb", "1") if quick else ())),
        "substrate": run("substrate_build.py"),
        "prepare": run("prepare_speed.py", *(q or ("--steps", "6"))),
    }
    if torch.cuda.is_available():  # the GPU half: the paper's 9-layer presets, bf16 + torch.compile
        res["gpu_speed"] = run("gpu_speed.py", *(("--repeats", "3", "--presets", "paper-9l-16bit") if quick else ()))
    table = rows(res)
    res["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    res["date"] = time.strftime("%Y-%m-%d")
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["table"] = [dict(zip(("figure", "measured", "reference", "ratio", "goal", "met"), r, strict=True)) for r in table]
    (HERE / "results.json").write_text(json.dumps(res, indent=2))
    w = max(len(r[0]) for r in table)
    print(f"{'figure':{w}}  {'measured':34}  {'reference':30}  {'ratio':>6}  {'goal':20}  met")
    for fig, meas, ref, ratio, goal, met in table:
        rs = f"{ratio:6.2f}" if ratio is not None else "     —"
        ms = {True: "yes", False: "NO", None: "n/a"}[met]
        print(f"{fig:{w}}  {meas:34}  {ref:30}  {rs}  {goal:20}  {ms}")
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    if errors:
        print(f"failed: {errors}")
    print(f"({res['total_s']:.0f} s; bench/results.json)")


if __name__ == "__main__":
    main()
