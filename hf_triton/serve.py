"""Serve the model repositories: resolve the checkpoint, stage, export if needed, launch.

The source repositories stay untouched (and can be read-only). Each run stages a
copy in the work directory in which every ``checkpoint`` parameter names the
resolved local checkpoint, so the served config shows exactly which weights are
in use, and the server never needs the network. A missing or stale model.onnx is
exported into the work directory's cache and placed in the staged copy only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from hf_triton import checkpoints, export
from hf_triton.errors import HfTritonError
from hf_triton.server import ServerConfig, TritonServer

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORIES = (
    PROJECT_ROOT / "python_model_repository",
    PROJECT_ROOT / "ensemble_model_repository",
)
ONNX_FILENAME = "model.onnx"
#: The server's environment beyond the launcher's own: how PyTorch's idle OpenMP threads wait.
#: By default (libgomp, PyTorch's) they spin ~3 ms after each parallel region; in a
#: Python-backend stub next to Triton's threads on few cores that stalled one request in a few
#: hundred by ~500 ms (tiny ViT, c=1: max 521-524 ms). Never spinning (PASSIVE) cured that but
#: cost PyTorch ~30% of its ViT-base throughput here (a sleep and wake-up between every two
#: operations). A short spin, 10,000 iterations (~0.1 ms), keeps threads awake between the
#: operations of one forward pass and lets them sleep soon after it: no stall (max 25-30 ms)
#: and the throughput of the default. PASSIVE stays for OpenMP runtimes other than libgomp;
#: libgomp obeys GOMP_SPINCOUNT over it. deploy/ sets the same; a value in the launcher's
#: environment wins.
SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}
#: Files at least this large are linked into the staged copy instead of copied.
_LINK_BYTES = 1 << 20


class RepositoryError(HfTritonError):
    """A model repository is missing or malformed."""


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt with Triton's own schema."""
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: not a valid Triton model config: {e}") from e


def onnx_models(repository: Path) -> list[Path]:
    """Model directories served by ONNX Runtime: a version folder meant for ``model.onnx``.

    A directory without config.pbtxt is one (its config is auto-completed from the graph).
    """
    found = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        config_path = model_dir / "config.pbtxt"
        if config_path.exists():
            cfg = read_config(config_path)
            if cfg.backend != "onnxruntime" and cfg.platform != "onnxruntime_onnx":
                continue
        found.append(model_dir)
    return found


def entry_models(repositories: list[Path]) -> list[str]:
    """Models a client calls: every model that is not a step of an ensemble."""
    configs = {
        p.parent.name: read_config(p) for r in repositories for p in r.glob("*/config.pbtxt")
    }
    names = {p.name for r in repositories for p in r.iterdir() if p.is_dir()}
    steps = {step.model_name for cfg in configs.values() for step in cfg.ensemble_scheduling.step}
    return sorted(names - steps)


def ensure_exported(
    model_dir: Path, checkpoint: checkpoints.Checkpoint, cache: Path, version: str = "1"
) -> Path:
    """Make ``model_dir/<version>/model.onnx`` the export of ``checkpoint``.

    A current file (its export record names the checkpoint) stays; otherwise the export comes
    from ``cache`` (made there once, validated, reused by later launches) and replaces it as a
    new file, so a hard link into the source repository is never written through.
    """
    path = model_dir / version / ONNX_FILENAME
    tower = _tower(model_dir)
    recorded = export.exported_checkpoint(path, tower)
    if recorded == str(checkpoint.path):
        log.info("%s is current (exported from %s)", path, recorded)
        return path
    if path.exists():
        log.info(
            "%s was exported from %s; serving an export of %s", path, recorded, checkpoint.path
        )
    digest = hashlib.sha256(f"{checkpoint.path}{tower or ''}".encode()).hexdigest()[:16]
    cached = cache / digest / ONNX_FILENAME
    if export.exported_checkpoint(cached, tower) != str(checkpoint.path):
        log.info("Exporting %s to %s (once; later runs reuse it) ...", checkpoint.name, cached)
        report = export.export_onnx(checkpoint.path, cached, tower=tower)
        for name, diff in report.max_abs_diff.items():
            log.info("  validated %s: max |onnx - torch| = %.2e (atol %g)", name, diff, report.atol)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _link_or_copy(str(cached), str(path))
    return path


def _tower(model_dir: Path) -> str | None:
    """The image-text tower an ONNX model directory serves (its config's ``tower``)."""
    config_path = model_dir / "config.pbtxt"
    if not config_path.exists():
        return None
    parameters = read_config(config_path).parameters
    name = export.TOWER_PARAMETER
    return parameters[name].string_value if name in parameters else None


def stage(
    repositories: list[Path],
    dest: Path,
    checkpoint: checkpoints.Checkpoint | None,
    path_of: Callable[[checkpoints.Checkpoint], str] | None = None,
    allow_standin: bool = True,
) -> tuple[list[Path], list[checkpoints.Checkpoint]]:
    """Copy ``repositories`` under ``dest`` with every ``checkpoint`` parameter resolved.

    With ``checkpoint`` given, every model uses it; otherwise each config's own
    ``checkpoint`` (hub id or path) is resolved. Returns the staged repositories and the
    checkpoints in use. ``path_of`` says where a checkpoint is seen by the server (a
    container mounts it elsewhere); by default its local path.
    """
    path_of = path_of or (lambda c: str(c.path))
    if dest.exists():
        shutil.rmtree(dest)
    staged: list[Path] = []
    used: dict[str, checkpoints.Checkpoint] = {}
    for repo in repositories:
        if not repo.is_dir():
            raise RepositoryError(f"Model repository {repo} does not exist")
        target = dest / repo.name
        if target.exists():  # several builds each bring a python_model_repository
            target = dest / f"{repo.parent.name}_{repo.name}"
        n = 2
        while target.exists():
            target, n = dest / f"{repo.parent.name}_{repo.name}_{n}", n + 1
        shutil.copytree(
            repo,
            target,
            copy_function=_link_or_copy,
            ignore=shutil.ignore_patterns("__pycache__", ".gitkeep", "*.tmp*"),
        )
        for config_path in target.glob("*/config.pbtxt"):
            cfg = read_config(config_path)
            if "checkpoint" not in cfg.parameters:
                continue
            ckpt = checkpoint
            if ckpt is None:
                name = cfg.parameters["checkpoint"].string_value
                revision = cfg.parameters["revision"].string_value or None
                ckpt = used.get(name) or checkpoints.resolve(
                    name, revision, allow_standin=allow_standin
                )
            used[ckpt.name] = ckpt
            cfg.parameters["checkpoint"].string_value = path_of(ckpt)
            if ckpt.revision:
                cfg.parameters["revision"].string_value = ckpt.revision
            config_path.unlink()  # never write through a link into the source
            config_path.write_text(text_format.MessageToString(cfg))
        staged.append(target)
    return staged, list(used.values())


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link, not a symlink: it also works where the staged tree is mounted into a
    # container. Across file systems, a copy.
    if os.path.getsize(src) >= _LINK_BYTES:
        try:
            os.link(os.path.realpath(src), dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


@dataclass
class Deployment:
    """Everything needed to start a server for a set of repositories and one checkpoint."""

    weights: list[checkpoints.Checkpoint]
    repositories: list[Path]
    workdir: Path

    @classmethod
    def prepare(
        cls,
        checkpoint: str | None = checkpoints.DEFAULT_CHECKPOINT,
        revision: str | None = None,
        repositories: list[Path] | None = None,
        workdir: Path | None = None,
        allow_standin: bool = True,
        path_of: Callable[[checkpoints.Checkpoint], str] | None = None,
    ) -> Deployment:
        """Resolve weights, export stale ONNX models, and stage the repositories.

        ``checkpoint=None`` serves each model with the checkpoint its config names and
        the model.onnx files as built (``hf-triton build``).
        """
        workdir = (workdir or PROJECT_ROOT / ".hf_triton").resolve()
        sources = [Path(r).resolve() for r in (repositories or DEFAULT_REPOSITORIES)]
        ckpt = None
        if checkpoint is not None:
            ckpt = checkpoints.resolve(checkpoint, revision, allow_standin=allow_standin)
        staged, used = stage(sources, workdir / "repositories", ckpt, path_of, allow_standin)
        if ckpt is not None:
            # Exports go to the staged copy (via a cache), never into the source repositories.
            for repo in staged:
                for model_dir in onnx_models(repo):
                    ensure_exported(model_dir, ckpt, workdir / "exports")
        for c in used:
            log.info("Weights: %s", c.describe())
        if ckpt is not None and not used:
            used = [ckpt]
        return cls(used, staged, workdir)

    def server(self, config: ServerConfig | None = None) -> TritonServer:
        config = config or ServerConfig(model_repositories=[])
        config.model_repositories = list(self.repositories)
        # Every checkpoint is local by now: keep the server off the network.
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env |= {k: os.environ.get(k, v) for k, v in SERVER_ENV.items()}  # the user's value wins
        return TritonServer(config, self.workdir, env=env)
