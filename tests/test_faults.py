"""Faults against a real server: exceptions, a killed stub, SIGTERM under load, soak, /dev/shm."""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from hf_triton.soak import process_tree, run_soak, shm_regions

from conftest import Launched, launch

FAULT_REPOSITORY = Path(__file__).parent / "fault_repository"
RECOVERY_LIMIT_S = 90.0


def _launch(tmp: Path, checkpoint: Path, probe_interval_s: float = 0.0) -> Launched:
    return launch(
        [FAULT_REPOSITORY],
        tmp / "work",
        checkpoint,
        extra=("--probe-interval-s", str(probe_interval_s)),
    )


def double(url: str, x: np.ndarray, timeout_s: float = 30.0) -> np.ndarray:
    client = httpclient.InferenceServerClient(url=url, network_timeout=timeout_s)
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    return client.infer("faulty", [tensor]).as_numpy("y")


@pytest.fixture
def fault_server(tmp_path, tiny_checkpoint) -> Iterator[Launched]:
    launched = _launch(tmp_path, tiny_checkpoint, probe_interval_s=1.0)
    try:
        yield launched
    finally:
        launched.stop()


def test_execute_exception_is_a_500_and_next_request_works(fault_server):
    with pytest.raises(InferenceServerException, match="injected failure: x contains -1") as e:
        double(fault_server.url, np.array([[1.0, -1.0]]))
    assert e.value.status() == "500"
    np.testing.assert_array_equal(double(fault_server.url, np.array([[3.0]])), [[6.0]])


def _stub_pids(server_pid: int, model: str) -> list[int]:
    pids = []
    for pid in process_tree(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline[0].endswith(b"triton_python_backend_stub")
            and f"/{model}/".encode() in cmdline[1]
        ):
            pids.append(pid)
    return pids


def test_killed_stub_is_detected_and_service_recovers(fault_server):
    assert double(fault_server.url, np.array([[1.0]]))[0, 0] == 2.0
    stubs = _stub_pids(fault_server.proc.pid, "faulty")
    assert stubs, "no stub process found for 'faulty'"
    os.kill(stubs[0], signal.SIGKILL)
    killed = time.monotonic()
    # Triton itself keeps reporting ready; only a real inference shows the damage.
    deadline = killed + RECOVERY_LIMIT_S
    while time.monotonic() < deadline:
        try:
            if double(fault_server.url, np.array([[2.0]]), timeout_s=5)[0, 0] == 4.0:
                break
        except Exception:
            time.sleep(0.5)
    else:
        pytest.fail(f"not recovered after {RECOVERY_LIMIT_S} s:\n{fault_server.output()}")
    took = time.monotonic() - killed
    # The launcher reports once its own probes pass again, a moment after service is back.
    deadline = time.monotonic() + 30
    while "recovered in" not in fault_server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not healthy" in fault_server.output() and "recovered in" in fault_server.output()
    print(f"service back {took:.1f} s after the stub was killed")


def test_sigterm_under_load_answers_every_request(tmp_path, tiny_checkpoint):
    before = shm_regions()
    launched = _launch(tmp_path, tiny_checkpoint)
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
    leftovers = shm_regions() - before
    assert not leftovers, f"/dev/shm leftovers after shutdown: {leftovers}"


def test_soak_exactly_once_bounded_memory(tmp_path, tiny_checkpoint):
    launched = _launch(tmp_path, tiny_checkpoint)
    try:
        report = run_soak(
            send=lambda i: double(launched.url, np.array([[float(i), float(-i - 2)]])),
            check=lambda i, y: y.tolist() == [[2.0 * i, 2.0 * (-i - 2)]],
            requests=600,
            concurrency=8,
            server_pid=launched.proc.pid,
            warmup=100,
        )
    finally:
        assert launched.stop() == 0
    print(report.summary())
    assert not report.errors and report.wrong == 0 and not report.not_exactly_once
    assert report.rss_growth < 32 * 2**20, report.summary()


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
