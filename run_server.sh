#!/usr/bin/env bash
# Serve python_vit, preprocessing, vit and ensemble_model on a real Triton server.
# First run: creates .venv, installs the pinned dependencies, obtains the weights
# (hub, or an announced random-weight stand-in when offline), exports vit/1/model.onnx.
# Later runs start in seconds. Ctrl-C stops the server.
#   ./run_server.sh [--checkpoint ID_OR_DIR] [--http-port 8000] [--host 127.0.0.1] ...
#   ./run_server.sh --help
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
exec .venv/bin/hf-triton serve "$@"
