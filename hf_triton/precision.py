"""Reduced-precision variants and the accuracy gate that admits them.

Precisions:

* ``fp32`` — the reference;
* ``bf16`` — PyTorch with the weights in bfloat16 (Python backend). Fast on CPUs with
  AVX512-BF16/AMX; emulated (slow) elsewhere, which the benchmark shows;
* ``int8`` — dynamic quantisation of the Linear/MatMul weights: ONNX Runtime's
  ``quantize_dynamic`` for the exported model, after a calibrated migration of activation
  outliers into the weights (SmoothQuant) so that every MatMul can be int8;
  ``torch.ao.quantization.quantize_dynamic`` for the Python backend, with the GELU-fed
  projections kept fp32;
* ``fp16`` — GPUs only (Python backend on a KIND_GPU instance).

Every variant is compared with fp32 on a fixed evaluation set before it is accepted
(:func:`gate`): cosine similarity per example, and top-1 agreement for classifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_triton.errors import HfTritonError
from hf_triton.spec import ModelSpec
from hf_triton.templates import hf_common

log = logging.getLogger(__name__)

PRECISIONS = hf_common.PRECISIONS
#: Where each precision can run: the python approach, the ensemble's ONNX model.
PYTHON_PRECISIONS = hf_common.PRECISIONS
ONNX_PRECISIONS = ("fp32", "int8")
PRECISION_KEY = "hf_triton.precision"

#: The gate: a variant is refused when any example falls below these.
MIN_COSINE = 0.99
MIN_TOP1_AGREEMENT = 0.95
#: Object detection: the share of detections (score above DETECTION_THRESHOLD, after the image
#: processor's own post-processing) that must be found again by the variant: same label, box
#: IoU >= MIN_BOX_IOU. Extra detections count against it. Queries are matched by what they
#: detect, not by position: a detector's query selection may reorder them.
MIN_DETECTION_AGREEMENT = 0.95
MIN_BOX_IOU = 0.9
DETECTION_THRESHOLD = 0.5


class GateFailed(HfTritonError):
    """A reduced-precision variant is too far from fp32."""


def check_precision(precision: str, approach: str) -> None:
    allowed = ONNX_PRECISIONS if approach == "ensemble" else PYTHON_PRECISIONS
    if precision not in allowed:
        raise HfTritonError(
            f"precision {precision!r} is not offered for the {approach} approach; choose one of "
            f"{', '.join(allowed)} (bf16 runs in the Python backend: ONNX Runtime's CPU kernels "
            "have no fast bf16 path; fp16 needs a GPU)"
        )


def apply_torch(model: Any, precision: str) -> Any:
    """The model converted to ``precision`` on the CPU, exactly as model.py converts it."""
    import torch

    if precision == "fp16":  # GPU-only when served; the gate can still measure it on the CPU
        return model.to(torch.float16)
    return hf_common.apply_precision(model, precision, torch.device("cpu"))[0]


def _gelu_fed_matmuls(graph: Any, hops: int = 4) -> list[str]:
    """MatMul nodes whose input comes from a GELU (Erf/Gelu within a few producer hops)."""
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        frontier = [node.input[0]]
        for _ in range(hops):
            parents = [producer[t] for t in frontier if t in producer]
            if any(p.op_type in ("Erf", "Gelu", "FastGelu", "BiasGelu") for p in parents):
                found.append(node.name)
                break
            frontier = [i for p in parents for i in p.input]
    return found


#: Migration strengths tried for the calibrated smoothing (SmoothQuant's alpha).
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Int8Recipe:
    """How an int8 model.onnx was made (recorded in its metadata, shown by the build)."""

    kind: str  # "smoothed" (every MatMul int8) or "gelu-fp32" (no calibration data)
    alpha: float | None = None
    calibration_min_cosine: float | None = None
    kept_fp32: int = 0

    def describe(self) -> str:
        if self.kind == "smoothed":
            return (
                f"every MatMul int8, activation outliers migrated into the weights (alpha "
                f"{self.alpha:g}, calibration min cosine {self.calibration_min_cosine:.4f})"
            )
        return f"{self.kept_fp32} GELU-fed projections kept fp32 (no calibration data)"


def _weight_matmuls(graph: Any) -> list[Any]:
    inits = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _activation_ranges(
    model: Any, nodes: list[Any], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per input channel, the largest |activation| entering each of ``nodes`` on ``feeds``."""
    import copy

    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    names = sorted({n.input[0] for n in nodes})
    for name in names:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = dict(zip(outputs, session.run(None, feed), strict=True))
        for name in names:
            v = np.abs(values[name]).reshape(-1, values[name].shape[-1]).max(axis=0)
            ranges[name] = np.maximum(ranges.get(name, v), v)
    return ranges


def _smoothed(model: Any, ranges: dict[str, np.ndarray], alpha: float) -> Any:
    """SmoothQuant's migration: for each weight MatMul x @ W, x / s and diag(s) @ W, with
    s = max|x|^alpha / max|W|^(1 - alpha) per input channel. The same function; an activation
    without outlier channels, which per-tensor int8 then represents well."""
    import copy

    from onnx import helper, numpy_helper

    smoothed = copy.deepcopy(model)
    graph = smoothed.graph
    weights = {i.name: i for i in graph.initializer}
    for node in _weight_matmuls(graph):
        x_max = np.maximum(ranges[node.input[0]], 1e-5)
        w = numpy_helper.to_array(weights[node.input[1]])
        scale = (x_max**alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)).astype(
            np.float32
        )
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array((w * scale[:, None]).astype(np.float32), node.input[1])
        )
        inverse = f"{node.name}/smooth_inverse_scale"
        moved = f"{node.input[0]}/smoothed_for_{node.name}"
        graph.initializer.append(numpy_helper.from_array(1.0 / scale, inverse))
        index = list(graph.node).index(node)
        graph.node.insert(
            index, helper.make_node("Mul", [node.input[0], inverse], [moved], f"{node.name}/smooth")
        )
        node.input[0] = moved
    return smoothed


def _quantize(src: Path, dst: Path, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=exclude
    )


def quantize_onnx(
    src: Path, dst: Path, calibration: list[dict[str, np.ndarray]] | None = None
) -> Int8Recipe:
    """int8 dynamic quantisation of ``src`` into ``dst``: per-channel int8 weights, activations
    quantised per batch.

    With ``calibration`` feeds (model inputs), activation outliers are first migrated into the
    weights (calibrated smoothing, the strength that keeps the calibration outputs closest to
    fp32), so every MatMul runs in int8. Without, the GELU-fed projections — the layers whose
    inputs carry the outliers — stay fp32, which costs speed.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    source_meta = {p.key: p.value for p in model.metadata_props}
    if calibration:
        reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        want = [_rows(reference.run(None, feed)[0], feed) for feed in calibration]
        ranges = _activation_ranges(model, _weight_matmuls(model.graph), calibration)
        tmp = dst.with_name(dst.name + ".smoothed.tmp.onnx")
        best: tuple[float, float] | None = None
        try:
            for alpha in SMOOTHING_ALPHAS:
                onnx.save(_smoothed(model, ranges, alpha), str(tmp))
                _quantize(tmp, dst, [])
                session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
                got = [_rows(session.run(None, feed)[0], feed) for feed in calibration]
                cosine = compare(
                    "int8", np.concatenate(want), np.concatenate(got), False
                ).min_cosine
                log.info("int8 calibration: alpha %g -> min cosine %.4f", alpha, cosine)
                if best is None or cosine > best[1]:
                    best = (alpha, cosine)
            assert best is not None
            onnx.save(_smoothed(model, ranges, best[0]), str(tmp))
            _quantize(tmp, dst, [])
        finally:
            tmp.unlink(missing_ok=True)
        recipe = Int8Recipe("smoothed", best[0], best[1])
    else:
        keep = _gelu_fed_matmuls(model.graph)
        _quantize(src, dst, keep)
        recipe = Int8Recipe("gelu-fp32", kept_fp32=len(keep))
    proto = onnx.load(str(dst))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in source_meta.items():  # keep the export record (checkpoint, task)
        if key not in meta:
            proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=PRECISION_KEY, value="int8")
    proto.metadata_props.add(key="hf_triton.int8_recipe", value=recipe.describe())
    onnx.save(proto, str(dst))
    return recipe


def _rows(out: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Per-token outputs (batch, tokens, labels) as one row per real token, so batches of
    different lengths compare; anything else as it is."""
    mask = feed.get("attention_mask")
    if mask is not None and out.ndim == 3 and out.shape[:2] == mask.shape:
        return out[mask.astype(bool)]
    return out


@dataclass
class GateReport:
    precision: str
    examples: int
    min_cosine: float
    mean_cosine: float
    top1_agreement: float | None = None
    unit: str = "examples"  # or "tokens" (one row per real token), "images" (detections)
    #: Object detection: matched / (reference + extra) detections; cosine is then over each
    #: image's scores, highest first.
    detection_agreement: float | None = None
    detections: int = 0

    @property
    def passed(self) -> bool:
        ok = self.min_cosine >= MIN_COSINE
        if self.top1_agreement is not None:
            ok = ok and self.top1_agreement >= MIN_TOP1_AGREEMENT
        if self.detection_agreement is not None:
            ok = ok and self.detection_agreement >= MIN_DETECTION_AGREEMENT
        return ok

    def summary(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.3f}"
        box = (
            ""
            if self.detection_agreement is None
            else f", {self.detection_agreement:.3f} of {self.detections} detections found again"
        )
        verdict = "PASSED" if self.passed else "REFUSED"
        return (
            f"{self.precision} vs fp32 on {self.examples} {self.unit}: cosine min "
            f"{self.min_cosine:.5f}, mean {self.mean_cosine:.5f}{top1}{box} -> {verdict} "
            f"(gate: cosine >= {MIN_COSINE}"
            + (f", top-1 >= {MIN_TOP1_AGREEMENT}" if self.top1_agreement is not None else "")
            + (
                f", detections >= {MIN_DETECTION_AGREEMENT} (same label, IoU >= {MIN_BOX_IOU})"
                if self.detection_agreement is not None
                else ""
            )
            + ")"
        )


def compare(
    precision: str,
    reference: np.ndarray,
    variant: np.ndarray,
    classifier: bool,
) -> GateReport:
    """Per-example cosine (and top-1 agreement) of ``variant`` against ``reference``."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    var = variant.reshape(len(variant), -1).astype(np.float64)
    cosine = (ref * var).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(var, axis=1), 1e-12
    )
    cosine = np.where(np.isfinite(cosine), cosine, -1.0)
    top1 = float(np.mean(ref.argmax(1) == var.argmax(1))) if classifier else None
    return GateReport(precision, len(ref), float(cosine.min()), float(cosine.mean()), top1)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes in 0..1 coordinates; 1 for boxes
    whose corners are all within 0.01 of each other (IoU says nothing about a box as thin as
    a line, which an untrained detector predicts)."""
    if float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 0.01:
        return 1.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def compare_detections(
    precision: str, reference: list[list[tuple]], variant: list[list[tuple]]
) -> GateReport:
    """Per image, (label, score, box) detections of ``variant`` against ``reference``: each
    reference detection is found again when the variant has one of the same label with box
    IoU >= MIN_BOX_IOU (each used once); unmatched variant detections count as misses too."""
    matched = total = 0
    cosines = []
    for ref, var in zip(reference, variant, strict=True):
        used: set[int] = set()
        for label, _, box in ref:
            candidates = [
                (_overlap(box, other[2]), j)
                for j, other in enumerate(var)
                if j not in used and other[0] == label
            ]
            best = max(candidates, default=(0.0, -1))
            if best[0] >= MIN_BOX_IOU:
                matched += 1
                used.add(best[1])
        total += len(ref) + len(var) - len(used)
        a = np.sort([d[1] for d in ref])[::-1]
        b = np.sort([d[1] for d in var])[::-1]
        n = max(len(a), len(b), 1)
        a, b = np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosines.append(float(a @ b / norms) if norms > 0 else float(np.allclose(a, b)))
    report = GateReport(precision, len(reference), min(cosines), float(np.mean(cosines)))
    report.unit = "images"
    report.detection_agreement = matched / total if total else 1.0
    report.detections = sum(len(r) for r in reference)
    return report


def gate(
    precision: str,
    run_reference: Callable[[list[Any]], np.ndarray],
    run_variant: Callable[[list[Any]], np.ndarray],
    examples: list[Any],
    classifier: bool,
    batch: int = 8,
    unit: str = "examples",
) -> GateReport:
    """Run both on ``examples`` in batches; raise :class:`GateFailed` below the thresholds."""
    refs, vars_ = [], []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        refs.append(run_reference(chunk))
        vars_.append(run_variant(chunk))
    if unit == "images":  # object detection: lists of detections per image
        report = compare_detections(
            precision, [d for r in refs for d in r], [d for v in vars_ for d in v]
        )
    else:
        report = compare(precision, np.concatenate(refs), np.concatenate(vars_), classifier)
    report.unit = unit
    log.info("%s", report.summary())
    if not report.passed:
        raise GateFailed(report.summary())
    return report


# -- gating a spec's variants ------------------------------------------------------------


def eval_examples(spec: ModelSpec) -> list[Any]:
    """The fixed evaluation set for the spec's modality."""
    return eval_images() if spec.modality == "image" else eval_sentences()


def calibration_feeds(spec: ModelSpec, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Model inputs for calibrating int8, disjoint from the gate's evaluation set (other
    sentences; other synthetic images)."""
    examples: list[Any] = (
        eval_images(count=8 + 16, seed=1)[8:]  # synthetic only: the photos are gated
        if spec.modality == "image"
        else eval_sentences(count=400)[300:]
    )
    return [spec.encode(examples[i : i + batch]) for i in range(0, len(examples), batch)]


def _per_example(spec: ModelSpec, chunk: list[Any], outs: list[np.ndarray]) -> Any:
    """What the gate compares: one row per example (the first output); one per real token for
    token classification (each token's label must agree, not only the sentence's logits);
    for object detection, each image's detections after the processor's own post-processing
    (label, score, box in 0..1 coordinates)."""
    if not spec.postprocessed:
        return outs[0]
    if spec.modality == "image":
        found = hf_common.post_process_detections(
            spec.preprocessor, outs[0], outs[1], DETECTION_THRESHOLD
        )
        return [
            [
                (int(label), float(score), box.numpy())
                for score, label, box in zip(f["scores"], f["labels"], f["boxes"], strict=True)
            ]
            for f in found
        ]
    mask = spec.encode(chunk)["attention_mask"].astype(bool)
    return outs[0][mask]


def _classifier(spec: ModelSpec) -> bool:
    return bool(spec.labels) or spec.postprocessed


def _unit(spec: ModelSpec) -> dict[str, Any]:
    """What :func:`_per_example` gives: examples, tokens or images (lists of detections)."""
    if not spec.postprocessed:
        return {"unit": "examples"}
    return {"unit": "images" if spec.modality == "image" else "tokens"}


Runner = Callable[[list[Any]], list[np.ndarray]]


def compile_torch(module: Any, warm_up: Callable[[Any, int], Any]) -> Any:
    """``module`` compiled as model.py compiles it (:func:`hf_common.compile_model`)."""
    try:
        # No recompile log here: the next module compiled in this process (the benchmark's
        # bare run after the gate's) would be logged as a recompile of the same forward.
        compiled, seconds = hf_common.compile_model(module, warm_up, log_recompiles=False)
    except hf_common.ModelError as e:
        raise HfTritonError(str(e)) from e
    log.info("torch.compile: %.1f s (batches of 1 and 2)", seconds)
    return compiled


def _torch_runners(
    spec: ModelSpec, precision: str, compiled: bool = False
) -> tuple[Runner, Runner]:
    """fp32 PyTorch and the Python backend's variant (model.py's own conversion, and its
    torch.compile when ``compiled``): each runs a chunk of examples, encoded as the server
    encodes them, to the module's outputs."""
    import copy

    import torch

    variant = apply_torch(copy.deepcopy(spec.module), precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # fp16 is served on GPUs: gated there when this machine has one (a CPU without fp16
    # arithmetic emulates it, minutes for a ViT-base), on the CPU otherwise.
    cuda = precision == "fp16" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    variant = variant.to(device)

    def tensors(chunk: list[Any], float_dtype: Any, on: Any) -> list[Any]:
        out = [torch.from_numpy(a).to(on) for a in spec.encode(chunk).values()]
        return [t.to(float_dtype) if t.is_floating_point() else t for t in out]

    if compiled:
        examples = eval_examples(spec)
        variant = compile_torch(
            variant, lambda module, batch: module(*tensors(examples[:batch], dtype, device))
        )

    def run(module: Any, float_dtype: Any, on: Any) -> Runner:
        def outputs(chunk: list[Any]) -> list[np.ndarray]:
            with torch.inference_mode():
                return [o.float().cpu().numpy() for o in module(*tensors(chunk, float_dtype, on))]

        return outputs

    return run(spec.module, torch.float32, torch.device("cpu")), run(variant, dtype, device)


def onnx_runners(spec: ModelSpec, fp32: Path, variant: Path) -> tuple[Runner, Runner]:
    """The fp32 export and a quantised model.onnx, both in ONNX Runtime."""
    import onnxruntime as ort

    def run(path: Path) -> Runner:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda chunk: session.run(names, spec.encode(chunk))

    return run(fp32), run(variant)


def _gate_spec(spec: ModelSpec, precision: str, runners: tuple[Runner, Runner]) -> GateReport:
    reference, variant = runners
    return gate(
        precision,
        lambda chunk: _per_example(spec, chunk, reference(chunk)),
        lambda chunk: _per_example(spec, chunk, variant(chunk)),
        eval_examples(spec),
        classifier=_classifier(spec),
        **_unit(spec),
    )


def gate_python(spec: ModelSpec, precision: str, compiled: bool = False) -> GateReport:
    """The Python backend's variant (model.py's own conversion; compiled as model.py compiles
    it when ``compiled``) against fp32 PyTorch, eager."""
    label = f"{precision}+torch.compile" if compiled else precision
    return _gate_spec(spec, label, _torch_runners(spec, precision, compiled))


def gate_onnx(spec: ModelSpec, precision: str, fp32: Path, variant: Path) -> GateReport:
    """A quantised model.onnx against the fp32 export, both in ONNX Runtime."""
    return _gate_spec(spec, precision, onnx_runners(spec, fp32, variant))


#: Zero-shot gate: the labels every evaluation image is ranked over (everyday classes).
GATE_LABELS = (
    "a cat",
    "a dog",
    "a bird",
    "a car",
    "a bicycle",
    "a house",
    "a tree",
    "a flower",
    "a person",
    "a boat",
    "a plate of food",
    "a mountain",
    "a city street",
    "a beach",
    "a computer",
    "a book",
)


def _embed(run: Runner, examples: list[Any], batch: int = 8) -> np.ndarray:
    return np.concatenate([run(examples[i : i + batch])[0] for i in range(0, len(examples), batch)])


def gate_image_text(
    spec: ModelSpec, precision: str, runners: dict[str, tuple[Runner, Runner]]
) -> list[GateReport]:
    """An image-text model's variant (both towers, ``runners[side]`` = (fp32, variant)):
    each tower's embeddings by cosine per example, then what clients get, zero-shot: every
    evaluation image ranked over :data:`GATE_LABELS` in the default template, the variant's
    top label agreeing with fp32's (top-1 >= 0.95) and each image's score vector by cosine."""
    embeds: dict[tuple[str, int], np.ndarray] = {}
    reports = []
    for side, pair in runners.items():
        ref, var = (_embed(run, eval_examples(spec.for_tower(side))) for run in pair)
        report = compare(f"{precision} {side} tower", ref, var, classifier=False)
        log.info("%s", report.summary())
        if not report.passed:
            raise GateFailed(report.summary())
        reports.append(report)
        if side == "text":  # the ranking embeds the labels' hypotheses
            texts = [hf_common.HYPOTHESIS_TEMPLATE.format(label) for label in GATE_LABELS]
            ref, var = (_embed(run, texts) for run in pair)
        embeds[(side, 0)], embeds[(side, 1)] = ref, var
    scoring, scale, bias = spec.zero_shot_scoring
    scores = [
        hf_common.zero_shot_scores(
            scale * embeds[("image", which)] @ embeds[("text", which)].T + bias, scoring
        )
        for which in (0, 1)
    ]
    report = compare(f"{precision} zero-shot", scores[0], scores[1], classifier=True)
    report.unit = f"images x {len(GATE_LABELS)} labels"
    log.info("%s", report.summary())
    if not report.passed:
        raise GateFailed(report.summary())
    return [*reports, report]


def gate_image_text_python(
    spec: ModelSpec, precision: str, compiled: bool = False
) -> list[GateReport]:
    """Both Python-backend towers in ``precision`` (compiled when ``compiled``) against fp32
    PyTorch (see :func:`gate_image_text`)."""
    return gate_image_text(
        spec,
        f"{precision}+torch.compile" if compiled else precision,
        {
            side: _torch_runners(spec.for_tower(side), precision, compiled)
            for side in hf_common.EMBEDDINGS
        },
    )


# -- the fixed evaluation sets ------------------------------------------------------------


def eval_images(count: int = 24, seed: int = 0) -> list[np.ndarray]:
    """Real photos (matplotlib's samples), their crops and flips, then synthetic images."""
    import matplotlib
    from PIL import Image

    data = Path(matplotlib.get_data_path(), "sample_data")
    photos = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with Image.open(data / name) as img:
            photos.append(np.asarray(img.convert("RGB")))
    images = []
    for p in photos:
        h, w = p.shape[:2]
        images += [p, p[:, ::-1], p[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4], p[::2, ::2]]
    rng = np.random.default_rng(seed)
    while len(images) < count:
        kind = len(images) % 3
        h, w = int(rng.integers(64, 400)), int(rng.integers(64, 400))
        if kind == 0:  # smooth gradient, like sky or a wall
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x / w, y / h, (x + y) / (h + w)], -1) * 255
            images.append(base.astype(np.uint8))
        elif kind == 1:  # blocks, like man-made scenes
            blocks = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            images.append(np.kron(blocks, np.ones((16, 16, 1), np.uint8))[:h, :w])
        else:
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return images[:count]


_SUBJECTS = [
    "A man",
    "A woman",
    "The child",
    "My neighbour",
    "The old dog",
    "A young cat",
    "The team",
    "Our teacher",
    "A tourist",
    "The chef",
]
_VERBS = [
    "is eating",
    "is cooking",
    "is reading",
    "is painting",
    "is playing with",
    "is looking at",
    "is carrying",
    "bought",
    "sold",
    "found",
]
_OBJECTS = [
    "a piece of bread.",
    "a red ball.",
    "the newspaper.",
    "an old guitar.",
    "a bowl of soup.",
    "the blue car.",
    "a small boat.",
    "the stock report.",
    "a bunch of flowers.",
    "a broken phone.",
]


def eval_sentences(count: int = 300) -> list[str]:
    """A few hundred deterministic English sentences (subject x verb x object)."""
    out = []
    for i in range(count):
        s = _SUBJECTS[i % 10]
        v = _VERBS[(i // 10) % 10]
        o = _OBJECTS[(i // 100 + i) % 10]
        out.append(f"{s} {v} {o}")
    return out
