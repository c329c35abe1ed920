"""Faults against real servers: exceptions, killed stubs of every kind, a model that keeps
dying, SIGTERM at start-up and under load, overload, soak, /dev/shm leftovers."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from hf_triton import soak
from hf_triton.server import process_running
from hf_triton.soak import process_tree, run_soak, shm_regions

from conftest import PROJECT_ROOT, Launched, launch

FAULT_REPOSITORY = Path(__file__).parent / "fault_repository"
DYING_REPOSITORY = Path(__file__).parent / "dying_repository"


def _launch(tmp: Path, checkpoint: Path, *extra: str) -> Launched:
    return launch([FAULT_REPOSITORY], tmp / "work", checkpoint, extra=extra)


def call(url: str, model: str, x: np.ndarray, timeout_s: float = 30.0) -> np.ndarray:
    client = httpclient.InferenceServerClient(url=url, network_timeout=timeout_s)
    try:
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32))
        return client.infer(model, [tensor]).as_numpy("y")
    finally:
        client.close()


def double(url: str, x: np.ndarray, timeout_s: float = 30.0) -> np.ndarray:
    return call(url, "faulty", x, timeout_s)


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, tiny_checkpoint) -> Iterator[Launched]:
    launched = _launch(tmp_path_factory.mktemp("faults"), tiny_checkpoint)
    try:
        yield launched
    finally:
        launched.stop()


def test_serving_goes_on_when_the_reader_of_its_output_leaves(tmp_path, tiny_checkpoint):
    """`hf-triton serve | head`, or a log shipper that stops: once stdout's reader has gone, the
    launcher's progress lines go nowhere (no traceback per line), the server serves on, and
    Ctrl-C still stops it cleanly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line
    try:
        launched = launch([FAULT_REPOSITORY], tmp_path / "work", tiny_checkpoint, stdout=write_end)
    finally:
        os.close(write_end)
    try:
        np.testing.assert_array_equal(double(launched.url, np.array([[3.0]])), [[6.0]])
    finally:
        code = launched.stop()
    stderr = launched.output()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "successfully unloaded" in launched.log()


def test_execute_exception_is_a_500_and_next_request_works(fault_server):
    with pytest.raises(InferenceServerException, match="injected failure: x contains -1") as e:
        double(fault_server.url, np.array([[1.0, -1.0]]))
    assert e.value.status() == "500"
    np.testing.assert_array_equal(double(fault_server.url, np.array([[3.0]])), [[6.0]])


def test_client_timeout_leaves_the_server_serving(fault_server):
    """Clients that give up mid-request (timeout, cancel) must not hurt the server."""

    def abandon(_: int) -> str:
        try:
            double(fault_server.url, np.array([[5.0]]), timeout_s=0.001)
        except Exception as e:  # the client's own timeout
            return type(e).__name__
        return "answered"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(abandon, range(16)))
    assert outcomes.count("answered") < 16  # the timeouts really happened
    np.testing.assert_array_equal(double(fault_server.url, np.array([[7.0]])), [[14.0]])


@pytest.mark.timed
def test_overload_is_refused_fast_and_accepted_answers_stay_right(fault_server):
    """10x the capacity of a model with a bounded queue: the excess gets 503 within
    milliseconds, accepted requests keep their latency bounded, nothing is answered wrong."""
    report = soak.overload(fault_server.url, "slow", factor=10, seconds=8)
    print(report.summary())
    assert report.refused > report.ok > 0, report.summary()
    assert not report.other_errors and report.wrong == 0, report.summary()
    assert report.p(report.refused_ms, 99) < 50, report.summary()
    assert report.p(report.accepted_ms, 99) <= 3 * report.unloaded_p99_ms, report.summary()


def test_soak_exactly_once_bounded_memory(fault_server):
    report = run_soak(
        send=lambda i: double(fault_server.url, np.array([[float(i), float(-i - 2)]])),
        check=lambda i, y: y.tolist() == [[2.0 * i, 2.0 * (-i - 2)]],
        requests=600,
        concurrency=8,
        server_pid=fault_server.proc.pid,
        warmup=100,
    )
    print(report.summary())
    assert not report.errors and report.wrong == 0 and not report.not_exactly_once
    assert report.rss_growth < 32 * 2**20, report.summary()


def _argvs(root_pid: int) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process under ``root_pid`` that is still there."""
    for pid in process_tree(root_pid):
        try:
            yield pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue


def _stub_pids(root_pid: int, model: str) -> list[int]:
    """Python-backend stubs serving ``model`` (its model.py or model.onnx) under ``root_pid``."""
    return [
        pid
        for pid, argv in _argvs(root_pid)
        if argv[0].endswith(b"triton_python_backend_stub")
        and re.search(rf"/{re.escape(model)}/\d+/model\.(py|onnx)$".encode(), argv[1])
    ]


def _shm_prefix(root_pid: int, timeout_s: float = 30.0) -> str:
    """The shared-memory prefix the launcher under ``root_pid`` gave its tritonserver (waits
    while the launcher starts or restarts one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for _, argv in _argvs(root_pid):
            for arg in argv:
                found = re.search(rb"shm-region-prefix-name=(.+)", arg)
                if found:
                    return found.group(1).decode()
        assert time.monotonic() < deadline, f"no tritonserver under {root_pid}"
        time.sleep(0.1)


def _regions_of(prefix: str) -> set[str]:
    """One server's regions in /dev/shm (other servers, e.g. the session's background
    conformance run, come and go meanwhile)."""
    return {r for r in shm_regions() if r.startswith(prefix)}


def _wait_for(launched: Launched, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in launched.output() and time.monotonic() < deadline:
        assert launched.proc.poll() is None, launched.output()
        time.sleep(0.5)
    assert text in launched.output(), f"no {text!r} after {timeout_s} s:\n{launched.output()}"


def test_model_that_keeps_dying_makes_the_launcher_give_up(tmp_path, tiny_checkpoint):
    launched = launch(
        [DYING_REPOSITORY],
        tmp_path / "work",
        tiny_checkpoint,
        extra=("--probe-interval-s", "1", "--max-restarts", "2"),
    )
    try:
        prefix = _shm_prefix(launched.proc.pid)
        code = launched.proc.wait(180)
    finally:
        launched.stop()
    out = launched.output()
    assert code == 1, out
    assert out.count("recovered in") <= 2 and "restart #2 in a row" in out, out
    assert "error: giving up: 2 restarts in the last 600 s did not keep the models alive" in out
    assert _regions_of(prefix) == set()


@pytest.mark.timed
def test_sigterm_during_start_up_stops_within_the_exit_timeout(tmp_path, tiny_checkpoint):
    """A launcher told to stop while its models load stops, and leaves no shared memory."""
    from hf_triton.server import free_port

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_triton.cli",
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--model-repository",
            str(FAULT_REPOSITORY),
            "--workdir",
            str(tmp_path / "work"),
            *("--http-port", str(free_port()), "--grpc-port", str(free_port())),
            *("--metrics-port", str(free_port())),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # until tritonserver has been started
        if line.startswith("Starting Triton"):
            break
    prefix = _shm_prefix(proc.pid)
    time.sleep(1.0)  # models are loading now
    code, took = _sigterm(proc, 45)
    log = (tmp_path / "work" / "tritonserver.log").read_text(errors="replace")
    assert code == 0 and took < 30 + 5, (code, took, log[-3000:])
    assert _regions_of(prefix) == set()


#: A model whose initialize holds the GIL for many seconds (one C call), after saying so.
LOADS_HOLDING_THE_GIL = """
from pathlib import Path


class TritonPythonModel:
    def initialize(self, args):
        Path(args["model_repository"], "initializing").touch()
        sum(range(10**10))

    def execute(self, requests):
        return []
"""


def _running(pids: list[int]) -> list[int]:
    """The ``pids`` that still run (a zombie has ended; init reaps it)."""
    return [pid for pid in pids if process_running(pid)]


def _sigterm(proc: subprocess.Popen, timeout_s: float) -> tuple[int, float]:
    """SIGTERM ``proc``: its exit code, and the seconds it took to exit."""
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout_s)
    return code, time.monotonic() - signalled


def test_sigterm_while_a_model_loads_leaves_no_stub(tmp_path):
    """SIGTERM to the launcher while a model is still in its initialize: tritonserver has no
    signal handlers until its models have loaded, so the launcher's SIGINT ends it at once, and
    the stub it leaves behind is killed and its shared memory removed: a stub whose server dies
    while it holds the GIL hangs for good (before: it stayed, with its model in memory)."""
    from hf_triton.server import free_port

    model = tmp_path / "repository" / "loads_slowly"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(LOADS_HOLDING_THE_GIL)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "hf_triton.cli", "serve"),
            *("--model-repository", str(model.parent), "--workdir", str(workdir)),
            *("--http-port", str(free_port()), "--grpc-port", str(free_port())),
            *("--metrics-port", str(free_port())),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tree: list[int] = []
    try:
        prefix = _shm_prefix(proc.pid, timeout_s=120)
        deadline = time.monotonic() + 120
        while not list(workdir.rglob("initializing")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
        tree = process_tree(proc.pid)
        _, took = _sigterm(proc, 60)
        out = proc.communicate()[0]
        left = _running(tree)
    finally:
        for pid in _running(tree):  # what a failure leaves: no stub outlives the test
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and took < 20, (proc.returncode, took, out)
    assert left == [], out
    assert _regions_of(prefix) == set(), out
    assert "killed 1 Python-backend stub(s) that outlived tritonserver" in out, out


@pytest.mark.timed
def test_sigterm_during_recovery_stops_promptly(tmp_path, tiny_checkpoint):
    """Told to stop while it restarts a server whose stub died: it stops, within seconds."""
    launched = _launch(tmp_path, tiny_checkpoint, "--probe-interval-s", "1")
    try:
        double(launched.url, np.array([[1.0]]))
        os.kill(_stub_pids(launched.proc.pid, "faulty")[0], signal.SIGKILL)
        _wait_for(launched, "unhealthy:", timeout_s=30)
        code, took = _sigterm(launched.proc, 45)
    finally:
        launched.stop()
    assert code == 0 and took < 20, (code, took, launched.output())


@pytest.mark.timed
def test_idle_http_connection_holding_the_stop_is_named(tmp_path, tiny_checkpoint):
    """A client that keeps an idle keep-alive HTTP connection open holds Triton's drain for the
    whole exit timeout, after which it stops without unloading its models (exit code 1): the
    launcher says so and what to do, instead of a bare exit code."""
    launched = _launch(tmp_path, tiny_checkpoint, "--exit-timeout-s", "3")
    host, port = launched.url.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200"), "no answer on the connection"
            signalled = time.monotonic()
            code = launched.stop()  # the connection stays open, idle, meanwhile
            took = time.monotonic() - signalled
    finally:
        launched.stop()
    out = launched.output()
    assert code == 0 and 3 <= took < 3 + 15, (code, took, out)
    assert "Stopped (exit code 1)." in out, out
    assert (
        "waited its whole exit timeout (3 s) for 1 open HTTP connection(s) to close, then "
        "stopped without unloading the models" in out
    ), out
    assert "client.close()" in out


def test_sigterm_under_load_answers_every_request(tmp_path, tiny_checkpoint):
    launched = _launch(tmp_path, tiny_checkpoint)
    prefix = _shm_prefix(launched.proc.pid)
    n = 64

    def one(i: int) -> str:
        try:
            y = double(launched.url, np.array([[float(i)]]), timeout_s=60)
            return "ok" if y[0, 0] == 2 * i else "wrong"
        except InferenceServerException as e:
            return f"error {e.status()}"  # an answer: the server refused it while stopping
        except (ConnectionError, http.client.HTTPException):
            return "refused"  # after shutdown: the connection is refused or closed, not silence
        except TimeoutError:
            return "dropped"  # no answer within a minute: what must never happen

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        time.sleep(0.3)  # let requests get in flight
        launched.proc.send_signal(signal.SIGTERM)
        outcomes = [f.result(timeout=90) for f in futures]  # a hang fails here
    assert launched.proc.wait(90) == 0
    assert len(outcomes) == n and "wrong" not in outcomes and "dropped" not in outcomes, outcomes
    assert outcomes.count("ok") > 0, "nothing was in flight when SIGTERM arrived"
    leftovers = _regions_of(prefix)
    assert not leftovers, f"/dev/shm leftovers after shutdown: {leftovers}"


def test_sigterm_stops_a_command_and_the_server_it_started(tmp_path):
    """`hf-triton conformance` (as bench and optimize) starts a server of its own: SIGTERM (a
    cancelled CI job, `timeout`) stops that server and removes its /dev/shm regions, as
    Ctrl-C does, instead of ending the command where it stands and leaving them behind.

    Started as a CI job's background command is, with SIGINT ignored, and stopped while its
    models load: tritonserver has no handlers of its own until they have loaded, so a SIGINT
    ignored by inheritance was lost and the stop waited out its whole grace period (40 s)."""
    from helpers import Background

    run = Background.start(
        ["conformance", "--quick", "--families", "resnet", "--out", str(tmp_path / "out")],
        tmp_path / "cli.out",
        sigint_ignored=True,
    )
    try:
        prefix = _shm_prefix(run.proc.pid, timeout_s=300)  # tritonserver started
        deadline = time.monotonic() + 120
        while not _regions_of(prefix) and time.monotonic() < deadline:
            time.sleep(0.2)  # until its stubs have their regions: there is something to clean
        assert _regions_of(prefix), run.out.read_text()
        tree = process_tree(run.proc.pid)
        code, took = _sigterm(run.proc, 90)
    finally:
        run.stop()
    out = run.out.read_text()
    assert code == 128 + signal.SIGTERM and "Stopped by SIGTERM." in out, (code, out)
    assert took < 20, (took, out)
    assert _running(tree) == [], out
    assert _regions_of(prefix) == set(), out


@pytest.mark.destructive
def test_every_kind_of_stub_killed_recovers(server, text_server, photo, tmp_path):
    """Kill one stub of every kind — vision python, image preprocessing, ONNX step (the
    session's tutorial server), text python, tokenizer (a launcher serving the text server's
    real all-MiniLM-L6-v2 repositories, so that its restart reloads those, not every model of
    the text server); ensembles lose theirs with them — with the launchers'
    default probe interval: both report and recover, every model answers as before, and the
    dead stubs' shared memory is gone."""
    minilm = [r for r in text_server.repositories if r.parent.name == "minilm"]
    text = launch(minilm, tmp_path / "text")
    try:
        _kill_every_kind_and_recover(server, text, photo)
    finally:
        text.stop()


def _kill_every_kind_and_recover(server, text: Launched, photo) -> None:
    from test_text import send_text

    from helpers import infer

    image = photo[None]
    vision_before = {m: infer(server.url, m, image) for m in ("python_vit", "ensemble_model")}
    text_before = {
        m: send_text(text.url, m, ["A sentence."], "sentence_embedding")
        for m in ("python_minilm", "ensemble_minilm")
    }
    prefixes = [_shm_prefix(launched.proc.pid) for launched in (server.launched, text)]
    regions = set().union(*map(_regions_of, prefixes))
    assert regions, prefixes
    kills = {
        server.process.pid: ["python_vit", "preprocessing", "vit"],
        text.proc.pid: ["python_minilm", "minilm_pre", "minilm"],
    }
    for root, models in kills.items():
        for model in models:
            stubs = _stub_pids(root, model)
            assert stubs, f"no stub for {model}"
            os.kill(stubs[0], signal.SIGKILL)
    # Kubernetes' liveness check sees what /v2/health/* does not.
    from hf_triton import probe

    assert probe.main(["--url", f"http://{server.url}", "python_vit", "ensemble_model"]) == 1
    # The default probe interval is 30 s; a restart takes ~20 s.
    for launched in (server.launched, text):
        _wait_for(launched, "recovered in", timeout_s=150)
        assert "is not healthy" in launched.output()
    for model, want in vision_before.items():
        got = infer(server.url, model, image)
        np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"], atol=1e-4)
    for model, want in text_before.items():
        got = send_text(text.url, model, ["A sentence."], "sentence_embedding")
        np.testing.assert_allclose(got, want, atol=1e-5)
    left = regions & shm_regions()
    assert not left, f"shared memory of the killed stubs is still in /dev/shm: {left}"
