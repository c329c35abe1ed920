#!/usr/bin/env bash
# Build both Triton repositories for a Hugging Face checkpoint (hub id or directory), export
# and validate the ONNX model, optionally serve them right away.
#   ./build.sh --model sentence-transformers/all-MiniLM-L6-v2 --name minilm --out build/minilm --serve
#   ./build.sh --model ./my-checkpoint --task image-classification --precision int8 --out build/x
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
exec .venv/bin/hf-triton build "$@"
