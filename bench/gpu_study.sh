#!/usr/bin/env bash
# Issue #29's GPU study in one prepared run: configs/paper/9l-unicode.toml's three grow stages and its two
# monolithic baselines (frozen glyph substrate; trainable embedding) on one H100/H200, at a reduced, equal token
# budget, bf16, compiled, on real text shipped in bench/gpu-data/.
#
#   bash bench/gpu_study.sh --prepare              # on the CPU machine, once: bench/gpu-data/ (text, font; ~8 MB)
#   bash bench/gpu_study.sh --out DIR              # on the GPU machine, in one device call (about 5 minutes)
#   bash bench/gpu_study.sh --dry-run --out DIR    # the whole script on CPU at toy size (seconds; tested)
#
# One JSON line per figure on stdout (validation loss after every stage, the curves against tokens, FLOPs and
# seconds, MFU over the measured and the datasheet peak, the grown model against each monolithic one) and a
# summary line; DIR gets figures.jsonl, summary.json, gpu_study.log, report.md and metrics-RUN.jsonl. The exit
# status is 0 when the study ran to the end, 1 when it crashed. bench/gpu_study.py has the details and options.
set -euo pipefail
export GROWLM_CHECK_CWD="$PWD"  # relative --out/--data/--wheels paths are the caller's
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/python_env.sh
exec "$PY" bench/gpu_study.py "$@"
