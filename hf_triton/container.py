"""The tutorial's route: NVIDIA's Triton container, with the same repositories, run for you.

``hf-triton serve --container docker|podman`` stages the repositories as for the embedded
server (checkpoints resolved, model.onnx exported), but points every ``checkpoint``
parameter at ``/checkpoints/<name>`` inside the container, then builds the derived image
(``deploy/Dockerfile``: NVIDIA's pinned image + the pinned Python packages the model.py
files import, instead of the tutorial's ``pip install`` at every start) and runs it with
the repositories and checkpoints mounted read-only, ``--shm-size``, GPUs when asked, the
same tritonserver flags as the embedded launcher, and ports published on the host's
loopback unless ``--host`` says otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hf_triton.errors import HfTritonError
from hf_triton.server import ServerConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = PROJECT_ROOT / "deploy" / "Dockerfile"
#: Triton 2.51 = release 24.10, the version the embedded wheel bundles.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
IMAGE = "hf-triton-server:24.10"
#: The python backend moves tensors through /dev/shm; Docker's 64 MB default is too small
#: for ViT batches (the tutorial passes --shm-size too).
SHM_SIZE = "1g"
MODELS_DIR = "/models"
CHECKPOINTS_DIR = "/checkpoints"


class ContainerError(HfTritonError):
    """The container engine is missing or not running."""


def container_checkpoint_path(name: str) -> str:
    """Where a checkpoint is mounted inside the container."""
    return f"{CHECKPOINTS_DIR}/{re.sub(r'[^A-Za-z0-9_.-]+', '--', name).strip('-')}"


def dockerfile_pins() -> dict[str, str]:
    """Package -> version pinned in deploy/Dockerfile (tests compare them with pyproject)."""
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE.read_text()))


@dataclass
class ContainerPlan:
    engine: str  # docker or podman
    repositories: list[Path]  # staged, with container checkpoint paths
    checkpoints: dict[str, Path]  # container path -> host directory
    config: ServerConfig
    gpus: bool = False
    image: str = IMAGE

    def build_argv(self) -> list[str]:
        # The project root is the context (.dockerignore lets through the probe only).
        return [self.engine, "build", "-t", self.image, "-f", str(DOCKERFILE), str(PROJECT_ROOT)]

    def run_argv(self, redact: bool = False) -> list[str]:
        """The run command; ``redact`` hides the admin key (for printing)."""
        c = self.config
        publish_host = "" if c.host in ("0.0.0.0", "") else f"{c.host}:"
        argv = [self.engine, "run", "--rm", "--init", f"--shm-size={SHM_SIZE}"]
        # The same hardening as deploy/kubernetes: nothing writable but /tmp, no privileges.
        argv += ["--read-only", "--tmpfs=/tmp", "--cap-drop=ALL"]
        argv += ["--security-opt=no-new-privileges"]
        if self.gpus:
            argv.append("--gpus=all" if self.engine == "docker" else "--device=nvidia.com/gpu=all")
        for port in (c.http_port, c.grpc_port, c.metrics_port):
            argv += ["-p", f"{publish_host}{port}:{port}"]
        for repo in self.repositories:
            argv += ["-v", f"{repo}:{MODELS_DIR}/{repo.name}:ro"]
        for inside, host in sorted(self.checkpoints.items()):
            argv += ["-v", f"{host}:{inside}:ro"]
        argv += ["-e", "HF_HUB_OFFLINE=1", "-e", "TRANSFORMERS_OFFLINE=1", self.image]
        inner = ServerConfig(
            model_repositories=[Path(MODELS_DIR, r.name) for r in self.repositories],
            host="0.0.0.0",  # inside the container; the host side is bound by -p above
            http_port=c.http_port,
            grpc_port=c.grpc_port,
            metrics_port=c.metrics_port,
            default_max_batch_size=c.default_max_batch_size,
            exit_timeout_s=c.exit_timeout_s,
            admin_key="$HF_TRITON_ADMIN_KEY" if redact and c.admin_key else c.admin_key,
            restricted_apis=c.restricted_apis,
        )
        # The container has its own backends (native ONNX Runtime among them).
        return argv + [
            a
            for a in inner.argv(Path("tritonserver"), Path("/unused"))
            if not a.startswith("--backend-directory")
        ]

    def check_engine(self) -> None:
        if shutil.which(self.engine) is None:
            raise ContainerError(
                f"'{self.engine}' is not installed; install it or run without "
                "--container (the embedded server needs neither)"
            )
        info = subprocess.run([self.engine, "info"], capture_output=True, text=True, check=False)
        if info.returncode != 0:
            reason = (info.stderr or info.stdout).strip().splitlines()
            raise ContainerError(
                f"'{self.engine}' is installed but no engine answers "
                f"({reason[-1] if reason else 'info failed'}); start it (e.g. "
                "`systemctl start docker`) or run without --container"
            )
