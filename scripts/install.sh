#!/usr/bin/env bash
# Install fedq into .venv (created if missing). PyTorch is installed first at a pinned version so
# that pip never replaces it with a different build; any torch 2.x already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  echo "fedq: creating .venv with $(python3 --version)"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "fedq: installing PyTorch ${FEDQ_TORCH_VERSION:-2.13.0} into .venv (once)"
  .venv/bin/pip install -q "torch==${FEDQ_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -e ".${extras}"
