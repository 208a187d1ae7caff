#!/usr/bin/env bash
# Issue #18's GPU check in one prepared run: the paper's 9-layer preset (paper-9l-unicode) on one H100/H200.
#
#   bash bench/gpu_check.sh --out DIR              # on the GPU machine, in one device call (<= 8 minutes)
#   bash bench/gpu_check.sh --dry-run --out DIR    # every step on CPU at toy sizes (about a minute; tested)
#   bash bench/gpu_check.sh --prepare-wheels .whl  # on the CPU machine: wheels of what the GPU image lacks
#
# Steps: install what fails to import from prepared wheels (offline, never the network); tokens/s and MFU (over
# the measured matmul peak and the datasheet's) of the monolithic step and each grow stage (3 new blocks over 0,
# 3, 6 frozen), bf16, compiled, context 1,024, the largest batch that fits; each grow stage against its FLOP
# model (goal <= 1.10x); peak memory of a grow stage vs monolithic; a torch.profiler summary for each missed
# goal; a two-stage plan (LoRA in the second) killed mid-stage and resumed, its audits and `growlm verify`;
# pytest tests/test_cuda.py tests/test_loop.py.
# One JSON line per figure on stdout and a summary line; the exit status is 0 when every step ran to the end
# (a missed goal is a result) and 1 when one crashed. bench/gpu_check.py has the details and every option.
set -euo pipefail
export GROWLM_CHECK_CWD="$PWD"  # relative --out/--wheels/--site paths are the caller's
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/python_env.sh
exec "$PY" bench/gpu_check.py "$@"
