"""GPU paths: KIND_GPU instances of the Python models. Skipped without an NVIDIA GPU.

Never run on this project's CI machines (no GPU); run them where `nvidia-smi` works:
    ./run_tests.sh -m gpu
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
import torch

from hf_triton.serve import DEFAULT_REPOSITORIES, PROJECT_ROOT, read_config
from hf_triton.server import free_port

from conftest import ADMIN_KEY, _wait_ready
from helpers import assert_close, infer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]


def test_kind_gpu_instance_serves_the_same_numbers(tmp_path, tiny_checkpoint, photo, reference):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "python_model_repository"
    shutil.copytree(DEFAULT_REPOSITORIES[0], repo)
    config_path = repo / "python_vit" / "config.pbtxt"
    cfg = read_config(config_path)
    cfg.instance_group[0].kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
    config_path.write_text(text_format.MessageToString(cfg))
    http = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_triton.cli",
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--model-repository",
            str(repo),
            "--workdir",
            str(tmp_path / "w"),
            "--http-port",
            str(http),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--admin-key",
            ADMIN_KEY,
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_ready(f"127.0.0.1:{http}", proc, 300)
        got = infer(f"127.0.0.1:{http}", "python_vit", photo[None])
        assert_close(got, reference([photo]), 1e-3)
        log = (tmp_path / "w" / "tritonserver.log").read_text()
        assert "device cuda:0" in log
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
