#!/usr/bin/env bash
# Export a Hugging Face checkpoint to ensemble_model_repository/vit/1/model.onnx and
# validate every output against PyTorch (atol 1e-3). Replaces `python -m transformers.onnx`.
#   ./export.sh [--checkpoint ID_OR_DIR] [--output PATH] [--atol 1e-3]
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
exec .venv/bin/hf-triton export "$@"
