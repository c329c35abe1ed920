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

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_triton import tasks
from hf_triton.errors import HfTritonError

log = logging.getLogger(__name__)

#: The tutorial's bound for "same numbers": max absolute difference per output.
DEFAULT_ATOL = 1e-3
OPSET = 17
CHECKPOINT_KEY = "hf_triton.checkpoint"
TASK_KEY = "hf_triton.task"
#: Validation runs a batch this size, so a broken batch axis cannot pass.
VALIDATION_BATCH = 3
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


# -- sentence-transformers pooling ---------------------------------------------------------


@dataclass(frozen=True)
class Pooling:
    """How token embeddings become one sentence embedding (sentence-transformers' config)."""

    mode: str = "mean"  # mean | cls | max
    normalize: bool = False

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Pooling:
        path = Path(path)
        mode, normalize = "mean", False
        pooling = path / "1_Pooling" / "config.json"
        if pooling.exists():
            cfg = json.loads(pooling.read_text())
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                mode = "max"
        modules = path / "modules.json"
        if modules.exists():
            normalize = any(
                m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text())
            )
        return cls(mode, normalize)

    def __call__(self, hidden, attention_mask):
        import torch  # noqa: PLC0415

        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


# -- per-task export spec --------------------------------------------------------------------


def read_config(checkpoint: str | Path) -> dict[str, Any]:
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.from_pretrained(str(checkpoint)).to_dict()


@dataclass
class ExportSpec:
    """A traceable module with named inputs/outputs, and sample inputs for it."""

    module: Any  # torch.nn.Module returning a tuple in ``output_names`` order
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    sample: Any  # (batch, seed) -> dict[str, np.ndarray]
    task: str = ""


def build_spec(checkpoint: str | Path, task_name: str | None = None) -> ExportSpec:
    """Load ``checkpoint`` for its task and wrap it for export."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    config = read_config(checkpoint)
    task = tasks.get_task(task_name or tasks.infer_task(config))
    auto = getattr(transformers, task.auto_class)
    # Eager attention traces into plain ops that every ONNX runtime supports.
    model = auto.from_pretrained(str(checkpoint), attn_implementation="eager").eval()

    if task.modality == "image":
        names = [t.name for t in task.outputs]
        if "pooler_output" in names and getattr(model, "pooler", None) is None:
            names.remove("pooler_output")
        size = config.get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = config.get("num_channels", 3)

        class ImageModule(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                out = self.model(pixel_values=pixel_values)
                return tuple(getattr(out, n) for n in names)

        def image_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(seed)
            return {
                "pixel_values": rng.standard_normal((batch, channels, size, size)).astype(
                    np.float32
                )
            }

        return ExportSpec(
            ImageModule().eval(),
            ["pixel_values"],
            names,
            {n: {0: "batch_size"} for n in ["pixel_values", *names]},
            image_sample,
            task.name,
        )

    import inspect  # noqa: PLC0415

    accepted = inspect.signature(model.forward).parameters
    inputs = [n for n in TEXT_INPUTS if n in accepted]
    pooling = (
        Pooling.from_checkpoint(checkpoint) if task.name == "text-feature-extraction" else None
    )
    out_name = task.outputs[0].name
    vocab = int(config.get("vocab_size", 100))

    class TextModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            kwargs = dict(zip(inputs, args, strict=True))
            out = self.model(**kwargs)
            if pooling is not None:
                return (pooling(out.last_hidden_state, kwargs["attention_mask"]),)
            return (out.logits,)

    def text_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        length = 12
        ids = rng.integers(5, min(vocab, 1000), (batch, length)).astype(np.int64)
        mask = np.ones((batch, length), np.int64)
        mask[0, length // 2 :] = 0  # padding must be handled by the graph, not ignored
        sample = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros((batch, length), np.int64),
        }
        return {k: sample[k] for k in inputs}

    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in inputs}
    axes[out_name] = {0: "batch_size"}
    return ExportSpec(TextModule().eval(), inputs, [out_name], axes, text_sample, task.name)


def export_onnx(
    checkpoint: str | Path,
    output: str | Path,
    atol: float = DEFAULT_ATOL,
    opset: int = OPSET,
    task: str | None = None,
) -> ValidationReport:
    """Export ``checkpoint`` (a local directory) to ``output`` and validate it.

    Raises :class:`ExportValidationError` (leaving ``output`` untouched) when any
    output differs from PyTorch by more than ``atol``.
    """
    import onnx  # noqa: PLC0415
    import torch  # noqa: PLC0415

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    spec = build_spec(checkpoint, task)
    example = tuple(torch.from_numpy(a) for a in spec.sample(2, 0).values())
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
                spec.module,
                example,
                str(tmp),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        proto.metadata_props.add(key=CHECKPOINT_KEY, value=str(checkpoint))
        proto.metadata_props.add(key=TASK_KEY, value=spec.task)
        onnx.save(proto, str(tmp))
        report = validate_onnx(tmp, checkpoint, atol=atol, spec=spec)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("Exported %s in %.1f s", output, time.monotonic() - start)
    return report


def validate_onnx(
    onnx_path: str | Path,
    checkpoint: str | Path,
    atol: float = DEFAULT_ATOL,
    spec: ExportSpec | None = None,
    batch: int = VALIDATION_BATCH,
    task: str | None = None,
) -> ValidationReport:
    """Run ONNX Runtime and PyTorch on the same batch; compare every output.

    Raises :class:`ExportValidationError` listing each output that differs.
    """
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    spec = spec if spec is not None else build_spec(checkpoint, task)
    feed = spec.sample(batch, 1)
    with torch.inference_mode():
        out = spec.module(*(torch.from_numpy(a) for a in feed.values()))
    expected = {n: t.numpy() for n, t in zip(spec.output_names, out, strict=True)}
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


def exported_checkpoint(onnx_path: str | Path) -> str | None:
    """The checkpoint recorded in an ONNX file by :func:`export_onnx`, if any."""
    import onnx  # noqa: PLC0415

    path = Path(onnx_path)
    if not path.exists():
        return None
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta.get(CHECKPOINT_KEY)
