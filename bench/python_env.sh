# Sourced by bench/gpu_check.sh and bench/gpu_study.sh: from the repository root, the Python to run ($PY: the
# venv's, else python3; $GROWLM_PYTHON overrides), this checkout's src first on PYTHONPATH, unbuffered output.
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
PY=${GROWLM_PYTHON:-$PY}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# fewer OOMs from fragmentation when steps of several sizes run (CUDA only; a no-op elsewhere)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
