"""Helpers shared by the tests: one request, closeness, synthetic images, the CLI and client."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from hf_triton.serve import PROJECT_ROOT

MODELS = ["python_vit", "ensemble_model"]
#: Max |served - transformers|: python_vit runs the same PyTorch code (batching may
#: change the kernel's summation order); the ensemble runs ONNX Runtime, held to the
#: tutorial's export bound.
ATOL = {"python_vit": 1e-4, "ensemble_model": 1e-3}
OUTPUTS = ["last_hidden_state", "pooler_output"]


def infer(url: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        tensor = httpclient.InferInput("image", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images.astype(np.float32))
        result = client.infer(model, [tensor])
        return {name: result.as_numpy(name) for name in OUTPUTS}


def assert_close(got: dict, want: dict, atol: float) -> None:
    for name in OUTPUTS:
        assert got[name].shape == want[name].shape, name
        diff = float(np.max(np.abs(got[name] - want[name])))
        assert diff <= atol, f"{name}: max |served - transformers| = {diff:.3g} > {atol}"


def synthetic(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3)).astype(np.float32)


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    """`hf-triton ARGS` (what the shell scripts run), from the project root; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "hf_triton.cli", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def run_client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python client.py ARGS`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "client.py", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Background:
    """`hf-triton ARGS` started now and collected later; its output goes to a file."""

    proc: subprocess.Popen[bytes]
    out: Path

    @classmethod
    def start(cls, args: list[str], out: Path, sigint_ignored: bool = False) -> Background:
        """``sigint_ignored``: start it as a non-interactive shell starts a background job."""
        with out.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hf_triton.cli", *args],
                cwd=PROJECT_ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=_ignore_sigint if sigint_ignored else None,
            )
        return cls(proc, out)

    def result(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """Wait for it (stopped past ``timeout``); stdout holds stdout and stderr."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        output = self.out.read_text(errors="replace")
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, output, "")

    def stop(self) -> None:
        """SIGTERM: its servers stop with it. Not SIGINT: a shell that runs the suite in the
        background starts it, and so this command, with SIGINT ignored."""
        stop_process(self.proc, signal.SIGTERM)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_process(proc: subprocess.Popen[bytes], signum: int, deadline_s: float = 60) -> int:
    """Send ``signum`` to a process that is still running; kill it only past the deadline."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
