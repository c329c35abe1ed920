"""The launcher's pieces that need no running server: distribution, argv, errors, weights."""

from __future__ import annotations

import socket

import pytest

from hf_triton import checkpoints
from hf_triton.server import (
    ServerConfig,
    ServerError,
    TritonDistribution,
    TritonServer,
    model_load_failures,
)

from helpers import run_cli


def test_bundled_server_found_and_libpython_matches():
    dist = TritonDistribution.locate()
    assert dist.server.name == "tritonserver"
    dist.check_libpython()  # the venv was made from the stub's libpython


def test_libpython_mismatch_is_explained(monkeypatch):
    import sysconfig

    real = sysconfig.get_config_var
    monkeypatch.setattr(
        sysconfig,
        "get_config_var",
        lambda name: "libpython3.11.a" if name == "INSTSONAME" else real(name),
    )
    with pytest.raises(ServerError, match="libpython mismatch.*python3.11 -m venv"):
        TritonDistribution.locate().check_libpython()


def test_argv_is_locked_down_by_default(tmp_path):
    argv = ServerConfig([tmp_path]).argv(tmp_path / "tritonserver", tmp_path / "backends")
    assert "--http-address=127.0.0.1" in argv and "--grpc-address=127.0.0.1" in argv
    assert "--model-control-mode=none" in argv
    assert "--http-port=8000" in argv and "--grpc-port=8001" in argv
    assert "--metrics-port=8002" in argv


def test_port_in_use_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = TritonServer(ServerConfig([tmp_path], http_port=port), tmp_path)
        with pytest.raises(ServerError, match=f"Port {port} \\(http\\).*already in use"):
            server.start()


def test_model_load_failures_are_parsed():
    log = (
        "E1125 13:31:29 model_lifecycle.cc:654] \"failed to load 'vit' version 1: "
        'Internal: vit/1/model.onnx does not exist - run ./export.sh to create it"\n'
        "| python_vit | 1 | READY |\n"
    )
    assert model_load_failures(log) == {
        "vit": "Internal: vit/1/model.onnx does not exist - run ./export.sh to create it"
    }


def test_offline_standin_is_announced(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = checkpoints.resolve(checkpoints.DEFAULT_CHECKPOINT, cache_dir=tmp_path)
    assert ckpt.standin and checkpoints.is_standin(ckpt.path)
    assert "RANDOM weights" in ckpt.describe()
    from transformers import ViTConfig

    cfg = ViTConfig.from_pretrained(ckpt.path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size) == (768, 12, 16)


def test_unknown_checkpoint_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(checkpoints.CheckpointError, match="Cannot obtain checkpoint 'no/such'"):
        checkpoints.resolve("no/such")
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        checkpoints.resolve("./no/such/dir")


def test_cli_reports_missing_model_onnx_load_failure(tmp_path, tiny_checkpoint):
    """A model that fails to load: the launcher names it, says why, exits non-zero."""
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'parameters { key: "checkpoint" value { string_value: "x" } }\n'
    )
    (repo / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n"
        "        raise RuntimeError('weights not found at /nowhere')\n"
    )
    from hf_triton.server import free_port

    run = run_cli(
        "serve",
        "--checkpoint",
        str(tiny_checkpoint),
        "--model-repository",
        str(repo),
        "--workdir",
        str(tmp_path / "work"),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        timeout=180,
    )
    assert run.returncode == 1
    assert "broken" in run.stderr and "weights not found at /nowhere" in run.stderr
