"""Build ready-to-serve Triton repositories for a Hugging Face checkpoint, both approaches.

    build(checkpoint, out, task=None, approach="both", name=...)

writes

    out/python_model_repository/python_<name>/{config.pbtxt, 1/model.py[, labels.txt]}
    out/ensemble_model_repository/preprocessing/{config.pbtxt, 1/model.py}
    out/ensemble_model_repository/<name>/{config.pbtxt, 1/model.onnx[, labels.txt]}
    out/ensemble_model_repository/ensemble_model/{config.pbtxt, 1/, [labels.txt]}

from one table per task (:mod:`hf_triton.tasks`) and one generic model.py per modality
(``templates/vision_model.py``, ``templates/text_model.py``). The tutorial's repositories
at the top of this project are exactly this command's output for the ViT checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_triton import export, precision, tasks
from hf_triton.tasks import IMAGE_INPUTS, TEXT_INPUTS, Task, Tensor

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
MODEL_PY = {"image": TEMPLATES / "vision_model.py", "text": TEMPLATES / "text_model.py"}
APPROACHES = ("python", "ensemble", "both")
LABELS = "labels.txt"


@dataclass
class BuildOptions:
    name: str = "vit"
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    preprocessing_name: str = "preprocessing"
    ensemble_name: str = "ensemble_model"
    revision: str = ""
    max_length: int | None = None  # text: tokens; default from the checkpoint
    precision: str = "fp32"  # fp32 | bf16 | int8 | fp16 (see hf_triton.precision)


@dataclass
class BuildResult:
    task: Task
    repositories: list[Path] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    entry_models: list[str] = field(default_factory=list)  # what clients call
    validation: export.ValidationReport | None = None
    gates: list[precision.GateReport] = field(default_factory=list)


# -- pbtxt rendering ------------------------------------------------------------------------


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in text.splitlines()] if text else []


def _tensors(
    kind: str,
    tensors: tuple[Tensor, ...] | list[Tensor],
    optional: bool = False,
    label_file: bool = False,
) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        lines.append("  {")
        lines += _comment(t.comment, "    ")
        lines.append(f'    name: "{t.name}"')
        lines.append(f"    data_type: {t.data_type}")
        lines.append(f"    dims: [ {', '.join(str(d) for d in t.dims)} ]")
        if optional:
            lines.append("    optional: true")
        if label_file and t.labels:
            lines.append(f'    label_filename: "{LABELS}"')
        lines.append("  }," if i < len(tensors) - 1 else "  }")
    lines.append("]")
    return lines


def _parameters(params: list[tuple[str, str, str]]) -> list[str]:
    lines = ["parameters ["]
    for i, (key, value, comment) in enumerate(params):
        lines.append("  {")
        lines += _comment(comment, "    ")
        lines.append(f'    key: "{key}"')
        lines.append(f'    value: {{ string_value: "{value}" }}')
        lines.append("  }," if i < len(params) - 1 else "  }")
    lines.append("]")
    return lines


def _batching(options: BuildOptions, comment: str) -> list[str]:
    return [
        *_comment(comment, ""),
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
    ]


def _instances(comment: str) -> list[str]:
    return [
        *_comment(comment, ""),
        "instance_group [",
        "  {",
        "    count: 1",
        "    kind: KIND_CPU",
        "  }",
        "]",
    ]


def _python_config(
    name: str, header: str, task: Task, inputs, outputs, params, options, optional_inputs: bool
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
    lines += _batching(options, "Requests arriving together run as one batch (one forward pass).")
    lines.append("")
    lines += _instances(
        "KIND_CPU here; with KIND_GPU model.py moves the model to the instance's GPU."
    )
    lines.append("")
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


def _checkpoint_params(
    checkpoint: str, task: Task, options: BuildOptions, extra: list[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    return [
        (
            "checkpoint",
            checkpoint,
            "Hub id or local directory; the launcher replaces it with the resolved local path.",
        ),
        (
            "revision",
            options.revision,
            "Pin a hub revision (commit sha or tag); empty = the default branch.",
        ),
        ("task", task.name, f"{task.description}."),
        *extra,
    ]


def _modality_params(
    task: Task, config: dict[str, Any], checkpoint_dir: Path, options: BuildOptions
) -> list[tuple[str, str, str]]:
    if task.modality == "image":
        return [
            (
                "image_processor_backend",
                "pil",
                'transformers\' image-processor backend: "pil" is deterministic across machines.',
            ),
            (
                "preprocessing",
                "vectorized",
                '"vectorized": PIL resize per image, then one numpy affine map for the batch '
                '(matches\n"reference", the Hugging Face processor, to ~1e-6; measured faster, '
                "see README).",
            ),
        ]
    return [
        (
            "max_length",
            str(options.max_length or _max_length(config, checkpoint_dir)),
            "Tokens per text; longer texts are truncated (set truncation false to refuse them).",
        ),
        ("truncation", "true", ""),
    ]


def _max_length(config: dict[str, Any], checkpoint_dir: Path) -> int:
    st = checkpoint_dir / "sentence_bert_config.json"
    if st.exists():
        return int(json.loads(st.read_text()).get("max_seq_length", 512))
    return min(int(config.get("max_position_embeddings", 512)), 512)


def _image_pixel_dims(config: dict[str, Any], checkpoint_dir: Path) -> tuple[int, int, int]:
    from transformers import AutoImageProcessor  # noqa: PLC0415

    processor = AutoImageProcessor.from_pretrained(str(checkpoint_dir), backend="pil")
    size = processor.size
    height = size.get("height") or size.get("shortest_edge") or config.get("image_size", 224)
    width = size.get("width") or size.get("shortest_edge") or config.get("image_size", 224)
    crop = (
        getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False)
        else None
    )
    if crop:
        height, width = crop.get("height", height), crop.get("width", width)
    return (int(config.get("num_channels", 3)), int(height), int(width))


def _text_model_inputs(checkpoint_dir: Path, task: Task) -> list[str]:
    import inspect  # noqa: PLC0415

    import transformers  # noqa: PLC0415

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))
    produced = set(tokenizer("probe").keys())
    model_cls = transformers.AutoConfig.from_pretrained(str(checkpoint_dir))
    auto = getattr(transformers, task.auto_class)
    forward = auto.from_config(model_cls).forward
    accepted = inspect.signature(forward).parameters
    return [n for n in export.TEXT_INPUTS if n in accepted and n in produced]


# -- the build ----------------------------------------------------------------------------


def build(
    checkpoint: str,
    checkpoint_dir: Path,
    out: Path,
    task_name: str | None = None,
    approach: str = "both",
    options: BuildOptions | None = None,
    export_onnx: bool = True,
) -> BuildResult:
    """Write the repositories for ``checkpoint`` (whose files are in ``checkpoint_dir``).

    ``checkpoint`` is what goes into config.pbtxt (hub id or path); ``export_onnx=False``
    writes everything but ``model.onnx`` (the launcher exports it when serving).
    """
    if approach not in APPROACHES:
        raise tasks.UnsupportedModel(f"approach must be one of {APPROACHES}, got {approach!r}")
    options = options or BuildOptions()
    config = export.read_config(checkpoint_dir)
    task = tasks.get_task(task_name or tasks.infer_task(config))
    result = BuildResult(task)
    labels = _labels(config) if any(t.labels for t in task.outputs) else None
    if any(t.labels for t in task.outputs) and not labels:
        raise tasks.UnsupportedModel(
            f"{checkpoint}: task {task.name} needs id2label in config.json"
        )
    outputs = list(task.outputs)
    if task.name == "image-feature-extraction" and not _has_pooler(checkpoint_dir, task):
        outputs = [t for t in outputs if t.name != "pooler_output"]
    inputs = IMAGE_INPUTS if task.modality == "image" else TEXT_INPUTS
    params = _checkpoint_params(
        checkpoint, task, options, _modality_params(task, config, checkpoint_dir, options)
    )
    model_py = MODEL_PY[task.modality]

    approaches = ["python", "ensemble"] if approach == "both" else [approach]
    for a in approaches:
        precision.check_precision(options.precision, a)
    if options.precision != "fp32" and "python" in approaches:
        # Refused variants are never written.
        result.gates.append(gate_python(checkpoint_dir, task, options))

    if approach in ("python", "both"):
        repo = out / "python_model_repository"
        name = f"python_{options.name}"
        pipeline_params = [
            *params,
            (
                "precision",
                options.precision,
                "fp32 (reference), bf16, int8 (dynamic quantisation of Linear layers) or\n"
                "fp16 (GPU); non-fp32 builds passed the accuracy gate against fp32\n"
                '(README, "Precision").',
            ),
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
            mid = [Tensor("pixel_values", "TYPE_FP32", _image_pixel_dims(config, checkpoint_dir))]
        else:
            mid = [Tensor(n, "TYPE_INT64", (-1,)) for n in _text_model_inputs(checkpoint_dir, task)]
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
                mid,
                params,
                options,
                optional_inputs=len(inputs) > 1,
            ),
            model_py,
            None,
        )
        onnx_dir = repo / options.name
        _write_onnx_config(onnx_dir, options, labels)
        _write_ensemble(repo / options.ensemble_name, options, inputs, mid, outputs, labels)
        if export_onnx:
            target = onnx_dir / "1" / "model.onnx"
            if options.precision == "fp32":
                result.validation = export.export_onnx(checkpoint_dir, target, task=task.name)
            else:
                fp32 = target.with_name("model.fp32.tmp.onnx")
                variant = target.with_name(f"model.{options.precision}.tmp.onnx")
                try:
                    result.validation = export.export_onnx(checkpoint_dir, fp32, task=task.name)
                    precision.quantize_onnx(fp32, variant)
                    result.gates.append(gate_onnx(checkpoint_dir, task, options, fp32, variant))
                    variant.replace(target)
                finally:
                    fp32.unlink(missing_ok=True)
                    variant.unlink(missing_ok=True)
        result.repositories.append(repo)
        result.models += [options.preprocessing_name, options.name, options.ensemble_name]
        result.entry_models.append(options.ensemble_name)
    return result


def _has_pooler(checkpoint_dir: Path, task: Task) -> bool:
    import transformers  # noqa: PLC0415

    config = transformers.AutoConfig.from_pretrained(str(checkpoint_dir))
    model = getattr(transformers, task.auto_class).from_config(config)
    return getattr(model, "pooler", None) is not None


def _labels(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label") or {}
    if not id2label:
        return None
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]


def _write_model(model_dir: Path, config_text: str, model_py: Path, labels: list[str] | None):
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config_text)
    shutil.copyfile(model_py, model_dir / "1" / "model.py")
    if labels:
        (model_dir / LABELS).write_text("\n".join(labels) + "\n")


def _write_onnx_config(model_dir: Path, options: BuildOptions, labels: list[str] | None) -> None:
    """Tuning only: ONNX Runtime auto-completes inputs, outputs and max_batch_size."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / ".gitkeep").touch()
    lines = [
        "# Tuning only. Inputs, outputs and max_batch_size are NOT declared: ONNX Runtime",
        "# auto-completes them from model.onnx (as in the tutorial), here and in NVIDIA's "
        "container.",
        f'name: "{options.name}"',
        'backend: "onnxruntime"',
        "",
        *_instances(
            "One instance using every core: the model's GEMMs already spread over all cores, and\n"
            'more instances on a small CPU only oversubscribe them (see README, "Throughput").'
        ),
        "",
        *_batching(options, "Requests that queue while a batch runs are merged into the next one."),
        "",
        "# ONNX Runtime session options, under the names NVIDIA's backend reads.",
        *_parameters(
            [
                (
                    "intra_op_thread_count",
                    "0",
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
            ]
        ),
    ]
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    if labels:
        (model_dir / LABELS).write_text("\n".join(labels) + "\n")


def _write_ensemble(
    model_dir: Path, options: BuildOptions, inputs, mid, outputs, labels: list[str] | None
) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / ".gitkeep").touch()
    lines = [
        f"# Approach 2: {inputs[0].name} -> {options.preprocessing_name} (Python backend) -> "
        f"{options.name} (model.onnx, ONNX Runtime).",
        f'name: "{options.ensemble_name}"',
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
        "    {",
        f'      model_name: "{options.preprocessing_name}"',
        "      model_version: -1",
        *[f'      input_map {{ key: "{t.name}" value: "{t.name}" }}' for t in inputs],
        *[f'      output_map {{ key: "{t.name}" value: "{t.name}" }}' for t in mid],
        "    },",
        "    {",
        f'      model_name: "{options.name}"',
        "      model_version: -1",
        *[f'      input_map {{ key: "{t.name}" value: "{t.name}" }}' for t in mid],
        *[f'      output_map {{ key: "{t.name}" value: "{t.name}" }}' for t in outputs],
        "    }",
        "  ]",
        "}",
    ]
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    if labels:
        (model_dir / LABELS).write_text("\n".join(labels) + "\n")


# -- the accuracy gate for reduced-precision builds --------------------------------------


def _eval_feeds(checkpoint_dir: Path, task: Task, input_names: list[str], options: BuildOptions):
    """The fixed evaluation set, and a function turning a chunk of it into model inputs."""
    import transformers  # noqa: PLC0415

    if task.modality == "image":
        processor = transformers.AutoImageProcessor.from_pretrained(
            str(checkpoint_dir), backend="pil"
        )

        def image_feed(chunk):
            return {"pixel_values": processor(images=chunk, return_tensors="np")["pixel_values"]}

        return precision.eval_images(), image_feed
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))
    config = export.read_config(checkpoint_dir)
    max_length = options.max_length or _max_length(config, checkpoint_dir)

    def text_feed(chunk):
        enc = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        return {k: enc[k] for k in input_names}

    return precision.eval_sentences(), text_feed


def gate_python(checkpoint_dir: Path, task: Task, options: BuildOptions) -> precision.GateReport:
    """The Python backend's variant (same conversion as model.py) against fp32 PyTorch."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    spec = export.build_spec(checkpoint_dir, task.name)
    variant = precision.apply_torch(copy.deepcopy(spec.module), options.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision, torch.float32)
    examples, feed = _eval_feeds(checkpoint_dir, task, spec.input_names, options)

    def run(module, chunk, float_dtype):
        tensors = [torch.from_numpy(a) for a in feed(chunk).values()]
        tensors = [t.to(float_dtype) if t.is_floating_point() else t for t in tensors]
        with torch.inference_mode():
            return module(*tensors)[0].float().numpy()

    return precision.gate(
        options.precision,
        lambda chunk: run(spec.module, chunk, torch.float32),
        lambda chunk: run(variant, chunk, dtype),
        examples,
        classifier=task.outputs[0].labels,
    )


def gate_onnx(
    checkpoint_dir: Path, task: Task, options: BuildOptions, fp32: Path, variant: Path
) -> precision.GateReport:
    """The quantised model.onnx against the fp32 export, both in ONNX Runtime."""
    import onnxruntime as ort  # noqa: PLC0415

    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    var = ort.InferenceSession(str(variant), providers=["CPUExecutionProvider"])
    names = [i.name for i in ref.get_inputs()]
    first = ref.get_outputs()[0].name
    examples, feed = _eval_feeds(checkpoint_dir, task, names, options)
    return precision.gate(
        options.precision,
        lambda chunk: ref.run([first], feed(chunk))[0],
        lambda chunk: var.run([first], feed(chunk))[0],
        examples,
        classifier=task.outputs[0].labels,
    )
