"""GPU paths: KIND_GPU instances of the Python models. Skipped without an NVIDIA GPU.

Never run on this project's CI machines (no GPU); run them where `nvidia-smi` works:
    ./run_tests.sh -m gpu
"""

from __future__ import annotations

import shutil

import pytest
import torch

from hf_triton.serve import DEFAULT_REPOSITORIES, read_config

from conftest import launch
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
    launched = launch([repo], tmp_path / "w", tiny_checkpoint)
    try:
        got = infer(launched.url, "python_vit", photo[None])
        assert_close(got, reference([photo]), 1e-3)
        log = launched.log()
        assert "device cuda:0" in log
    finally:
        launched.stop()
