"""Build ready-to-serve Triton repositories for a Hugging Face checkpoint, both approaches.

    build(ModelSpec.resolve(checkpoint_dir), out, approach="both", options=BuildOptions(...))

writes

    out/python_model_repository/python_<name>/{config.pbtxt, 1/model.py[, labels.txt]}
    out/ensemble_model_repository/preprocessing/{config.pbtxt, 1/model.py}
    out/ensemble_model_repository/<name>/{config.pbtxt, 1/model.onnx[, labels.txt]}
    out/ensemble_model_repository/ensemble_model/{config.pbtxt, 1/, [labels.txt]}
    out/ensemble_model_repository/postprocessing/{config.pbtxt, 1/model.py}  (token tasks)

from one table per task (:mod:`hf_triton.tasks`) and one generic model.py per modality
(``templates/vision_model.py``, ``templates/text_model.py``). The tutorial's repositories
at the top of this project are exactly this command's output for the ViT checkpoint.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hf_triton import export, precision, tasks
from hf_triton.spec import ModelSpec
from hf_triton.tasks import IMAGE_INPUTS, IMAGE_SIZES, TEXT_INPUTS, TOKEN_OFFSETS, Task, Tensor
from hf_triton.templates import hf_common
from hf_triton.templates.hf_common import AGGREGATION_STRATEGIES

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
MODEL_PY = {"image": TEMPLATES / "vision_model.py", "text": TEMPLATES / "text_model.py"}
#: Zero-shot image classification: calls an image-text model's two towers (BLS).
ZERO_SHOT_PY = TEMPLATES / "zero_shot_model.py"
#: Copied beside every model.py: the code and tables the two templates share.
COMMON_PY = TEMPLATES / "hf_common.py"
APPROACHES = ("python", "ensemble", "both")
LABELS = "labels.txt"
#: ONNX Runtime's session option (its own key): "0", its threads sleep while they wait for work.
ONNX_NO_SPINNING = "session.intra_op.allow_spinning"
#: ONNX Runtime's session option: "1", its threads spin within a run and stop when it ends.
ONNX_SPIN_STOP = "session.force_spinning_stop"
#: The Python-based backend's own parameter: "auto" chooses one of the two above when it loads.
ONNX_SPINNING = "intra_op_spinning"
#: What ONNX Runtime's threads do while they wait for work (``--onnx-spin``).
ONNX_SPIN_MODES = ("auto", "never", "within-run")


def onnx_spin_parameter(mode: str) -> tuple[str, str, str]:
    """The ONNX step's spinning setting as (parameter key, value, comment): ``auto`` (the
    default) lets the Python-based backend choose on the machine that serves it; ``never``
    and ``within-run`` are ONNX Runtime's own session options."""
    if mode == "auto":
        return (
            ONNX_SPINNING,
            "auto",
            "Read by the Python-based backend when it loads: ONNX Runtime's threads\n"
            "spin between the operators of a run (and sleep once it ends) on a CPU\n"
            "with AMX, where every model measured served faster so; elsewhere they\n"
            'sleep while they wait for work (README, "Throughput"). Set never or\n'
            "within_run to choose yourself.",
        )
    if mode == "within-run":
        return (
            ONNX_SPIN_STOP,
            "1",
            "ONNX Runtime's own session option, read by the Python-based backend:\n"
            "its threads spin between the operators of a run and sleep once it ends\n"
            '(left spinning after it, they stalled requests by ~0.5 s; README,\n"Throughput").',
        )
    if mode == "never":
        return (
            ONNX_NO_SPINNING,
            "0",
            "ONNX Runtime's own session option, read by the Python-based backend: its\n"
            "threads sleep while they wait for work. Left spinning, they stalled\n"
            'requests by ~0.5 s on a 2-core CPU (README, "Throughput").',
        )
    raise ValueError(f"onnx spin must be one of {', '.join(ONNX_SPIN_MODES)}, not {mode!r}")


@dataclass
class BuildOptions:
    name: str = "vit"
    max_batch_size: int = 8
    #: 0: a batch is what queued while the previous one ran, nothing waits for more. On a CPU,
    #: where compute grows with the batch, waiting only adds latency (2 ms per step at c=1).
    max_queue_delay_us: int = 0
    #: With a delay, a batch of this size goes at once instead of waiting for
    #: max_batch_size or the delay (0: none). Useful when clients keep a known number of
    #: requests in flight, fewer than max_batch_size.
    preferred_batch_size: int = 0
    #: Requests that may wait per model (default: two batches' worth); 0 = unbounded.
    max_queue_size: int | None = None
    queue_timeout_ms: int = 10_000
    preprocessing_name: str = "preprocessing"
    postprocessing_name: str = "postprocessing"
    ensemble_name: str = "ensemble_model"
    revision: str = ""
    precision: str = "fp32"  # fp32 | bf16 | int8 | fp16 (see hf_triton.precision)
    #: Instances of the model that computes (the Python pipeline, or the ONNX step) and of
    #: the ensemble's preprocessing step; ``hf-triton optimize`` measures what is best.
    instances: int = 1
    preprocessing_instances: int = 1
    #: ONNX Runtime threads per instance (0: one per physical core).
    intra_op_threads: int = 0
    #: What ONNX Runtime's threads do while they wait for work: spin between the operators of
    #: a run and sleep once it ends ("within-run"), or always sleep ("never"). Within a run is
    #: faster on the AMX kind for every model measured (int8 ViT-base: 7 ms less per request
    #: at concurrency 1), slower for all-MiniLM-L6-v2 on AVX2. "auto": the serving machine's
    #: backend chooses by its CPU; ``hf-triton optimize`` measures both.
    onnx_spin: str = "auto"
    #: PyTorch threads per instance of the Python pipeline (0: PyTorch's default).
    torch_threads: int = 0
    #: The Python pipeline's model compiled by torch.compile while it loads (fp32, bf16; CPU).
    torch_compile: bool = False
    #: Where the Python pipeline runs: KIND_CPU, or KIND_GPU (model.py moves the model there).
    instance_kind: str = "KIND_CPU"
    #: Token classification: how tokens become entities (transformers' AggregationStrategy;
    #: a request may override it with the parameter of the same name) and labels left out.
    aggregation_strategy: str = "simple"
    ignore_labels: tuple[str, ...] = ("O",)
    #: Object detection: the score a detection needs (the pipeline's default) and how many of
    #: the best to keep (0: all); a request may pass its own as parameters of the same names.
    threshold: float = 0.5
    top_k: int = 0

    def queue_size(self) -> int:
        return 2 * self.max_batch_size if self.max_queue_size is None else self.max_queue_size


@dataclass
class BuildResult:
    task: Task
    repositories: list[Path] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    entry_models: list[str] = field(default_factory=list)  # what clients call
    validation: export.ValidationReport | None = None
    gates: list[precision.GateReport] = field(default_factory=list)
    int8: precision.Int8Recipe | None = None  # how the int8 model.onnx was made


# -- pbtxt rendering ------------------------------------------------------------------------


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in text.splitlines()] if text else []


def _tensors(
    kind: str,
    tensors: tuple[Tensor, ...] | list[Tensor],
    optional: bool | frozenset[str] = False,
    label_file: bool = False,
) -> list[str]:
    """``optional``: every tensor (True), or those named."""
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        lines.append("  {")
        lines += _comment(t.comment, "    ")
        lines.append(f'    name: "{t.name}"')
        lines.append(f"    data_type: {t.data_type}")
        lines.append(f"    dims: [ {', '.join(str(d) for d in t.dims)} ]")
        if optional is True or (optional and t.name in optional):
            lines.append("    optional: true")
        if label_file and t.labels:
            lines.append(f'    label_filename: "{LABELS}"')
        lines.append("  }," if i < len(tensors) - 1 else "  }")
    lines.append("]")
    return lines


def _quote(text: str) -> str:
    """A pbtxt string literal: a path with quotes or backslashes stays one string."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _parameters(params: list[tuple[str, str, str]]) -> list[str]:
    lines = ["parameters ["]
    for i, (key, value, comment) in enumerate(params):
        lines.append("  {")
        lines += _comment(comment, "    ")
        lines.append(f'    key: "{key}"')
        lines.append(f"    value: {{ string_value: {_quote(value)} }}")
        lines.append("  }," if i < len(params) - 1 else "  }")
    lines.append("]")
    return lines


def _batching(options: BuildOptions, comment: str) -> list[str]:
    queue = options.queue_size()
    policy = [
        "  # Overload: at most this many requests wait; the next is refused at once with",
        "  # UNAVAILABLE (HTTP 503) instead of queueing without bound, and one that waited",
        "  # longer than the timeout is refused when its turn comes (clients may ask for less).",
        "  default_queue_policy {",
        f"    max_queue_size: {queue}",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {options.queue_timeout_ms * 1000}",
        "    allow_timeout_override: true",
        "  }",
    ]
    unbounded = [
        "  # No queue policy (--max-queue-size 0): Triton forms the next batch while one runs,",
        "  # and overload waits in the queue instead of being refused with 503.",
    ]
    delay = (
        "  # 0: a batch is whatever queued while the previous one ran; nothing waits for more\n"
        "  # (on a CPU, where compute grows with the batch, waiting only adds latency)."
        if options.max_queue_delay_us == 0
        else "  # Waits this long for more requests: fewer, larger calls (hf-triton optimize\n"
        "  # measures whether that pays; it does where a call's fixed cost dominates)."
    )
    preferred = (
        [
            "  # A batch of this size goes at once, without waiting out the delay.",
            f"  preferred_batch_size: [ {options.preferred_batch_size} ]",
        ]
        if options.preferred_batch_size
        else []
    )
    return [
        *_comment(comment, ""),
        "dynamic_batching {",
        delay,
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        *preferred,
        *(policy if queue else unbounded),
        "}",
    ]


def _instances(comment: str, count: int = 1, kind: str = "KIND_CPU") -> list[str]:
    return [
        *_comment(comment, ""),
        "instance_group [",
        "  {",
        f"    count: {count}",
        f"    kind: {kind}",
        "  }",
        "]",
    ]


def _python_config(
    name: str,
    header: str,
    task: Task,
    inputs,
    outputs,
    params,
    options,
    optional_inputs: bool | frozenset[str],
    instances: int = 1,
    kind: str = "KIND_CPU",
    batching: str = "Requests arriving together run as one batch (one forward pass).",
    placement: str = "KIND_CPU here; with KIND_GPU model.py moves the model to the instance's GPU.",
) -> str:
    lines = [
        *_comment(header, ""),
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {options.max_batch_size}",
        "",
    ]
    lines += _tensors("input", inputs, optional=optional_inputs)
    lines += _tensors("output", outputs, label_file=True)
    lines.append("")
    lines += _batching(options, batching)
    lines.append("")
    if kind == "KIND_GPU":
        placement = "KIND_GPU: model.py moves the model to this instance's GPU (cuda:<id>)."
    lines += _instances(placement, instances, kind)
    lines.append("")
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


def _pipeline_params(options: BuildOptions) -> list[tuple[str, str, str]]:
    """What a Python pipeline (processor or tokenizer + model) runs in: precision, threads."""
    return [
        (
            "precision",
            options.precision,
            "fp32 (reference), bf16, int8 (dynamic quantisation of Linear layers) or\n"
            "fp16 (GPU); non-fp32 builds passed the accuracy gate against fp32\n"
            '(README, "Precision").',
        ),
        (
            "torch_threads",
            str(options.torch_threads),
            "PyTorch threads per instance; 0 = PyTorch's default (one per core).",
        ),
        (
            "torch_compile",
            "1" if options.torch_compile else "0",
            "1: torch.compile (Inductor, weights frozen) while the model loads, fp32 or\n"
            "bf16 on CPU instances; needs a C++ compiler (g++); gated against eager fp32\n"
            '(README, "Compiled PyTorch").',
        ),
    ]


def _checkpoint_params(spec: ModelSpec, options: BuildOptions) -> list[tuple[str, str, str]]:
    return [
        (
            "checkpoint",
            spec.checkpoint,
            "Hub id or local directory; the launcher replaces it with the resolved local path.",
        ),
        (
            "revision",
            options.revision,
            "Pin a hub revision (commit sha or tag); empty = the default branch.",
        ),
        ("task", spec.task.name, f"{spec.task.description}."),
        *_modality_params(spec),
    ]


def _modality_params(spec: ModelSpec) -> list[tuple[str, str, str]]:
    if spec.modality == "image":
        return [
            (
                "image_processor_backend",
                "pil",
                'transformers\' image-processor backend: "pil" is deterministic across machines.',
            ),
            (
                "preprocessing",
                "vectorized",
                '"vectorized": the processor\'s resize/crop per image, then one numpy affine map '
                'for the batch;\nchecked against "reference" (the processor itself) at load, '
                "which it falls back to (see README).",
            ),
        ]
    return [
        (
            "max_length",
            str(spec.max_length),
            "Tokens per text; longer texts are truncated (set truncation false to refuse them).",
        ),
        ("truncation", "true", ""),
        (
            "padding",
            spec.padding,
            '"longest": a batch is padded to its longest text; "max_length": every text to\n'
            "max_length (a model that pools a fixed position, as SigLIP's text tower).",
        ),
    ]


def _postprocessing_params(spec: ModelSpec, options: BuildOptions) -> list[tuple[str, str, str]]:
    """The post-processing step's settings (token classification or object detection)."""
    if not spec.postprocessed:
        return []
    if spec.modality == "image":
        return [
            (
                "threshold",
                repr(float(options.threshold)),
                "Score a detection needs (0..1). A request may pass its own as a parameter.",
            ),
            (
                "top_k",
                str(options.top_k),
                "Keep the k best detections, highest first (0: every one above the threshold).",
            ),
        ]
    return [
        (
            "aggregation_strategy",
            options.aggregation_strategy,
            "How tokens become entities, as transformers' pipeline: "
            f"{', '.join(AGGREGATION_STRATEGIES)}.\n"
            "A request may pass its own as the request parameter of the same name.",
        ),
        (
            "ignore_labels",
            ",".join(options.ignore_labels),
            "Labels never reported (comma-separated).",
        ),
    ]


# -- the build ----------------------------------------------------------------------------


def build(
    spec: ModelSpec,
    out: Path,
    approach: str = "both",
    options: BuildOptions | None = None,
    export_onnx: bool = True,
) -> BuildResult:
    """Write the repositories for ``spec`` (see :meth:`ModelSpec.resolve`) under ``out``.

    ``export_onnx=False`` writes everything but ``model.onnx`` (the launcher exports it when
    serving). A checkpoint that cannot be served correctly, and a reduced-precision variant
    that fails the accuracy gate, raise before anything is written.
    """
    if approach not in APPROACHES:
        raise tasks.UnsupportedModel(f"approach must be one of {APPROACHES}, got {approach!r}")
    options = options or BuildOptions()
    _check_names(options)
    if not 0.0 <= options.threshold <= 1.0:
        raise tasks.UnsupportedModel(
            f"--threshold {options.threshold}: a detection score is between 0 and 1"
        )
    for what, count in (
        ("--instances", options.instances),
        ("preprocessing instances", options.preprocessing_instances),
    ):
        if count < 1:
            raise tasks.UnsupportedModel(f"{what} {count}: 1 or more instances of the model")
    if options.top_k < 0:
        raise tasks.UnsupportedModel(
            f"--top-k {options.top_k}: the number of detections to keep, >= 0 (0: all)"
        )
    if not 0 <= options.preferred_batch_size <= options.max_batch_size:
        raise tasks.UnsupportedModel(
            f"--preferred-batch-size {options.preferred_batch_size}: between 1 and "
            f"--max-batch-size ({options.max_batch_size}), or 0 for none"
        )
    if options.aggregation_strategy not in AGGREGATION_STRATEGIES:
        raise tasks.UnsupportedModel(
            f"aggregation strategy {options.aggregation_strategy!r}: one of "
            f"{', '.join(AGGREGATION_STRATEGIES)}"
        )
    if options.onnx_spin not in ONNX_SPIN_MODES:
        raise tasks.UnsupportedModel(
            f"--onnx-spin {options.onnx_spin!r}: one of {', '.join(ONNX_SPIN_MODES)}"
        )
    spec.check()
    task = spec.task
    result = BuildResult(task)
    approaches = ["python", "ensemble"] if approach == "both" else [approach]
    for a in approaches:
        precision.check_precision(options.precision, a)
    _check_placement(options, approach)
    if spec.image_text:
        return _build_image_text(spec, out, approaches, options, export_onnx, result)
    labels = spec.labels
    outputs = spec.served_outputs
    inputs = IMAGE_INPUTS if task.modality == "image" else TEXT_INPUTS
    params = _checkpoint_params(spec, options)
    model_py = MODEL_PY[task.modality]

    if (options.precision != "fp32" or options.torch_compile) and "python" in approaches:
        # Refused variants are never written.
        result.gates.append(precision.gate_python(spec, options.precision, options.torch_compile))

    if approach in ("python", "both"):
        repo = out / "python_model_repository"
        name = f"python_{options.name}"
        pipeline_params = [
            *params,
            *_pipeline_params(options),
            *_postprocessing_params(spec, options),
        ]
        step = "image processor" if task.modality == "image" else "tokenizer"
        header = f"Approach 1: the whole pipeline ({step} + model) in one Python-backend model."
        _write_model(
            repo / name,
            _python_config(
                name,
                header,
                task,
                inputs,
                outputs,
                pipeline_params,
                options,
                optional_inputs=len(inputs) > 1,
                instances=options.instances,
                kind=options.instance_kind,
            ),
            model_py,
            labels,
        )
        result.repositories.append(repo)
        result.models.append(name)
        result.entry_models.append(name)

    if approach in ("ensemble", "both"):
        repo = out / "ensemble_model_repository"
        if task.modality == "image":
            mid = [Tensor("pixel_values", "TYPE_FP32", spec.pixel_dims)]
        else:
            mid = [Tensor(n, "TYPE_INT64", (-1,)) for n in spec.inputs]
        # A post-processing step also needs the tokens' character offsets and the text.
        # A post-processing step also needs where each token is in the text, or each image's
        # own size (boxes are mapped back to it).
        extra = []
        if spec.postprocessed:
            extra = list(TOKEN_OFFSETS if task.modality == "text" else IMAGE_SIZES)
        pre_header = (
            "Ensemble step 1: the checkpoint's "
            f"{'image processor' if task.modality == 'image' else 'tokenizer'}, "
            "batch in, batch out."
        )
        _write_model(
            repo / options.preprocessing_name,
            _python_config(
                options.preprocessing_name,
                pre_header,
                task,
                inputs,
                mid + extra,
                params,
                options,
                optional_inputs=len(inputs) > 1,
                instances=options.preprocessing_instances,
            ),
            model_py,
            None,
        )
        onnx_dir = repo / options.name
        _write_onnx_config(onnx_dir, options, labels)
        steps = [
            (options.preprocessing_name, list(inputs), mid + extra),
            (options.name, mid, spec.outputs),
        ]
        if spec.postprocessed:
            if task.modality == "text":
                post_inputs = [*inputs, *(t for t in mid if t.name == "input_ids"), *extra]
                header = (
                    "Ensemble step 3: the model's per-token logits -> entities, with the "
                    "tokenizer's offsets and the text."
                )
            else:
                post_inputs = list(extra)
                header = (
                    "Ensemble step 3: the model's logits and boxes -> detections in each "
                    "image's own pixels (the processor's post_process_object_detection)."
                )
            post_inputs += spec.outputs
            _write_model(
                repo / options.postprocessing_name,
                _python_config(
                    options.postprocessing_name,
                    header,
                    task,
                    post_inputs,
                    outputs,
                    params + _postprocessing_params(spec, options),
                    options,
                    optional_inputs=False,
                ),
                model_py,
                None,
            )
            steps.append((options.postprocessing_name, post_inputs, outputs))
        _write_ensemble(repo / options.ensemble_name, options, inputs, outputs, steps, labels)
        if export_onnx:
            target = onnx_dir / "1" / "model.onnx"
            if options.precision == "fp32":
                result.validation = export.export_onnx(spec, target)
            else:
                fp32 = target.with_name("model.fp32.tmp.onnx")
                variant = target.with_name(f"model.{options.precision}.tmp.onnx")
                try:
                    result.validation = export.export_onnx(spec, fp32)
                    result.int8 = precision.quantize_onnx(
                        fp32, variant, precision.calibration_feeds(spec)
                    )
                    result.gates.append(precision.gate_onnx(spec, options.precision, fp32, variant))
                    variant.replace(target)
                finally:
                    fp32.unlink(missing_ok=True)
                    variant.unlink(missing_ok=True)
        result.repositories.append(repo)
        result.models += [options.preprocessing_name, options.name, options.ensemble_name]
        if spec.postprocessed:
            result.models.append(options.postprocessing_name)
        result.entry_models.append(options.ensemble_name)
    return result


def _build_image_text(
    spec: ModelSpec,
    out: Path,
    approaches: list[str],
    options: BuildOptions,
    export_onnx: bool,
    result: BuildResult,
) -> BuildResult:
    """An image-text model (CLIP, SigLIP): per approach, one model per tower (image ->
    ``image_embeds``, text -> ``text_embeds``) and the zero-shot model calling both.

    python_model_repository: ``python_<name>_image``, ``python_<name>_text`` (each a Python
    pipeline) and ``python_<name>``; ensemble_model_repository: ``<preprocessing>`` and
    ``<preprocessing>_text`` (image processor, tokenizer), ``<name>_image`` and ``<name>_text``
    (the towers' model.onnx), ``<ensemble>_image`` and ``<ensemble>_text`` (ensembles of
    those), and ``<ensemble>`` (zero-shot).
    """
    towers = {side: spec.for_tower(side) for side in hf_common.EMBEDDINGS}
    if (options.precision != "fp32" or options.torch_compile) and "python" in approaches:
        # Both towers and the zero-shot ranking they give; refused variants are never written.
        result.gates += precision.gate_image_text_python(
            spec, options.precision, options.torch_compile
        )
    scoring, scale, bias = spec.zero_shot_scoring
    inputs = {"image": IMAGE_INPUTS, "text": TEXT_INPUTS}
    optional = frozenset(t.name for t in IMAGE_INPUTS)

    def zero_shot(repo: Path, name: str, image_model: str, text_model: str) -> None:
        params = [
            ("task", spec.task.name, f"{spec.task.description}."),
            ("image_model", image_model, "Called for image_embeds (BLS)."),
            ("text_model", text_model, "Called for text_embeds, one row per hypothesis (BLS)."),
            (
                "hypothesis_template",
                hf_common.HYPOTHESIS_TEMPLATE,
                "{} is replaced by each label (the pipeline's default); a request may pass\n"
                "its own as the parameter hypothesis_template.",
            ),
            (
                "scoring",
                scoring,
                "softmax over the labels (CLIP), or a sigmoid per label (SigLIP).",
            ),
            ("logit_scale", repr(scale), "exp(logit_scale) of the weights: cosine -> logit."),
            ("logit_bias", repr(bias), "Added to every logit (SigLIP's logit_bias)."),
        ]
        header = (
            "Zero-shot image classification: each label in the hypothesis template, scored "
            f"against the image\nby {image_model} and {text_model} (Python backend, BLS)."
        )
        lines = _python_config(
            name,
            header,
            spec.task,
            [*IMAGE_INPUTS, tasks.CANDIDATE_LABELS],
            list(spec.task.outputs),
            params,
            options,
            optional_inputs=optional,
            batching="Requests arriving together come in one call; their tower calls run at once.",
            placement="One CPU instance: it only waits on the towers, which do the work.",
        )
        _write_model(repo / name, lines, ZERO_SHOT_PY, None)

    if "python" in approaches:
        repo = out / "python_model_repository"
        entry = f"python_{options.name}"
        for side, tower in towers.items():
            name = f"{entry}_{side}"
            params = [*_checkpoint_params(tower, options), *_pipeline_params(options)]
            header = (
                f"The {side} tower of an image-text model: "
                f"{'image processor' if side == 'image' else 'tokenizer'} + model -> "
                f"{hf_common.EMBEDDINGS[side]}, L2-normalised (Python backend)."
            )
            config = _python_config(
                name,
                header,
                spec.task,
                inputs[side],
                tower.outputs,
                params,
                options,
                optional_inputs=len(inputs[side]) > 1,
                instances=options.instances,
                kind=options.instance_kind,
            )
            _write_model(repo / name, config, MODEL_PY[side], None)
            result.models.append(name)
        zero_shot(repo, entry, f"{entry}_image", f"{entry}_text")
        result.repositories.append(repo)
        result.models.append(entry)
        result.entry_models += [entry, f"{entry}_image", f"{entry}_text"]

    if "ensemble" in approaches:
        repo = out / "ensemble_model_repository"
        exports: dict[str, Path] = {}
        for side, tower in towers.items():
            pre = options.preprocessing_name + ("" if side == "image" else "_text")
            onnx_name = f"{options.name}_{side}"
            ensemble = f"{options.ensemble_name}_{side}"
            if side == "image":
                mid = [Tensor("pixel_values", "TYPE_FP32", tower.pixel_dims)]
            else:
                mid = [Tensor(n, "TYPE_INT64", (-1,)) for n in tower.inputs]
            step = "image processor" if side == "image" else "tokenizer"
            config = _python_config(
                pre,
                f"The {side} tower's first step: the checkpoint's {step}, batch in, batch out.",
                spec.task,
                inputs[side],
                mid,
                _checkpoint_params(tower, options),
                options,
                optional_inputs=len(inputs[side]) > 1,
                instances=options.preprocessing_instances,
            )
            _write_model(repo / pre, config, MODEL_PY[side], None)
            _write_onnx_config(repo / onnx_name, options, None, tower=side)
            steps = [(pre, list(inputs[side]), mid), (onnx_name, mid, tower.outputs)]
            _write_ensemble(
                repo / ensemble, options, inputs[side], tower.outputs, steps, None, onnx_name
            )
            exports[side] = repo / onnx_name / "1" / "model.onnx"
            result.models += [pre, onnx_name, ensemble]
        if export_onnx:
            _export_towers(spec, towers, exports, options.precision, result)
        zero_shot(
            repo,
            options.ensemble_name,
            f"{options.ensemble_name}_image",
            f"{options.ensemble_name}_text",
        )
        result.repositories.append(repo)
        result.models.append(options.ensemble_name)
        result.entry_models += [
            options.ensemble_name,
            f"{options.ensemble_name}_image",
            f"{options.ensemble_name}_text",
        ]
    return result


def _export_towers(
    spec: ModelSpec,
    towers: dict[str, ModelSpec],
    targets: dict[str, Path],
    variant: str,
    result: BuildResult,
) -> None:
    """Each tower's model.onnx, validated against PyTorch; an int8 variant is quantised per
    tower and gated on both together (embeddings and zero-shot ranking) before either is kept."""
    made: dict[str, tuple[Path, Path]] = {}
    try:
        for side, tower in towers.items():
            target = targets[side]
            fp32 = target if variant == "fp32" else target.with_name("model.fp32.tmp.onnx")
            report = export.export_onnx(tower, fp32)
            if result.validation is None:
                result.validation = report
            else:
                result.validation.max_abs_diff.update(report.max_abs_diff)
            if variant != "fp32":
                quantised = target.with_name(f"model.{variant}.tmp.onnx")
                made[side] = (fp32, quantised)
                result.int8 = precision.quantize_onnx(
                    fp32, quantised, precision.calibration_feeds(tower)
                )
        if made:
            runners = {
                side: precision.onnx_runners(towers[side], *paths) for side, paths in made.items()
            }
            result.gates += precision.gate_image_text(spec, variant, runners)
            for side, (_, quantised) in made.items():
                quantised.replace(targets[side])
    finally:
        for paths in made.values():
            for path in paths:
                path.unlink(missing_ok=True)


#: Triton model names, as directory names: letters, digits, '_', '-', '.', not starting with '.'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


#: Where a Python pipeline's instances may run (Triton's instance_group kinds).
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


def _check_placement(options: BuildOptions, approach: str) -> None:
    """Refuse, before writing, a placement the Python pipeline would refuse at load."""
    kind, prec = options.instance_kind, options.precision
    if kind not in INSTANCE_KINDS:
        raise tasks.UnsupportedModel(
            f"--instance-kind {kind!r}: one of {', '.join(INSTANCE_KINDS)}"
        )
    if prec == "fp16" and kind != "KIND_GPU":
        raise tasks.UnsupportedModel(
            "--precision fp16 runs on GPU instances only: add --instance-kind KIND_GPU "
            "(and --approach python)"
        )
    if prec == "int8" and kind == "KIND_GPU" and approach != "ensemble":
        raise tasks.UnsupportedModel(
            "--precision int8 (PyTorch's dynamic int8) runs on CPU instances only: on a GPU "
            "use --precision fp16 or bf16"
        )
    if options.torch_compile:
        if approach == "ensemble":
            raise tasks.UnsupportedModel(
                "--torch-compile compiles the Python pipeline's PyTorch model: use --approach "
                "python or both (the ensemble runs model.onnx in ONNX Runtime)"
            )
        if prec not in hf_common.COMPILE_PRECISIONS:
            raise tasks.UnsupportedModel(
                f"--torch-compile is offered for --precision "
                f"{' or '.join(hf_common.COMPILE_PRECISIONS)}, not {prec}"
            )
        if kind != "KIND_CPU":
            raise tasks.UnsupportedModel(
                "--torch-compile runs on KIND_CPU instances (not measured on GPUs)"
            )


def _check_names(options: BuildOptions) -> None:
    for flag, value in (
        ("--name", options.name),
        ("--preprocessing-name", options.preprocessing_name),
        ("--postprocessing-name", options.postprocessing_name),
        ("--ensemble-name", options.ensemble_name),
    ):
        if not _NAME.fullmatch(value):
            raise tasks.UnsupportedModel(
                f"{flag} {value!r}: a model name is a directory name of letters, digits, "
                "'_', '-' and '.', not starting with '.'"
            )


def _write_model(model_dir: Path, config_text: str, model_py: Path, labels: list[str] | None):
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config_text)
    shutil.copyfile(model_py, model_dir / "1" / "model.py")
    shutil.copyfile(COMMON_PY, model_dir / "1" / COMMON_PY.name)
    if labels:
        (model_dir / LABELS).write_text("\n".join(labels) + "\n")


def _write_onnx_config(
    model_dir: Path,
    options: BuildOptions,
    labels: list[str] | None,
    tower: str | None = None,
) -> None:
    """Tuning only: ONNX Runtime auto-completes inputs, outputs and max_batch_size.

    ``tower``: the model.onnx is that tower of an image-text model (a parameter the launcher
    reads to export the right one; ONNX Runtime ignores it)."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / ".gitkeep").touch()
    # Triton checks a preferred batch size against max_batch_size before ONNX Runtime's
    # auto-complete could fill it in: then it is declared here.
    undeclared, declared = "Inputs, outputs and max_batch_size are", []
    if options.preferred_batch_size:
        undeclared = "Inputs and outputs are"
        declared = [
            "# Declared for preferred_batch_size below (Triton checks it before auto-complete).",
            f"max_batch_size: {options.max_batch_size}",
        ]
    lines = [
        f"# Tuning only. {undeclared} NOT declared: ONNX Runtime",
        "# auto-completes them from model.onnx (as in the tutorial), here and in NVIDIA's "
        "container.",
        f'name: "{model_dir.name}"',
        'backend: "onnxruntime"',
        *declared,
        "",
        *_instances(
            "One instance using every core: the model's GEMMs already spread over all cores, and\n"
            'more instances on a small CPU only oversubscribe them (see README, "Throughput").'
            if options.instances == 1
            else f"{options.instances} instances of {options.intra_op_threads or 'all'} "
            "threads each: --instances, or measured\nfaster here by hf-triton optimize.",
            options.instances,
        ),
        "",
        *_batching(options, "Requests that queue while a batch runs are merged into the next one."),
        "",
        "# ONNX Runtime session options, under the names NVIDIA's backend reads.",
        *_parameters(
            [
                (
                    "intra_op_thread_count",
                    str(options.intra_op_threads),
                    "0 = ONNX Runtime's default: one thread per physical core.",
                ),
                ("inter_op_thread_count", "1", ""),
                (
                    "execution_mode",
                    "0",
                    "0 = sequential: the model is one chain of ops; parallel "
                    "execution only adds scheduling.",
                ),
                (
                    "graph_optimization_level",
                    "all",
                    "Read by the Python-based backend; the native "
                    "one takes `optimization { graph { level } }`.",
                ),
                onnx_spin_parameter(options.onnx_spin),
                *(
                    [(export.TOWER_PARAMETER, tower, "The image-text model's tower.")]
                    if tower
                    else []
                ),
            ]
        ),
    ]
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    if labels:
        (model_dir / LABELS).write_text("\n".join(labels) + "\n")


def _write_ensemble(
    model_dir: Path,
    options: BuildOptions,
    inputs,
    outputs,
    steps: list[tuple[str, list[Tensor], list[Tensor]]],
    labels: list[str] | None,
    onnx_model: str | None = None,
) -> None:
    """``steps``: (model, its inputs, its outputs); every tensor keeps its name end to end.
    ``onnx_model``: the step served by ONNX Runtime (default: ``options.name``)."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / ".gitkeep").touch()
    onnx_model = onnx_model or options.name
    chain = " -> ".join(
        f"{name} ({'model.onnx, ONNX Runtime' if name == onnx_model else 'Python backend'})"
        for name, _, _ in steps
    )
    lines = [
        f"# Approach 2: {inputs[0].name} -> {chain}.",
        f'name: "{model_dir.name}"',
        'platform: "ensemble"',
        "# No larger than any step's: the ONNX model gets default-max-batch-size (the launcher",
        "# passes --backend-config=default-max-batch-size=8).",
        f"max_batch_size: {options.max_batch_size}",
        "",
        *_tensors("input", inputs, optional=len(inputs) > 1),
        *_tensors("output", outputs, label_file=True),
        "",
        "ensemble_scheduling {",
        "  step [",
    ]
    for i, (name, step_inputs, step_outputs) in enumerate(steps):
        lines += [
            "    {",
            f'      model_name: "{name}"',
            "      model_version: -1",
            *[f'      input_map {{ key: "{t.name}" value: "{t.name}" }}' for t in step_inputs],
            *[f'      output_map {{ key: "{t.name}" value: "{t.name}" }}' for t in step_outputs],
            "    }," if i < len(steps) - 1 else "    }",
        ]
    lines += ["  ]", "}"]
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    if labels:
        (model_dir / LABELS).write_text("\n".join(labels) + "\n")
