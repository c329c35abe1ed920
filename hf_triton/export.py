"""Export a Hugging Face vision checkpoint to ONNX and validate it against PyTorch.

Replaces the tutorial's ``python -m transformers.onnx``, which no longer exists.
The graph gets explicit tensor names (``pixel_values`` in; ``last_hidden_state``,
``pooler_output`` out) and a dynamic batch axis; the checkpoint it came from is
recorded in the ONNX metadata so the launcher can tell a stale export from a
current one. The file is only moved into place after validation passes.
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

log = logging.getLogger(__name__)

#: The tutorial's bound for "same numbers": max absolute difference per output.
DEFAULT_ATOL = 1e-3
OPSET = 17
CHECKPOINT_KEY = "hf_triton.checkpoint"
INPUT_NAME = "pixel_values"
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


def _load(checkpoint: str | Path):
    from transformers import AutoModel  # noqa: PLC0415

    # Eager attention traces into plain ops that every ONNX runtime supports.
    model = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager")
    return model.eval()


def _output_names(model) -> list[str]:
    names = ["last_hidden_state"]
    if getattr(model, "pooler", None) is not None:
        names.append("pooler_output")
    return names


def _sample_input(model, batch: int, seed: int = 0) -> np.ndarray:
    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, cfg.num_channels, size, size)).astype(np.float32)


def export_onnx(
    checkpoint: str | Path,
    output: str | Path,
    atol: float = DEFAULT_ATOL,
    opset: int = OPSET,
) -> ValidationReport:
    """Export ``checkpoint`` (hub id or local directory) to ``output`` and validate it.

    Raises :class:`ExportValidationError` (leaving ``output`` untouched) when any
    output differs from PyTorch by more than ``atol``.
    """
    import onnx  # noqa: PLC0415
    import torch  # noqa: PLC0415

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    model = _load(checkpoint)
    names = _output_names(model)
    example = torch.from_numpy(_sample_input(model, 1))
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("Exporting %s to ONNX (opset %d)", checkpoint, opset)
        # The tracer warns about Python-level shape checks in modeling code; they are
        # constant for a fixed image size and the validation below catches any that matter.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                _traceable(model, names),
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={n: {0: "batch_size"} for n in [INPUT_NAME, *names]},
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        proto.metadata_props.add(key=CHECKPOINT_KEY, value=str(checkpoint))
        onnx.save(proto, str(tmp))
        report = validate_onnx(tmp, checkpoint, atol=atol, model=model)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("Exported %s in %.1f s", output, time.monotonic() - start)
    return report


def _traceable(model, names: list[str]):
    """The model as a module returning a tuple of the named outputs, in order."""
    import torch  # noqa: PLC0415

    class NamedOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return tuple(getattr(out, n) for n in names)

    return NamedOutputs().eval()


def validate_onnx(
    onnx_path: str | Path,
    checkpoint: str | Path,
    atol: float = DEFAULT_ATOL,
    model=None,
    batch: int = VALIDATION_BATCH,
) -> ValidationReport:
    """Run ONNX Runtime and PyTorch on the same batch; compare every output.

    Raises :class:`ExportValidationError` listing each output that differs.
    """
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    model = model if model is not None else _load(checkpoint)
    pixels = _sample_input(model, batch, seed=1)
    with torch.inference_mode():
        out = model(pixel_values=torch.from_numpy(pixels))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got_names = [o.name for o in session.get_outputs()]
    report = ValidationReport(atol=atol)
    expected = {n: getattr(out, n).numpy() for n in _output_names(model)}
    for name in expected:
        if name not in got_names:
            report.problems[name] = f"missing from the ONNX outputs {got_names}"
    results = dict(zip(got_names, session.run(None, {INPUT_NAME: pixels}), strict=True))
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


def exported_checkpoint(onnx_path: str | Path) -> str | None:
    """The checkpoint recorded in an ONNX file by :func:`export_onnx`, if any."""
    import onnx  # noqa: PLC0415

    path = Path(onnx_path)
    if not path.exists():
        return None
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta.get(CHECKPOINT_KEY)
