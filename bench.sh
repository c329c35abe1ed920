#!/usr/bin/env bash
# Throughput benchmark on a ViT-base-sized model (the offline stand-in when the hub is
# unreachable): bare ONNX Runtime, bare PyTorch, python_vit and ensemble_model served, for
# fp32/uint8/jpeg inputs at concurrency 1, 4 and 16. Prints the ratio table and writes
# bench_results/{results.json,results.csv,throughput.png,report.txt}. About 10 minutes.
#   ./bench.sh [--concurrency 1,4,16] [--protocol grpc|http] [--checkpoint ID_OR_DIR] ...
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
exec .venv/bin/hf-triton bench "$@"
