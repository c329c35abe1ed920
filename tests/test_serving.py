"""Both tutorial approaches, served by the real Triton server, against transformers itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from hf_triton.serve import PROJECT_ROOT

from conftest import ADMIN_HEADERS
from helpers import ATOL, MODELS, OUTPUTS, assert_close, infer, run_cli, run_client, synthetic


def test_all_models_ready(server):
    with httpclient.InferenceServerClient(url=server.url) as client:
        index = client.get_model_repository_index(headers=ADMIN_HEADERS)
    states = {m["name"]: m.get("state") for m in index}
    assert states == {m: "READY" for m in ("python_vit", "preprocessing", "vit", "ensemble_model")}


@pytest.mark.parametrize("model", MODELS)
def test_photo_matches_transformers(server, reference, photo, model):
    got = infer(server.url, model, photo[None])
    assert got["last_hidden_state"].shape == (1, 50, 32)  # 7x7 patches + CLS, tiny hidden
    assert_close(got, reference([photo]), ATOL[model])


@pytest.mark.parametrize("model", MODELS)
def test_one_request_three_images(server, reference, photo, model):
    # Distinct images: a batch bug (np.squeeze, mixing items up) cannot pass.
    images = np.stack([photo, photo[:, ::-1], synthetic(1, *photo.shape[:2])])
    got = infer(server.url, model, images)
    assert got["last_hidden_state"].shape[0] == 3
    assert_close(got, reference(list(images)), ATOL[model])
    assert not np.allclose(got["pooler_output"][0], got["pooler_output"][2])


@pytest.mark.parametrize("model", MODELS)
def test_eight_concurrent_requests(server, reference, model):
    images = [synthetic(seed, 64 + seed, 80) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda im: infer(server.url, model, im[None]), images))
    for image, got in zip(images, results, strict=True):
        assert_close(got, reference([image]), ATOL[model])


@pytest.mark.parametrize("model", MODELS)
def test_both_approaches_agree(server, photo, model):
    other = MODELS[1 - MODELS.index(model)]
    a, b = infer(server.url, model, photo[None]), infer(server.url, other, photo[None])
    assert_close(a, b, max(ATOL.values()))


def test_vit_config_auto_completed_from_onnx(server):
    with httpclient.InferenceServerClient(url=server.url) as client:
        cfg = client.get_model_config("vit")
    assert cfg["backend"] == "onnxruntime"
    assert cfg["max_batch_size"] == 8  # --backend-config=default-max-batch-size from the launcher
    assert "dynamic_batching" in cfg
    assert [i["name"] for i in cfg["input"]] == ["pixel_values"]
    assert [i["dims"] for i in cfg["input"]] == [["3", "224", "224"]] or [
        i["dims"] for i in cfg["input"]
    ] == [[3, 224, 224]]
    assert sorted(o["name"] for o in cfg["output"]) == sorted(OUTPUTS)


def test_onnx_step_spinning_is_chosen_for_the_cpu_it_runs_on(server):
    """The generated config leaves it to the Python-based backend (``intra_op_spinning: auto``),
    which chooses by the CPU it loads on: ONNX Runtime's threads spin within a run where the
    CPU has AMX (every model measured there served faster so), and never elsewhere (left
    spinning after a run they stalled requests by ~0.5 s on 2 cores)."""
    with httpclient.InferenceServerClient(url=server.url) as client:
        params = client.get_model_config("vit")["parameters"]
    assert params["intra_op_spinning"]["string_value"] == "auto"
    assert "allow_spinning" not in params and "session.force_spinning_stop" not in params
    log = server.launched.log()
    if "amx_tile" in Path("/proc/cpuinfo").read_text():
        assert "session.force_spinning_stop=1, intra_op_spinning=within_run (auto: this CPU" in log
        assert "allow_spinning" not in log
    else:
        assert "session.intra_op.allow_spinning=0, intra_op_spinning=never (auto: this CPU" in log
        assert "force_spinning_stop" not in log


def test_served_config_names_the_weights(server):
    with httpclient.InferenceServerClient(url=server.url) as client:
        configs = [client.get_model_config(m) for m in ("python_vit", "preprocessing")]
    for config in configs:
        params = config["parameters"]
        assert params["checkpoint"]["string_value"] == str(server.checkpoint.resolve())


@pytest.mark.parametrize("model", MODELS)
def test_bad_pixels_rejected_and_server_keeps_serving(server, photo, model):
    bad = photo.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException) as err:
        infer(server.url, model, bad[None])
    assert "image" in err.value.message() and "NaN" in err.value.message()
    assert err.value.status() == "400"
    assert infer(server.url, model, photo[None])["last_hidden_state"].shape[0] == 1


@pytest.mark.parametrize("input_format", ["fp32", "uint8", "jpeg"])
@pytest.mark.parametrize("model", MODELS)
def test_client_script(server, model, input_format):
    run = run_client(
        "--model_name", model, "--url", server.url, "--batch", "2", "--input-format", input_format
    )
    assert run.returncode == 0, run.stderr
    assert "last_hidden_state: shape (2, 50, 32)" in run.stdout
    assert f"as {input_format}" in run.stdout


def test_client_reports_missing_server():
    run = run_client("--url", "127.0.0.1:9")
    assert run.returncode == 1
    assert "no Triton server at 127.0.0.1:9" in run.stderr


def test_client_reports_unknown_model(server):
    run = run_client("--model_name", "nope", "--url", server.url)
    assert run.returncode == 1
    assert "model 'nope' is not available" in run.stderr


def test_inspect_served_model_and_onnx_file(server):
    served = run_cli("inspect", "ensemble_model", "--url", server.url, timeout=60)
    assert served.returncode == 0, served.stderr
    assert "image_bytes" in served.stdout and "last_hidden_state" in served.stdout
    onnx = server.served_onnx
    local = run_cli("inspect", str(onnx), timeout=60)
    assert local.returncode == 0, local.stderr
    assert "pixel_values" in local.stdout and "batch_size" in local.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["client.py", "--model_name", "ensemble_model"],
        ["-m", "hf_triton.cli", "inspect", "ensemble_model"],
    ],
    ids=["client", "cli"],
)
def test_output_into_a_closed_pipe_stops_quietly(server, argv):
    """`client.py ... | head`, `hf-triton inspect ... | head`: once the reader has gone, the
    command stops with SIGPIPE's status and no traceback, as Unix tools do."""
    _stops_quietly_into_a_closed_pipe([*argv, "--url", server.url])


def _stops_quietly_into_a_closed_pipe(argv: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line
    try:
        run = subprocess.run(
            [sys.executable, *argv],
            cwd=PROJECT_ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert run.returncode == 128 + signal.SIGPIPE, run.stderr
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr


def test_liveness_probe_passes_on_a_healthy_server(server, monkeypatch):
    """The stdlib probe the container image runs as Kubernetes' liveness check."""
    from hf_triton import probe

    monkeypatch.setenv("HF_TRITON_TEST_KEY", ADMIN_HEADERS["admin-key"])
    url = f"http://{server.url}"
    assert probe.main(["--url", url, "python_vit", "ensemble_model", "vit"]) == 0
    assert probe.main(["--url", url, "--all", "--admin-key-env", "HF_TRITON_TEST_KEY"]) == 0


def test_onnx_step_may_spin_within_a_request_and_serves_the_same(
    tmp_path, tiny_checkpoint, reference, photo
):
    """`build --onnx-spin within-run` (what `optimize` may choose, and what auto chooses on a
    CPU with AMX): ONNX Runtime's threads spin between a request's operators and stop when it
    ends; the backend applies it, the answers stay transformers'."""
    from conftest import launch

    out = tmp_path / "built"
    args = ["--model", str(tiny_checkpoint), "--out", str(out), "--approach", "ensemble"]
    run = run_cli("build", *args, "--onnx-spin", "within-run", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    config = (out / "ensemble_model_repository" / "vit" / "config.pbtxt").read_text()
    assert '"session.force_spinning_stop"' in config and "allow_spinning" not in config
    assert "intra_op_spinning" not in config
    launched = launch([out / "ensemble_model_repository"], tmp_path / "work", tiny_checkpoint)
    try:
        assert "session.force_spinning_stop=1" in launched.log()
        images = np.stack([photo, synthetic(2, *photo.shape[:2])])
        assert_close(
            infer(launched.url, "ensemble_model", images),
            reference(list(images)),
            ATOL["ensemble_model"],
        )
    finally:
        assert launched.stop() == 0
