"""What each supported task serves: inputs, outputs, model class, export wrapper. Pure tables.

A task is inferred from the checkpoint's ``config.json`` (``architectures``) when not given.
Nothing here loads weights, so dispatch is testable on configs alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_triton.errors import HfTritonError
from hf_triton.templates.hf_common import MODEL_CLASSES


class UnsupportedModel(HfTritonError):
    """The checkpoint's task or architecture is not one we can serve."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]  # without the batch dimension
    comment: str = ""
    labels: bool = False  # has a label file: Triton's classification extension


@dataclass(frozen=True)
class Task:
    name: str
    modality: str  # "image" or "text": which generic model.py and which preprocessing
    outputs: tuple[Tensor, ...]  # what clients get
    description: str
    #: What the model itself computes, when the served outputs come from a post-processing
    #: step (token classification: per-token logits -> entities); empty: the outputs.
    model_outputs: tuple[Tensor, ...] = ()

    @property
    def auto_class(self) -> str:
        """The transformers class that loads a checkpoint for this task (model.py's table)."""
        return MODEL_CLASSES[self.name]


IMAGE_INPUTS = (
    Tensor(
        "image",
        "TYPE_FP32",
        (-1, -1, 3),
        "One RGB image per batch item, H x W x 3, values 0..255 (the tutorial's contract).",
    ),
    Tensor(
        "image_uint8", "TYPE_UINT8", (-1, -1, 3), "The same as UINT8: 4x fewer bytes on the wire."
    ),
    Tensor(
        "image_bytes",
        "TYPE_STRING",
        (1,),
        "One encoded image (JPEG, PNG, ...) per batch item, decoded on the server;\n"
        "images of one request may differ in size. Send exactly one of the three inputs.",
    ),
)
TEXT_INPUTS = (Tensor("text", "TYPE_STRING", (1,), "One UTF-8 text per batch item."),)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "image-feature-extraction",
            "image",
            (
                Tensor("last_hidden_state", "TYPE_FP32", (-1, -1)),
                Tensor("pooler_output", "TYPE_FP32", (-1,)),
            ),
            "image -> last_hidden_state (+ pooler_output when the model has a pooler)",
        ),
        Task(
            "image-classification",
            "image",
            (Tensor("logits", "TYPE_FP32", (-1,), labels=True),),
            "image -> logits; top-k labels through Triton's classification extension",
        ),
        Task(
            "text-feature-extraction",
            "text",
            (Tensor("sentence_embedding", "TYPE_FP32", (-1,)),),
            "text -> sentence_embedding (pooling and normalisation as the checkpoint's "
            "sentence-transformers config says; mean pooling otherwise)",
        ),
        Task(
            "text-classification",
            "text",
            (Tensor("logits", "TYPE_FP32", (-1,), labels=True),),
            "text -> logits; top-k labels through Triton's classification extension",
        ),
        Task(
            "token-classification",
            "text",
            (
                Tensor(
                    "entities",
                    "TYPE_STRING",
                    (1,),
                    "One JSON list per text: what transformers' token-classification pipeline\n"
                    "returns (entity or entity_group, score, word, start, end[, index]).",
                ),
            ),
            "text -> entities with character offsets (named-entity recognition), grouped by "
            "the aggregation_strategy parameter as transformers' pipeline does",
            model_outputs=(Tensor("logits", "TYPE_FP32", (-1, -1)),),
        ),
        Task(
            "object-detection",
            "image",
            (
                Tensor(
                    "detections",
                    "TYPE_STRING",
                    (1,),
                    "One JSON list per image: what transformers' object-detection pipeline\n"
                    "returns (score, label, box {xmin, ymin, xmax, ymax} in the image's pixels).",
                ),
            ),
            "image -> boxes in the original image's pixel coordinates, scores and labels, after "
            "the image processor's post_process_object_detection (threshold, top_k parameters)",
            model_outputs=(
                Tensor("logits", "TYPE_FP32", (-1, -1)),
                Tensor("pred_boxes", "TYPE_FP32", (-1, -1)),
            ),
        ),
        Task(
            "zero-shot-image-classification",
            "image",
            (
                Tensor(
                    "scores",
                    "TYPE_STRING",
                    (1,),
                    "One JSON list per image: what transformers' zero-shot-image-classification\n"
                    "pipeline returns ([{score, label}], highest first).",
                ),
            ),
            "image + candidate labels -> a score per label (CLIP, SigLIP); the build also "
            "serves each tower: image -> image_embeds, text -> text_embeds",
            model_outputs=(
                Tensor("image_embeds", "TYPE_FP32", (-1,)),
                Tensor("text_embeds", "TYPE_FP32", (-1,)),
            ),
        ),
    )
}
#: Zero-shot image classification: the labels to score, given with each image.
CANDIDATE_LABELS = Tensor(
    "candidate_labels",
    "TYPE_STRING",
    (-1,),
    "The labels to score for each image (UTF-8), K per image: a request of N images\n"
    "sends N x K; each label is put into the hypothesis template before it is embedded.",
)
#: What the tokenizer step hands the post-processing step besides the model's inputs.
TOKEN_OFFSETS = (
    Tensor("offset_mapping", "TYPE_INT64", (-1, 2)),
    Tensor("special_tokens_mask", "TYPE_INT64", (-1,)),
)
#: What the image processor step hands the post-processing step: each image's own size.
IMAGE_SIZES = (Tensor("target_size", "TYPE_INT64", (2,), "Height and width of the image sent."),)

#: Architecture name suffix -> task. "...Model" depends on the modality (below).
ARCHITECTURE_SUFFIXES = {
    "ForImageClassification": "image-classification",
    "ForImageClassificationWithTeacher": "image-classification",  # distilled DeiT
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForObjectDetection": "object-detection",
    "Model": None,
}
#: Config keys that only vision models have.
_VISION_KEYS = ("image_size", "num_channels")


def is_vision(config: dict[str, Any]) -> bool:
    return any(k in config for k in _VISION_KEYS) or "vision_config" in config


def infer_task(config: dict[str, Any]) -> str:
    """The task for a checkpoint's config.json, from its ``architectures``."""
    architectures = config.get("architectures") or []
    for arch in architectures:
        for suffix, task in ARCHITECTURE_SUFFIXES.items():
            # A base model is "<Name>Model", not a head such as GPT2LMHeadModel.
            base = arch[: -len(suffix)]
            if arch.endswith(suffix) and not (task is None and ("Head" in base or "For" in base)):
                if task is None:
                    if "vision_config" in config and "text_config" in config:
                        return "zero-shot-image-classification"  # CLIPModel, SiglipModel
                    return (
                        "image-feature-extraction"
                        if is_vision(config)
                        else ("text-feature-extraction")
                    )
                return task
    raise UnsupportedModel(
        f"Cannot serve architectures {architectures or '(none listed)'}: supported are "
        "*Model (feature extraction; zero-shot image classification for image-text models "
        "such as CLIPModel), *ForImageClassification, *ForSequenceClassification, "
        "*ForTokenClassification, *ForObjectDetection. "
        f"Supported tasks: {', '.join(TASKS)} (pass --task to choose)."
    )


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnsupportedModel(
            f"Unknown task {name!r}; supported tasks: {', '.join(TASKS)}"
        ) from None
