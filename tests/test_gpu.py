"""GPU paths: KIND_GPU instances of the Python pipelines, served by the real server.

The GPU tests (marker `gpu`) are skipped without an NVIDIA GPU; this project's CI has none.
Where `nvidia-smi` works run `./run_tests.sh -m gpu`, or `scripts/gpu_check.sh` on a lent GPU
machine (it runs this file and keeps its output as $OUT/test_gpu.txt). Vision and text, fp32
and fp16, built by `hf-triton build --instance-kind KIND_GPU` as a user builds them, in one
server with a CPU twin of the text model: each GPU answer is compared with the CPU's (fp32
within 1e-3, fp16 by cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Launched, launch
from helpers import infer, run_cli

#: Marks the GPU tests; the last two tests here are the GPU check's CPU side and run everywhere.
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"
)

SENTENCES = ["A man is eating food.", "The stock market fell sharply today.", "Hi"]
FP16_MIN_COSINE = 0.999


@dataclass
class GpuServer:
    launched: Launched
    text_checkpoint: Path


def _build(checkpoint: Path, out: Path, name: str, *extra: str) -> Path:
    run = run_cli(
        "build", "--model", str(checkpoint), "--approach", "python", "--no-export",
        "--name", name, "--out", str(out / name), *extra,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return out / name / "python_model_repository"


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory, tiny_checkpoint):
    from hf_triton.families import FAMILIES

    root = tmp_path_factory.mktemp("gpu")
    text = FAMILIES["bert"].make(root / "bert", "text-feature-extraction")
    gpu = ("--instance-kind", "KIND_GPU")
    repos = [
        _build(tiny_checkpoint, root, "vit32", *gpu),
        _build(tiny_checkpoint, root, "vit16", *gpu, "--precision", "fp16"),
        _build(text, root, "txt32", *gpu),
        _build(text, root, "txt16", *gpu, "--precision", "fp16"),
        _build(text, root, "txtcpu"),
    ]
    launched = launch(repos, root / "work")
    try:
        yield GpuServer(launched, text)
    finally:
        launched.stop()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed(url: str, model: str) -> np.ndarray:
    import tritonclient.http as httpclient

    data = np.array([[s.encode()] for s in SENTENCES], dtype=object)
    tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        return client.infer(model, [tensor]).as_numpy("sentence_embedding")


@pytest.mark.gpu
@needs_gpu
def test_every_gpu_instance_runs_on_cuda(gpu_server):
    log = gpu_server.launched.log()
    for name in ("python_vit32", "python_vit16", "python_txt32", "python_txt16"):
        lines = [line for line in log.splitlines() if f"{name}: " in line and "device " in line]
        assert lines and all("device cuda:0" in line for line in lines), (name, lines)
    cpu = [line for line in log.splitlines() if "python_txtcpu: " in line and "device " in line]
    assert cpu and all("device cpu" in line for line in cpu), cpu


@pytest.mark.gpu
@needs_gpu
def test_vision_fp32_on_the_gpu_is_transformers_on_the_cpu(gpu_server, photo, reference):
    want = reference([photo])
    got = infer(gpu_server.launched.url, "python_vit32", photo[None])
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-3, err_msg=name)


@pytest.mark.gpu
@needs_gpu
def test_vision_fp16_on_the_gpu_agrees_by_cosine(gpu_server, photo, reference):
    want = reference([photo])
    got = infer(gpu_server.launched.url, "python_vit16", photo[None])
    for name, value in want.items():
        assert got[name].dtype == np.float32  # fp16 inside, fp32 on the wire
        cos = _cosines(got[name][0], value[0])
        assert cos.min() >= FP16_MIN_COSINE, (name, cos.min())


@pytest.mark.gpu
@needs_gpu
def test_text_on_the_gpu_agrees_with_the_cpu_instance(gpu_server):
    url = gpu_server.launched.url
    cpu = _embed(url, "python_txtcpu")
    np.testing.assert_allclose(_embed(url, "python_txt32"), cpu, atol=1e-3)
    cos = _cosines(_embed(url, "python_txt16"), cpu)
    assert cos.min() >= FP16_MIN_COSINE, cos


def test_gpu_harness_drives_model_py_as_the_stub_does_cpu_side(tmp_path):
    """scripts/gpu_harness.py, the GPU check's fallback where the stub cannot start, kept
    working here: the same five models on CPU instances (bf16 standing in for fp16)."""
    import subprocess
    import sys

    from hf_triton.serve import PROJECT_ROOT

    run = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_harness.py"), str(tmp_path), "--cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert sum(line.startswith("ok ") for line in run.stdout.splitlines()) == 6, run.stdout


def test_gpu_check_hides_scipy_from_transformers_only_through_find_spec(tmp_path):
    """scripts/gpu_hide_scipy.py, which the GPU check's venv imports at start-up: SciPy and
    scikit-learn are not found (so transformers, which treats them as optional, skips them),
    everything else is, and transformers' models import without them (here, without it,
    importing BertModel imports SciPy)."""
    import subprocess
    import sys

    from hf_triton.serve import PROJECT_ROOT

    code = (
        "import sys, importlib.util as u; sys.path.insert(0, sys.argv[1]); import gpu_hide_scipy\n"
        "print(u.find_spec('scipy'), u.find_spec('sklearn.metrics'), bool(u.find_spec('numpy')))\n"
        "from transformers import BertModel, ViTModel\n"
        "print('scipy' in sys.modules, 'sklearn' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(PROJECT_ROOT / "scripts")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["None None True", "False False"], run.stdout
