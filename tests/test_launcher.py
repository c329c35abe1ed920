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
    free_port,
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
    # Lines Triton 2.51 writes for an ensemble that does not fit and an unparsable config.
    log = (
        'E1127 13:27:19.958488 8061 model_repository_manager.cc:703] "Invalid argument: in '
        'ensemble ens, input B in model two_in is not mapped to any ensemble tensors"\n'
        "[libprotobuf ERROR text_format.cc:337] Error parsing text-format "
        'inference.ModelConfig: 5:1: Expected ",", found "output".\n'
        'E1127 13:27:23.027412 8198 model_repository_manager.cc:1460] "Poll failed for model '
        "directory 'broken': failed to read text proto from /r/broken/config.pbtxt\"\n"
    )
    assert model_load_failures(log) == {
        "ens": "input B in model two_in is not mapped to any ensemble tensors",
        "broken": "failed to read text proto from /r/broken/config.pbtxt: "
        '5:1: Expected ",", found "output".',
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


def test_onnx_spinning_settings_that_cannot_be_honoured_are_refused_by_name(tmp_path):
    """ONNX Runtime takes any value of its "0"/"1" session options silently: the backend does
    not, nor an ``intra_op_spinning`` it does not know or one that contradicts ONNX Runtime's
    own option; the launcher names the model, the parameter and the value."""
    import onnx
    from onnx import TensorProto, helper

    repo = tmp_path / "repo"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    settings = {
        "switch": {"session.intra_op.allow_spinning": "no"},
        "mode": {"intra_op_spinning": "always"},
        "both": {"intra_op_spinning": "auto", "session.force_spinning_stop": "1"},
    }
    for name, params in settings.items():
        (repo / name / "1").mkdir(parents=True)
        onnx.save(helper.make_model(graph), repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\n'
            + "".join(
                f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
                for k, v in params.items()
            )
        )
    run = run_cli(*_serve_args(tmp_path, "--model-repository", str(repo)), timeout=180)
    assert run.returncode == 1
    assert "switch: parameter session.intra_op.allow_spinning must be 0 or 1, not 'no'" in (
        run.stderr
    )
    assert "mode: parameter intra_op_spinning must be auto, never or within_run, not 'always'" in (
        run.stderr
    )
    assert (
        "both: parameter intra_op_spinning and ONNX Runtime's own session.force_spinning_stop "
        "both set how its threads spin; keep one" in run.stderr
    )


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
    args = _serve_args(
        tmp_path, "--checkpoint", str(tiny_checkpoint), "--model-repository", str(repo)
    )
    run = run_cli(*args, timeout=180)
    assert run.returncode == 1
    assert "broken" in run.stderr and "weights not found at /nowhere" in run.stderr


def _serve_args(tmp_path, *extra: str) -> list[str]:
    return [
        "serve",
        "--workdir",
        str(tmp_path / "work"),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        *extra,
    ]


def test_ipv6_host_is_refused_plainly(tmp_path, tiny_checkpoint):
    run = run_cli(*_serve_args(tmp_path, "--host", "::1", "--checkpoint", str(tiny_checkpoint)))
    assert run.returncode == 1
    assert "--host ::1: Triton 2.51 serves HTTP and metrics on IPv4 only" in run.stderr


def test_negative_exit_timeout_is_refused_before_start():
    from hf_triton.server import ServerConfig, ServerError

    ServerConfig([], exit_timeout_s=0).check()  # Triton's: stop at once
    with pytest.raises(ServerError, match="--exit-timeout-s -1: 0 or more seconds"):
        ServerConfig([], exit_timeout_s=-1).check()


def test_no_standin_is_honoured_for_each_configs_checkpoint(tmp_path):
    """A repository naming a hub id, offline, with --no-standin: a plain error, no stand-in."""
    import os

    from hf_triton.serve import DEFAULT_REPOSITORIES

    run = run_cli(
        *_serve_args(tmp_path, "--no-standin", "--model-repository", str(DEFAULT_REPOSITORIES[0])),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_TRITON_CACHE": str(tmp_path / "cache")},
    )
    assert run.returncode == 1
    assert "Cannot obtain checkpoint 'google/vit-base-patch16-224-in21k'" in run.stderr
    assert not (tmp_path / "cache").exists()


def _python_model(repo, name: str, inputs: list[str]) -> None:
    (repo / name / "1").mkdir(parents=True)
    tensors = ", ".join(f'{{ name: "{i}" data_type: TYPE_FP32 dims: [ -1 ] }}' for i in inputs)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 4\ninput [ {tensors} ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
    )
    (repo / name / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    )


@pytest.mark.parametrize("fault", ["unmapped-ensemble-input", "unparsable-config"])
def test_repository_errors_are_named_with_the_reason(tmp_path, fault):
    """Triton refuses the repository: the launcher names the model and Triton's reason."""
    repo = tmp_path / "repo"
    if fault == "unmapped-ensemble-input":
        _python_model(repo, "two_in", ["a", "b"])
        (repo / "ens" / "1").mkdir(parents=True)
        (repo / "ens" / "config.pbtxt").write_text(
            'name: "ens"\nplatform: "ensemble"\nmax_batch_size: 4\n'
            'input [ { name: "a" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
            'ensemble_scheduling { step [ { model_name: "two_in" model_version: -1\n'
            'input_map { key: "a" value: "a" } output_map { key: "y" value: "y" } } ] }\n'
        )
        model, reason = "ens", "input b in model two_in is not mapped to any ensemble tensors"
    else:
        _python_model(repo, "broken", ["a"])
        text = (repo / "broken" / "config.pbtxt").read_text()
        (repo / "broken" / "config.pbtxt").write_text(text.replace("output [", "output ( [", 1))
    run = run_cli(*_serve_args(tmp_path, "--model-repository", str(repo)), timeout=180)
    assert run.returncode == 1, run.stdout + run.stderr
    if fault == "unparsable-config":  # caught while staging, before Triton starts
        assert "broken/config.pbtxt: not a valid Triton model config: 5:8" in run.stderr
        return
    assert "Models that failed to load:" in run.stderr
    assert f"  {model}: " in run.stderr and reason in run.stderr, run.stderr


def test_serving_never_writes_into_the_source_repositories(tmp_path, tiny_checkpoint):
    """A missing model.onnx is exported into the staged copy (through a cache), not the source."""
    import shutil

    from hf_triton.serve import DEFAULT_REPOSITORIES, Deployment

    sources = [tmp_path / r.name for r in DEFAULT_REPOSITORIES]
    for src, dst in zip(DEFAULT_REPOSITORIES, sources, strict=True):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    deployment = Deployment.prepare(
        str(tiny_checkpoint), repositories=sources, workdir=tmp_path / "work"
    )
    assert (deployment.repositories[1] / "vit" / "1" / "model.onnx").exists()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "work" not in p.parts)
    assert after == before


@pytest.mark.skipif(
    __import__("shutil").which("nvidia-smi") is not None, reason="this machine has a GPU"
)
def test_gpu_build_on_a_machine_without_gpu_is_refused_by_name(tmp_path, tiny_checkpoint):
    """`build --instance-kind KIND_GPU` served where there is no GPU: the launcher names the
    model and Triton's reason instead of serving it on the CPU."""
    out = tmp_path / "gpu"
    built = run_cli(
        "build", "--model", str(tiny_checkpoint), "--approach", "python", "--no-export",
        "--instance-kind", "KIND_GPU", "--out", str(out),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    repo = str(out / "python_model_repository")
    run = run_cli(*_serve_args(tmp_path, "--model-repository", repo), timeout=180)
    assert run.returncode == 1
    assert "python_vit: " in run.stderr and "has kind KIND_GPU but no GPUs are available" in (
        run.stderr
    )


def test_library_path_keeps_the_users_and_finds_the_interpreters_libpython(monkeypatch):
    import sysconfig
    from pathlib import Path

    dist = TritonDistribution.locate()
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/mine")
    parts = dist.library_path().split(":")
    assert parts[:2] == [str(dist.libs), "/opt/mine"]
    own = Path(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
    assert (sysconfig.get_config_var("LIBDIR") in parts) == own.exists()
    assert dist.library_path("").split(":")[1] != "/opt/mine"
    dist.check_libpython()  # the user's path does not hide the stub's libpython
