#!/usr/bin/env bash
# Everything this project checks on an NVIDIA GPU, in one run of ~5-8 minutes, from the
# repository root of a machine that has CUDA PyTorch and transformers but maybe no network
# and no Triton (e.g. a lent H100/H200). Make its inputs first, where pip works:
#   scripts/gpu_pack.sh            # -> .gpu/ (the server, tritonclient, numpy 1.26; ~56 MB)
# then, on the GPU machine:
#   OUT=gpu-out scripts/gpu_check.sh
# Steps (each logs to $OUT; a failed step does not stop the next):
#   1. the machine: GPU, Python, libraries, the libpython the Python-backend stub needs
#   2. a private venv: .gpu/ (the server, numpy 1.26) first, then the machine's own packages
#   3. tests/test_gpu.py through the real server (KIND_GPU vision and text, fp32 and fp16,
#      against the CPU); where the stub cannot start, scripts/gpu_harness.py instead
#   4. bare PyTorch fp32/fp16, ViT-base and MiniLM's architecture, batch 1/8/32/64
#   5. served ViT-base (stand-in) python_vit fp16 on the GPU, concurrency 1/8/32, with
#      `hf-triton bench` (bare PyTorch fp16 on the same GPU for the serving tax)
#   6. the same served with 1, 2 and 4 GPU instances, concurrency 8/32/64
# STEPS=3,6 runs only those of steps 3-6 (1 and 2 always run).
# Results: $OUT/gpu_check.log (everything), test_gpu.txt, bare.json, bench.json, bench.txt,
# bench_instances.json/.txt, logs.tgz (server logs). Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}  # stop starting steps after this; each step also has its own limit
WORK=${WORK:-/tmp/hf_triton_gpu}
VENV=$WORK/venv
rm -rf "$WORK" && mkdir -p "$WORK/logs"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
failed=0
STEPS=${STEPS:-3,4,5,6}  # steps 1 and 2 always run
want() { [[ ",$STEPS," == *",$1,"* ]]; }
step() { echo; echo "== [$(date +%T), ${SECONDS}s] $*"; }
left() { local l=$((BUDGET_S - SECONDS)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
run() {  # run LIMIT_S CMD...: a step with a time limit; counts failures
  local limit; limit=$(left "$1"); shift
  if [ "$limit" -le 10 ]; then echo "skipped: out of time"; failed=$((failed + 1)); return 1; fi
  timeout -k 10 "$limit" "$@"; local rc=$?
  [ $rc -ne 0 ] && { echo "-> exit $rc"; failed=$((failed + 1)); }
  return $rc
}

step "1. the machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
lscpu | grep -E "Model name|^CPU\(s\)" || true
"$PY" - <<'EOF'
import sys, sysconfig, torch, transformers, numpy
print("python", sys.version.split()[0], sys.executable, "base", sys.base_prefix)
print("libpython:", sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "numpy (machine's)", numpy.__version__)
from importlib.metadata import version
for name in ("onnxruntime", "protobuf", "grpcio", "pillow", "pytest"):
    try:
        print(name, version(name))
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(name, "-", type(e).__name__)
EOF
ls -l /usr/lib/x86_64-linux-gnu/libpython3* 2>/dev/null || echo "no libpython3 in /usr/lib/x86_64-linux-gnu"

step "2. a private venv: .gpu/ first, then this machine's own packages"
if [ ! -f .gpu/site.tar.xz ]; then
  echo ".gpu/site.tar.xz missing: run scripts/gpu_pack.sh where pip works, and carry .gpu"
  exit 99
fi
# A venv, not PYTHONPATH: the Python-backend stub runs an isolated interpreter (environment
# ignored) whose packages are those of the first python3 on PATH, and it needs numpy < 2.
# Made from the base interpreter, so its libpython is the one the stub links.
BASE=$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
"$BASE" -m venv --without-pip "$VENV" || exit 98
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar -C "$SITE" -xJf .gpu/site.tar.xz &&
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/*.whl ||
  failed=$((failed + 1))
cp scripts/gpu_hide_scipy.py "$SITE/"
"$PY" - "$SITE" <<'EOF'
import site, sys
own = [d for d in site.getsitepackages() if d != sys.argv[1]]
with open(f"{sys.argv[1]}/00_gpu_check.pth", "w") as f:  # .pth files run in name order
    f.write("import gpu_hide_scipy\n")
    # after .gpu/'s packages, with the machine's own .pth files processed too
    f.write(f"import site; list(map(site.addsitedir, {own!r}))\n")
EOF
cat "$SITE/00_gpu_check.pth"
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH" PYTHONPATH="$PWD"
echo "python now: $PY"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c "import numpy, tritonclient.http, transformers; print('numpy now', numpy.__version__, numpy.__file__); from transformers import BertModel, ViTModel, ViTImageProcessor"
# gRPC's generated code needs a protobuf runtime at least as new as its own: use HTTP where not.
PROTOCOL=grpc
"$PY" -c "import tritonclient.grpc" || { PROTOCOL=http; echo "tritonclient.grpc fails here: HTTP"; }
STUB_OK=0
"$PY" -c "from hf_triton.server import TritonDistribution as D; D.locate().check_libpython()" &&
  STUB_OK=1
echo "Python-backend stub can start here: $STUB_OK"

if want 3; then
step "3. KIND_GPU models against the CPU"
if [ "$STUB_OK" = 1 ]; then
  run 240 "$PY" -m pytest tests/test_gpu.py -v -p no:cacheprovider -m gpu \
    --basetemp "$WORK/pytest" 2>&1 | tee "$OUT/test_gpu.txt"
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    failed=$((failed + 1))
    echo "the server's run failed (above): the same checks by driving model.py as the stub does"
    run 150 "$PY" scripts/gpu_harness.py "$WORK/harness" 2>&1 | tee "$OUT/harness.txt"
  fi
else
  echo "the real server cannot run here (above): driving model.py as the stub does instead"
  run 180 "$PY" scripts/gpu_harness.py "$WORK/harness" 2>&1 | tee "$OUT/test_gpu.txt"
  [ "${PIPESTATUS[0]}" -ne 0 ] && failed=$((failed + 1))
fi
fi

if want 4; then
step "4. bare PyTorch on the GPU"
run 150 "$PY" scripts/gpu_bare.py --out "$OUT/bare.json" --workdir "$WORK/bare"
fi

# ViT-base fp16 on KIND_GPU instances, as steps 5 and 6 serve it: build_fp16 NAME OUT INSTANCES
build_fp16() {
  run 150 "$PY" -m hf_triton.cli build --model google/vit-base-patch16-224-in21k \
    --approach python --no-export --name "$1" --precision fp16 --instance-kind KIND_GPU \
    --instances "$3" --max-batch-size 32 --max-queue-delay-us 1000 --out "$2" --workdir "$WORK/hf"
}
# bench_gpu NAME CONCURRENCY TAX_ROUNDS REPOSITORY...: hf-triton bench -> $OUT/NAME.json, .txt
bench_gpu() {
  local name=$1 conc=$2 rounds=$3 repos=() r
  shift 3
  for r in "$@"; do repos+=(--model-repository "$r"); done
  run 240 "$PY" -m hf_triton.cli bench --workdir "$WORK/hf_$name" "${repos[@]}" \
    --formats uint8 --concurrency "$conc" --protocol "$PROTOCOL" --tax-rounds "$rounds" \
    --window-s 1.5 --warmup-s 1 --max-windows 3 --out "$WORK/$name" &&
    cp "$WORK/$name/results.json" "$OUT/$name.json"
  cp "$WORK/$name/report.txt" "$OUT/$name.txt" 2>/dev/null || true
}

if want 5; then
step "5. served ViT-base python_vit fp16 on the GPU, hf-triton bench"
if [ "$STUB_OK" = 1 ]; then
  build_fp16 vit_fp16 "$WORK/served" 1 | tail -3
  bench_gpu bench 1,8,32 2 "$WORK/served/python_model_repository"
else
  echo "skipped: the real server cannot run here"
fi
fi

if want 6; then
step "6. served ViT-base fp16 with 1, 2 and 4 GPU instances (the CPU work of one overlaps another's GPU work)"
if [ "$STUB_OK" = 1 ]; then
  build_i() { build_fp16 "vit_fp16_i$1" "$WORK/instances/i$1" "$1" >"$WORK/logs/build_i$1.log" 2>&1; }
  build_i 1  # first alone: it may make the stand-in weights the others read
  build_i 2 & p2=$!
  build_i 4 & p4=$!
  wait "$p2" "$p4"  # not a bare `wait`: it would wait for the log's tee too
  tail -n 2 "$WORK"/logs/build_i*.log
  bench_gpu bench_instances 8,32,64 1 "$WORK"/instances/i{1,2,4}/python_model_repository
else
  echo "skipped: the real server cannot run here"
fi
fi

step "done: $failed failed step(s) in ${SECONDS}s"
find "$WORK" -name "*.log" -o -name "launcher.out" | tar -czf "$OUT/logs.tgz" -T - 2>/dev/null
exec >&- 2>&-  # let tee write the log's last lines before $OUT is collected
sleep 1
exit "$failed"
