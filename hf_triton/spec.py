"""One checkpoint, resolved once: what build, the export, the accuracy gate and the benchmark share.

:meth:`ModelSpec.resolve` reads ``config.json`` and picks the task; everything else is worked
out on first use and kept: the model (loaded once, with eager attention so it traces into plain
ONNX ops), its tokenizer or image processor, the inputs the model really takes, the outputs it
really produces (names and ranks, from one forward pass on a probe), the sentence-transformers
pooling, the label names and the text length. :meth:`ModelSpec.check` refuses a checkpoint that
cannot be served correctly, naming what is missing, before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from hf_triton import tasks
from hf_triton.tasks import Task, Tensor, UnsupportedModel
from hf_triton.templates import hf_common

log = logging.getLogger(__name__)

#: Tokens in the probe text: long enough for every tokenizer to make several pieces.
_PROBE_TEXT = "Probe sentence, with punctuation: naïve café 42."
#: Image-text models whose zero-shot pipeline pads every text to this length (and scores each
#: label with a sigmoid): transformers' zero-shot-image-classification pipeline's rule.
PAD_TO_MAX_LENGTH = {"siglip": 64}


@dataclass
class ModelSpec:
    """A checkpoint on local disk and everything serving it needs to know."""

    checkpoint: str  # what config.pbtxt names: hub id or path, as the user gave it
    path: Path  # the local directory with config.json and the weights
    config: dict[str, Any]
    task: Task
    requested_max_length: int | None = None
    #: "image" or "text": this spec is that tower of an image-text model (CLIP, SigLIP).
    tower: str | None = None

    @classmethod
    def resolve(
        cls,
        path: str | Path,
        task: str | None = None,
        checkpoint: str | None = None,
        max_length: int | None = None,
    ) -> ModelSpec:
        """The spec of the checkpoint in ``path`` for ``task`` (default: from ``architectures``)."""
        from transformers import AutoConfig

        path = Path(path)
        config = AutoConfig.from_pretrained(str(path)).to_dict()
        name = task or tasks.infer_task(config)
        return cls(checkpoint or str(path), path, config, tasks.get_task(name), max_length)

    @property
    def modality(self) -> str:
        return self.tower or self.task.modality

    @property
    def image_text(self) -> bool:
        """An image-text model (CLIP, SigLIP): two towers, each exported and served."""
        return self.task.name == hf_common.ZERO_SHOT

    def for_tower(self, side: str) -> ModelSpec:
        """The ``side`` tower of this image-text model, sharing the loaded model."""
        if not self.image_text:
            raise UnsupportedModel(f"{self.checkpoint}: {self.task.name} has no towers")
        tower = ModelSpec(
            self.checkpoint, self.path, self.config, self.task, self.requested_max_length, side
        )
        tower.__dict__["model"] = self.model  # loaded once, shared by both towers
        return tower

    @property
    def padding(self) -> str:
        """How a batch of texts is padded: "longest", or "max_length" (SigLIP)."""
        return "max_length" if self.config.get("model_type") in PAD_TO_MAX_LENGTH else "longest"

    @cached_property
    def zero_shot_scoring(self) -> tuple[str, float, float]:
        """(scoring, logit scale, logit bias) of an image-text model's zero-shot logits:
        softmax over ``exp(logit_scale) * cosine`` (CLIP), or a sigmoid of it plus
        ``logit_bias`` per label (SigLIP), read from the weights."""
        scoring = "sigmoid" if self.config.get("model_type") in PAD_TO_MAX_LENGTH else "softmax"
        scale = float(self.model.logit_scale.detach().exp())
        bias = getattr(self.model, "logit_bias", None)
        return scoring, scale, 0.0 if bias is None else float(bias.detach().reshape(()))

    # -- the pieces, loaded once ----------------------------------------------------------

    @cached_property
    def model(self) -> Any:
        """The task's model in fp32, eval mode, eager attention."""
        import transformers

        auto = getattr(transformers, self.task.auto_class)
        log.info("Loading %s as %s", self.path, self.task.auto_class)
        return auto.from_pretrained(str(self.path), attn_implementation="eager").eval()

    @cached_property
    def preprocessor(self) -> Any:
        """The tokenizer (text) or the image processor, PIL backend (image)."""
        import transformers

        if self.modality == "image":
            return transformers.AutoImageProcessor.from_pretrained(str(self.path), backend="pil")
        return transformers.AutoTokenizer.from_pretrained(str(self.path))

    @cached_property
    def runnable(self) -> Any:
        """What computes the outputs: the model, or one tower of an image-text model."""
        if self.tower:
            return hf_common.embedding_tower(self.model, self.tower)
        return self.model

    @cached_property
    def inputs(self) -> list[str]:
        """The model's inputs, in ONNX order."""
        if self.modality == "image":
            return ["pixel_values"]
        return hf_common.model_inputs(self.runnable, self.preprocessor)

    @cached_property
    def pooling(self) -> hf_common.Pooling | None:
        if self.task.name != "text-feature-extraction":
            return None
        try:
            return hf_common.Pooling.from_checkpoint(str(self.path))
        except hf_common.ModelError as e:
            raise UnsupportedModel(f"{self.checkpoint}: {e}") from e

    @cached_property
    def labels(self) -> list[str] | None:
        id2label = self.config.get("id2label") or {}
        if not any(t.labels for t in self.task.outputs):
            return None
        return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]

    @cached_property
    def max_length(self) -> int | None:
        """Tokens per text: ``--max-length``, sentence-transformers' ``max_seq_length``, else
        what the position embeddings allow (less any positions reserved for padding), <= 512."""
        if self.modality != "text":
            return None
        if self.requested_max_length:
            return self.requested_max_length
        fixed = PAD_TO_MAX_LENGTH.get(self.config.get("model_type", ""))
        if fixed:
            return fixed
        st = self.path / "sentence_bert_config.json"
        if st.exists():
            import json

            value = json.loads(st.read_text()).get("max_seq_length")
            if value:
                return int(value)
        text_config = self.config.get("text_config") or {}
        positions = int(
            self.config.get("max_position_embeddings")
            or text_config.get("max_position_embeddings")
            or 512
        )
        embeddings = getattr(self.model.base_model, "embeddings", None)
        padding_idx = getattr(embeddings, "padding_idx", None)
        if padding_idx is not None:  # RoBERTa-style positions start after padding_idx
            positions -= int(padding_idx) + 1
        limit = getattr(self.preprocessor, "model_max_length", None) or positions
        return int(min(positions, limit, 512))

    def encode(self, examples: list[Any]) -> dict[str, np.ndarray]:
        """Model inputs for images (uint8 H x W x 3) or texts, as the server makes them."""
        if self.modality == "image":
            pixels = self.preprocessor(
                images=examples, input_data_format="channels_last", return_tensors="np"
            )["pixel_values"]
            return {"pixel_values": pixels.astype(np.float32)}
        encoded = self.preprocessor(
            examples,
            padding=True if self.padding == "longest" else self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {name: encoded[name].astype(np.int64) for name in self.inputs}

    def _probe_examples(self, batch: int = 2) -> list[Any]:
        if self.modality == "image":
            rng = np.random.default_rng(0)
            return [
                rng.integers(0, 256, (64 + 16 * i, 80, 3), dtype=np.uint8) for i in range(batch)
            ]
        return [_PROBE_TEXT, "Short."][:batch]

    @cached_property
    def pixel_dims(self) -> tuple[int, ...]:
        """pixel_values per image (C, H, W), as the processor makes them."""
        return tuple(int(d) for d in self.encode(self._probe_examples(1))["pixel_values"].shape[1:])

    # -- what the model produces --------------------------------------------------------

    @cached_property
    def module(self) -> Any:
        """A torch module from the model inputs (in :attr:`inputs` order) to the outputs,
        pooling included: the graph the ONNX export traces and the gate runs."""
        import torch

        model, inputs, pooling = self.runnable, self.inputs, self.pooling
        names = self._raw_output_names

        class Served(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> tuple[Any, ...]:
                kwargs = dict(zip(inputs, args, strict=True))
                out = self.model(**kwargs)
                if pooling is not None:
                    return (pooling(out.last_hidden_state, kwargs["attention_mask"]),)
                return tuple(getattr(out, n) for n in names)

        return Served().eval()

    @cached_property
    def _raw_output_names(self) -> list[str]:
        """The task's outputs this model produces (a vision model without a pooler has no
        ``pooler_output``); checked on one forward pass."""
        import torch

        if self.pooling is not None:
            return ["last_hidden_state"]
        if self.image_text and not self.tower:
            raise UnsupportedModel(f"{self.checkpoint}: an image-text model runs as its towers")
        feed = self.encode(self._probe_examples())
        try:
            with torch.inference_mode():
                out = self.runnable(**{k: torch.from_numpy(v) for k, v in feed.items()})
        except Exception as e:
            raise UnsupportedModel(
                f"{self.checkpoint}: {type(self.model).__name__} fails on its own "
                f"{type(self.preprocessor).__name__}'s output: {type(e).__name__}: {e}"
            ) from e
        computed = self.task.model_outputs or self.task.outputs
        if self.tower:
            computed = tuple(t for t in computed if t.name == hf_common.EMBEDDINGS[self.tower])
        wanted = [t.name for t in computed]
        produced = [n for n in wanted if getattr(out, n, None) is not None]
        required = [t.name for t in computed if t.name != "pooler_output"]
        missing = [n for n in required if n not in produced]
        if missing:
            raise UnsupportedModel(
                f"{self.checkpoint}: {type(self.model).__name__} does not produce {missing} "
                f"for task {self.task.name}"
            )
        return produced

    @cached_property
    def outputs(self) -> list[Tensor]:
        """What the model computes (and model.onnx outputs): batch dimension excluded, every
        other dimension variable. See :attr:`served_outputs` for what clients get."""
        import torch

        sample = self.sample(2, 0)
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(a) for a in sample.values()))
        declared = {t.name: t for t in self.task.model_outputs or self.task.outputs}
        names = ["sentence_embedding"] if self.pooling is not None else self._raw_output_names
        return [
            Tensor(n, declared[n].data_type, (-1,) * (t.dim() - 1), labels=declared[n].labels)
            for n, t in zip(names, out, strict=True)
        ]

    @property
    def served_outputs(self) -> list[Tensor]:
        """What clients get: the model's outputs, or the post-processing step's (entities)."""
        return list(self.task.outputs) if self.postprocessed else self.outputs

    @property
    def postprocessed(self) -> bool:
        """True when a post-processing step turns the model's outputs into the served ones
        (not an image-text model: its towers serve their outputs as they are)."""
        return bool(self.task.model_outputs) and not self.image_text

    @cached_property
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.config.get("id2label") or {}).items()}

    def sample(self, batch: int, seed: int) -> dict[str, np.ndarray]:
        """Random model inputs of ``batch`` rows: what export traces and validation compares.

        Text rows differ in length (row 0 is padded), so a graph that ignores the mask or
        fixes the sequence length cannot pass.
        """
        rng = np.random.default_rng(seed)
        if self.modality == "image":
            shape = (batch, *self.pixel_dims)
            return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
        length = 12 + seed % 5
        vocab = len(self.preprocessor)
        special = set(getattr(self.preprocessor, "all_special_ids", []))
        ordinary = np.array([i for i in range(min(vocab, 2000)) if i not in special])
        ids = rng.choice(ordinary, (batch, length)).astype(np.int64)
        mask = np.ones((batch, length), np.int64)
        mask[0, length // 2 :] = 0
        pad = self.preprocessor.pad_token_id
        if pad is not None:
            ids[0, length // 2 :] = pad
        feed = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros((batch, length), np.int64),
        }
        return {name: feed[name] for name in self.inputs}

    def check(self) -> None:
        """Raise :class:`UnsupportedModel` naming what is missing when this checkpoint cannot be
        served correctly; resolves the inputs, outputs and pooling on the way."""
        if self.labels is not None and not self.labels:
            raise UnsupportedModel(
                f"{self.checkpoint}: task {self.task.name} needs id2label in config.json"
            )
        if self.postprocessed and not self.id2label:
            raise UnsupportedModel(f"{self.checkpoint}: {self.task.name} needs id2label")
        if self.task.name == "token-classification" and not getattr(
            self.preprocessor, "is_fast", False
        ):
            raise UnsupportedModel(
                f"{self.checkpoint}: {self.task.name} needs a fast tokenizer (character "
                f"offsets); {type(self.preprocessor).__name__} is not one"
            )
        if self.image_text and not self.tower:
            for side in hf_common.EMBEDDINGS:
                self.for_tower(side).check()
            return
        if self.modality == "text":
            produced = set(self.preprocessor(_PROBE_TEXT).keys())
            # A batch padded to a fixed length needs no mask when the model takes none (SigLIP).
            needed = ["input_ids"] + ([] if self.padding == "max_length" else ["attention_mask"])
            for name in needed:
                if name not in produced:
                    raise UnsupportedModel(
                        f"{self.checkpoint}: its tokenizer ({type(self.preprocessor).__name__}) "
                        f"does not produce {name}"
                    )
            if "input_ids" not in self.inputs:
                raise UnsupportedModel(
                    f"{self.checkpoint}: {type(self.model).__name__}.forward takes none of "
                    f"{hf_common.TOKENIZER_OUTPUTS}"
                )
        # Runs the model once on its own preprocessor's output: refuses what fails there.
        _ = self.outputs
