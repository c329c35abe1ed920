#!/usr/bin/env bash
# Set up .venv (with dev tools) and run lint, type check and the test suite against a
# real Triton server. Extra arguments go to pytest, e.g. ./run_tests.sh -k ensemble
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh --dev
SOURCES=(hf_triton tests client.py python_model_repository ensemble_model_repository)
echo "== ruff" && .venv/bin/ruff check "${SOURCES[@]}" && .venv/bin/ruff format --check "${SOURCES[@]}"
echo "== mypy" && .venv/bin/mypy hf_triton
echo "== pytest" && exec .venv/bin/python -m pytest -v -rs "$@"
