#!/usr/bin/env bash
# Install the project, its dependencies and its test tools into the current Python environment.
#
# torch is installed first only when it is missing, pinned to 2.13.0: on this project's
# machines that resolves to a local CPU wheel in seconds; on a user's GPU machine pip takes
# PyPI's default (CUDA) build. An existing torch >= 2.1 (CPU or CUDA) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
