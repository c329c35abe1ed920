#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on a GPU machine that has no network and no Triton:
# the Triton server of the nvidia-pytriton wheel (its Python 3.12 stub only, ~27 MB as xz),
# tritonclient (pure Python), the compiled wheels its HTTP client needs for Python 3.12, and
# numpy 1.26: Triton 2.51's Python-backend stub (pybind11 2.10) breaks on numpy 2 (every
# output tensor comes back empty; the wheel pins numpy<2 for it), and such machines ship
# numpy 2 (with it ml_dtypes 0.5, which tritonclient imports and which still takes numpy 1.26).
# Output: .gpu/ (git-ignored), ~56 MB: it travels with the repository (64 MiB in all).
#
#   scripts/gpu_pack.sh [PYVER]      # PYVER: the GPU machine's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PYTHON:-.venv/bin/python}
OUT=.gpu
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT" && mkdir -p "$OUT"
plat=()
for p in manylinux_2_35 manylinux_2_28 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  plat+=(--platform "${p}_x86_64")
done
echo "== downloading nvidia-pytriton 0.7.0 and the HTTP client's wheels for Python $PYVER"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${plat[@]}" -d "$WORK/dl" nvidia-pytriton==0.7.0
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${plat[@]}" -d "$OUT" \
  python-rapidjson geventhttpclient gevent greenlet zope.event zope.interface brotli \
  numpy==1.26.4 ml_dtypes==0.5.1
echo "== trimming the server to the Python $PYVER stub"
mkdir -p "$WORK/site"
(cd "$WORK/site" && unzip -q "$WORK"/dl/nvidia_pytriton-*.whl)
find "$WORK/site/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 \
  ! -name "$PYVER" -exec rm -rf {} +
rm -f "$WORK"/site/nvidia_pytriton.libs/libpython3-*.so*  # the 3.13 stub's own libpython
site=$("$PY" -c 'import tritonclient, os; print(os.path.dirname(os.path.dirname(tritonclient.__file__)))')
cp -r "$site/tritonclient" "$WORK/site/"
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
echo "== compressing (a minute or two)"
tar -C "$WORK/site" -cf - pytriton nvidia_pytriton.libs tritonclient | xz -T0 -6 > "$OUT/site.tar.xz"
du -sh "$OUT" "$OUT"/*
