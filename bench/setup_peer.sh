#!/usr/bin/env bash
# Creates bench/.venv with CPU PyTorch for the benchmark peer. Not part of CI or the tests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet torch numpy
"$here/.venv/bin/python" -c "import torch; print('torch', torch.__version__, 'cpu capability', torch.backends.cpu.get_cpu_capability())"
