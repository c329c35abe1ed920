"""Export a Hugging Face checkpoint to ONNX and validate it against PyTorch.

Replaces the tutorial's ``python -m transformers.onnx``, which no longer exists.
The graph gets explicit tensor names (``pixel_values`` or ``input_ids``/``attention_mask``
in; the task's outputs, e.g. ``last_hidden_state``, ``pooler_output``, ``logits``,
``sentence_embedding``, out) and dynamic batch (and sequence) axes. Sentence-embedding
pooling and normalisation are part of the graph. The checkpoint it came from is
recorded in the ONNX metadata so the launcher can tell a stale export from a current
one. The file is only moved into place after validation passes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_triton.errors import HfTritonError
from hf_triton.spec import ModelSpec

log = logging.getLogger(__name__)

#: The tutorial's bound for "same numbers": max absolute difference per output.
DEFAULT_ATOL = 1e-3
OPSET = 17
CHECKPOINT_KEY = "hf_triton.checkpoint"
TASK_KEY = "hf_triton.task"
#: An image-text model's tower ("image" or "text"), when the graph is one.
TOWER_KEY = "hf_triton.tower"
#: The ONNX model's config parameter naming that tower, for the launcher's export.
TOWER_PARAMETER = "tower"
#: Validation runs a batch this size, so a broken batch axis cannot pass.
VALIDATION_BATCH = 3


class ExportValidationError(HfTritonError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""

    def __init__(self, path: Path, report: ValidationReport):
        self.report = report
        lines = [
            f"{name}: max |diff| {diff:.3g} > atol {report.atol:g}"
            for name, diff in report.max_abs_diff.items()
            if diff > report.atol or not np.isfinite(diff)
        ] + [f"{name}: {problem}" for name, problem in report.problems.items()]
        super().__init__(f"ONNX model {path} does not match PyTorch:\n  " + "\n  ".join(lines))


@dataclass
class ValidationReport:
    atol: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and all(
            np.isfinite(d) and d <= self.atol for d in self.max_abs_diff.values()
        )


def _spec(
    model: ModelSpec | str | Path, task: str | None = None, tower: str | None = None
) -> ModelSpec:
    spec = model if isinstance(model, ModelSpec) else ModelSpec.resolve(model, task)
    return spec.for_tower(tower) if tower and not spec.tower else spec


def export_onnx(
    model: ModelSpec | str | Path,
    output: str | Path,
    atol: float = DEFAULT_ATOL,
    opset: int = OPSET,
    task: str | None = None,
    tower: str | None = None,
) -> ValidationReport:
    """Export ``model`` (a spec, or a local checkpoint directory) to ``output``; validate it.
    ``tower``: that tower of an image-text model (CLIP, SigLIP).

    Raises :class:`ExportValidationError` (leaving ``output`` untouched) when any
    output differs from PyTorch by more than ``atol``.
    """
    import onnx
    import torch

    spec = _spec(model, task, tower)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    names = [t.name for t in spec.outputs]
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in spec.inputs}
    if spec.modality == "image":
        axes = {n: {0: "batch_size"} for n in spec.inputs}
    for t in spec.outputs:  # per-token outputs (batch, sequence, labels) keep both variable
        per_token = spec.modality == "text" and len(t.dims) >= 2
        axes[t.name] = {0: "batch_size", 1: "sequence_length"} if per_token else {0: "batch_size"}
    example = tuple(torch.from_numpy(a) for a in spec.sample(2, 0).values())
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("Exporting %s to ONNX (opset %d)", spec.path, opset)
        # The tracer warns about Python-level shape checks in modeling code; they are
        # constant for a fixed image size and the validation below catches any that matter.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                spec.module,
                example,
                str(tmp),
                input_names=spec.inputs,
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        proto.metadata_props.add(key=CHECKPOINT_KEY, value=str(spec.path))
        proto.metadata_props.add(key=TASK_KEY, value=spec.task.name)
        if spec.tower:
            proto.metadata_props.add(key=TOWER_KEY, value=spec.tower)
        onnx.save(proto, str(tmp))
        report = validate_onnx(tmp, spec, atol=atol)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("Exported %s in %.1f s", output, time.monotonic() - start)
    return report


def validate_onnx(
    onnx_path: str | Path,
    model: ModelSpec | str | Path,
    atol: float = DEFAULT_ATOL,
    batch: int = VALIDATION_BATCH,
    task: str | None = None,
) -> ValidationReport:
    """Run ONNX Runtime and PyTorch on the same batch (another size and, for text, another
    length than the export traced); compare every output.

    Raises :class:`ExportValidationError` listing each output that differs.
    """
    import onnxruntime as ort
    import torch

    spec = _spec(model, task)
    feed = spec.sample(batch, 1)
    with torch.inference_mode():
        out = spec.module(*(torch.from_numpy(a) for a in feed.values()))
    expected = {t.name: o.numpy() for t, o in zip(spec.outputs, out, strict=True)}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got_names = [o.name for o in session.get_outputs()]
    report = ValidationReport(atol=atol)
    for name in expected:
        if name not in got_names:
            report.problems[name] = f"missing from the ONNX outputs {got_names}"
    results = dict(zip(got_names, session.run(None, feed), strict=True))
    for name, ref in expected.items():
        if name not in results:
            continue
        got = results[name]
        if got.shape != ref.shape:
            report.problems[name] = f"shape {got.shape}, PyTorch gives {ref.shape}"
            continue
        report.max_abs_diff[name] = float(np.max(np.abs(got - ref)))
        log.info("%s: max |onnx - torch| = %.3g (atol %g)", name, report.max_abs_diff[name], atol)
    if not report.ok:
        raise ExportValidationError(Path(onnx_path), report)
    return report


def exported_checkpoint(onnx_path: str | Path, tower: str | None = None) -> str | None:
    """The checkpoint recorded in an ONNX file by :func:`export_onnx`, if any (and if the file
    is that ``tower`` of it, when one is named)."""
    import onnx

    path = Path(onnx_path)
    if not path.exists():
        return None
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if meta.get(TOWER_KEY) != tower:
        return None
    return meta.get(CHECKPOINT_KEY)
