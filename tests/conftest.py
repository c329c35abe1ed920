"""Shared fixtures: tiny ViT checkpoints built on the fly; one real Triton server per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_triton.checkpoints import build_vit_checkpoint
from hf_triton.serve import DEFAULT_REPOSITORIES, PROJECT_ROOT
from hf_triton.server import free_port

#: Same graph as ViT-base (patch embedding, encoder, pooler) at a fraction of the compute.
TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=224,
    patch_size=32,
)
READY_TIMEOUT_S = 300.0
ADMIN_KEY = "test-admin-key"
ADMIN_HEADERS = {"admin-key": ADMIN_KEY}
PHOTO = Path(__import__("matplotlib").get_data_path(), "sample_data", "grace_hopper.jpg")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vit_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vit", seed=0, **TINY_VIT)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo as the tutorial's input contract: float32 H x W x 3 in 0..255."""
    with Image.open(PHOTO) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


@dataclass
class RunningServer:
    url: str  # host:port for tritonclient.http
    grpc_url: str
    workdir: Path
    repositories: Path
    checkpoint: Path
    process: subprocess.Popen[str]

    def log(self) -> str:
        return (self.workdir / "tritonserver.log").read_text(errors="replace")


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"launcher exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not ready after {timeout_s} s")


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> Iterator[RunningServer]:
    """The project's launcher (`hf-triton serve`, what run_server.sh runs) on free ports.

    Serves copies of both repositories so the tiny export never lands in the source tree.
    """
    root = tmp_path_factory.mktemp("serve")
    repos = root / "repos"
    for repo in DEFAULT_REPOSITORIES:
        shutil.copytree(repo, repos / repo.name, ignore=shutil.ignore_patterns("*.onnx"))
    http, grpc, metrics = free_port(), free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "hf_triton.cli",
        "serve",
        "--checkpoint",
        str(tiny_checkpoint),
        "--model-repository",
        str(repos / "python_model_repository"),
        "--model-repository",
        str(repos / "ensemble_model_repository"),
        "--workdir",
        str(root / "work"),
        "--admin-key",
        ADMIN_KEY,
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    ]
    proc = subprocess.Popen(
        argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"127.0.0.1:{http}"
    running = RunningServer(url, f"127.0.0.1:{grpc}", root / "work", repos, tiny_checkpoint, proc)
    try:
        _wait_ready(url, proc, READY_TIMEOUT_S)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):
    """transformers itself on the same weights: processor + ViTModel forward."""
    import torch
    from transformers import AutoImageProcessor, ViTModel

    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="pil")
    model = ViTModel.from_pretrained(tiny_checkpoint).eval()

    def run(images: list[np.ndarray]) -> dict[str, np.ndarray]:
        pil = [Image.fromarray(i.astype(np.uint8)) for i in images]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model(pixel_values=pixels)
        return {
            "last_hidden_state": out.last_hidden_state.numpy(),
            "pooler_output": out.pooler_output.numpy(),
        }

    return run


os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
