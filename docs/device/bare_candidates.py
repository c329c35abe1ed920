"""The candidates of `hf-triton optimize`, bare, on a machine where Triton cannot run.

How docs/device/*.log were made: this file was run from the project root on a lent GPU machine
(Intel Xeon with AMX, 16 cores; H100 / H200) that has PyTorch, transformers and onnxruntime but
no network and no room for the Triton wheel. So: bare runtimes only (no serving), each candidate
built and gated by the package's own code, measured at batch 8 and 1 in alternating rounds, CPU
candidates first, then PyTorch on the GPU. ``MODEL=minilm`` expects all-MiniLM-L6-v2 in
``.devicecheck/minilm`` with its weights as ``weights.fp16.safetensors`` (halved to fit the
transfer, restored to fp32 before use); ``MODEL=vit`` builds the launcher's ViT-base stand-in.
"""

import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.getcwd())
OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("QUICK") == "1"
log_lines = []


def say(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    log_lines.append(line)
    (OUT / "device_log.txt").write_text("\n".join(log_lines) + "\n")


import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from hf_triton import export, hardware, optimize, precision  # noqa: E402
from hf_triton.spec import ModelSpec  # noqa: E402
from hf_triton.templates import hf_common  # noqa: E402

machine = hardware.detect()
say("machine:", machine.describe())
say("flags:", " ".join(sorted(f for f in machine.flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))))
say("torch", torch.__version__, "threads", torch.get_num_threads(), "python", sys.version.split()[0])

MODEL = os.environ.get("MODEL", "minilm")
if MODEL == "minilm":
    # Real all-MiniLM-L6-v2 weights, carried through fp16 (the transfer limit), back to fp32.
    src = Path(".devicecheck/minilm")
    ckpt = Path("/tmp/minilm")
    shutil.copytree(src, ckpt, dirs_exist_ok=True)
    weights = load_file(str(ckpt / "weights.fp16.safetensors"))
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    (ckpt / "weights.fp16.safetensors").unlink()
    spec = ModelSpec.resolve(ckpt, checkpoint="sentence-transformers/all-MiniLM-L6-v2")
else:  # the launcher's offline stand-in: ViT-base/16 architecture, random weights
    from hf_triton import checkpoints

    vit = checkpoints.resolve("google/vit-base-patch16-224-in21k", hub_timeout_s=5)
    say("weights:", vit.describe())
    spec = ModelSpec.resolve(vit.path)
say("task", spec.task.name, "inputs", spec.inputs)
sentences = precision.eval_images(8) if spec.modality == "image" else precision.eval_sentences(64)
UNIT = "img" if spec.modality == "image" else "sentences"
work = Path("/tmp/work")
work.mkdir(exist_ok=True)
fp32, fused, int8 = work / "fp32.onnx", work / "fused.onnx", work / "int8.onnx"
t = time.time()
export.export_onnx(spec, fp32)
say(f"exported in {time.time() - t:.1f} s")
gates = {}
try:
    ops = optimize.fuse_onnx(spec, fp32, fused)
    gates["fused-onnxruntime"] = precision.gate_onnx(spec, "fp32+fusions", fp32, fused).summary()
    say("fused:", ops)
except Exception:
    say("fused failed:", traceback.format_exc(limit=2))
t = time.time()
recipe = precision.quantize_onnx(fp32, int8, precision.calibration_feeds(spec))
say(f"int8 in {time.time() - t:.1f} s:", recipe.describe())
try:
    gates["int8-onnxruntime"] = precision.gate_onnx(spec, "int8", fp32, int8).summary()
except precision.GateFailed as e:
    gates["int8-onnxruntime"] = str(e)
for prec in ("int8", "bf16"):
    try:
        gates[f"{prec}-pytorch"] = precision.gate_python(spec, prec).summary()
    except precision.GateFailed as e:
        gates[f"{prec}-pytorch"] = str(e)
for k, v in gates.items():
    say("gate", k, ":", v)


def ort_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return lambda feed: session.run([first], feed)[0]


def torch_runner(prec, device):
    import copy

    module = copy.deepcopy(spec.module)
    if prec == "fp16":
        module = module.to(torch.float16)
    elif prec != "fp32" or device != "cpu":
        module = hf_common.apply_precision(module, prec, torch.device(device))[0]
    module = module.to(device).eval()

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)

    def run(feed):
        tensors = [torch.from_numpy(v).to(device) for v in feed.values()]
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
        with torch.inference_mode():
            out = module(*tensors)[0]
        if device != "cpu":
            torch.cuda.synchronize()
        return out.float().cpu().numpy()

    return run


def rate(run, batch, seconds):
    feed = spec.encode((sentences * 8)[:batch])
    run(feed)
    done, start = 0, time.perf_counter()
    lat = []
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run(feed)
        lat.append(time.perf_counter() - t0)
        done += batch
    return done / (time.perf_counter() - start), statistics.median(lat) * 1000


candidates = {
    "fp32-onnxruntime": lambda: ort_runner(fp32),
    "fused-onnxruntime": lambda: ort_runner(fused),
    "int8-onnxruntime": lambda: ort_runner(int8),
    "fp32-pytorch": lambda: torch_runner("fp32", "cpu"),
    "int8-pytorch": lambda: torch_runner("int8", "cpu"),
    "bf16-pytorch": lambda: torch_runner("bf16", "cpu"),
}
gpu = torch.cuda.is_available()
if gpu:
    candidates |= {
        "fp32-pytorch-gpu": lambda: torch_runner("fp32", "cuda"),
        "fp16-pytorch-gpu": lambda: torch_runner("fp16", "cuda"),
        "bf16-pytorch-gpu": lambda: torch_runner("bf16", "cuda"),
    }
runners = {}
for name, make in candidates.items():
    if name == "fused-onnxruntime" and not fused.exists():
        continue
    try:
        runners[name] = make()
    except Exception:
        say(name, "failed:", traceback.format_exc(limit=2))

seconds = 0.5 if QUICK else 3.0
rounds = 1 if QUICK else int(os.environ.get("ROUNDS", "3"))
results = {name: {"b8": [], "b1_ms": []} for name in runners}
for r in range(rounds):
    order = list(runners)[r % len(runners) :] + list(runners)[: r % len(runners)]
    for name in order:
        thr, _ = rate(runners[name], 8, seconds)
        _, p50 = rate(runners[name], 1, seconds / 2)
        results[name]["b8"].append(thr)
        results[name]["b1_ms"].append(p50)
        say(f"round {r + 1} {name}: batch 8 {thr:.1f} {UNIT}/s, batch 1 p50 {p50:.2f} ms")
    (OUT / "device_results.json").write_text(
        json.dumps({"machine": machine.describe(), "gates": gates, "results": results}, indent=1)
    )

base = statistics.median(results["fp32-onnxruntime"]["b8"])
say("")
say(f"| candidate (bare) | {UNIT}/s, batch 8 (rounds) | ÷ fp32 ONNX Runtime | p50 batch 1, ms |")
say("|---|---|---|---|")
for name, v in results.items():
    med = statistics.median(v["b8"])
    spread = f"{min(v['b8']):.0f}-{max(v['b8']):.0f}"
    say(f"| {name} | {med:.1f} ({spread}) | {med / base:.2f} | {statistics.median(v['b1_ms']):.2f} |")
if gpu:
    for name in ("fp32-pytorch-gpu", "fp16-pytorch-gpu", "bf16-pytorch-gpu"):
        if name in runners:
            thr, p50 = rate(runners[name], 64, seconds)
            say(f"{name} batch 64: {thr:.0f} {UNIT}/s, p50 {p50:.2f} ms")
say("done")
