"""Triton Python-backend model: zero-shot image classification over an image-text model's towers.

An image-text model (CLIP, SigLIP) scores an image against labels it never saw in training:
each label is put into a hypothesis ("This is a photo of {}.") and embedded by the text tower,
the image by the image tower, and the scores are the cosine of the two scaled by the model's
``logit_scale``: a softmax over the labels (CLIP), or a sigmoid of it plus ``logit_bias`` per
label (SigLIP), as transformers' zero-shot-image-classification pipeline computes them.

A request brings N images and N x K labels, so the K hypotheses fan out to K text rows: no
plain ensemble can express that. This model calls the two towers by name with Triton's
business-logic scripting (BLS): the image model (``image_model``: image in, ``image_embeds``
out) and the text model (``text_model``: ``text`` in, ``text_embeds`` out), in the same
repository: the Python pipelines in python_model_repository, the ensembles over the two ONNX
towers in ensemble_model_repository. Both calls run at once, and every request of a batch at
once, so the towers' own dynamic batching gathers them.

Inputs: one of ``image`` / ``image_uint8`` / ``image_bytes`` (as the image model takes them)
and ``candidate_labels`` (BYTES, N x K, UTF-8). Output ``scores``: one JSON list per image,
``[{"score", "label"}]`` highest first, what the pipeline returns. The hypothesis template is a
config parameter a request may override with the parameter ``hypothesis_template``.

Depends on numpy, Triton's ``triton_python_backend_utils`` and ``hf_common.py`` beside it;
no torch, no transformers: the towers do the model's work.
"""

import asyncio
import json

import hf_common
import numpy as np
import triton_python_backend_utils as pb_utils
from hf_common import BadInput, ModelError

LABELS = "candidate_labels"
SCORES = "scores"
#: Longest label accepted (characters): a hypothesis is truncated to the text tower's length.
MAX_LABEL_CHARS = 1000


class UpstreamError(Exception):
    """A tower answered with an error: its Triton error, with the tower's name. (Triton 2.51
    hands BLS callers every error as INTERNAL; what a client can get wrong is checked before.)"""

    def __init__(self, model, error):
        super().__init__(f"{model}: {error.message()}")
        code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
        self.error = pb_utils.TritonError(str(self), code)


def _template(value, error):
    """``value`` if it is a hypothesis template (one ``{}`` for the label), else ``error``."""
    if not isinstance(value, str) or not value.strip():
        raise error(f"hypothesis_template {value!r}: a non-empty text with {{}} for the label")
    try:
        value.format("label")
    except (IndexError, KeyError, ValueError) as e:
        raise error(
            f"hypothesis_template {value!r}: {{}} marks where the label goes, as in "
            f"{hf_common.HYPOTHESIS_TEMPLATE!r} ({type(e).__name__}: {e})"
        ) from e
    return value


def _label(index, item):
    label = hf_common.decode_text(f"input '{LABELS}'{list(index)}", item, "label")
    if len(label) > MAX_LABEL_CHARS:
        raise BadInput(
            f"input '{LABELS}'{list(index)}: {len(label)} characters; at most {MAX_LABEL_CHARS}"
        )
    return label


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = hf_common.parameters(config)
        try:
            self.image_model = params.get("image_model") or ""
            self.text_model = params.get("text_model") or ""
            if not self.image_model or not self.text_model:
                raise ModelError("config.pbtxt needs parameters image_model and text_model")
            self.template = _template(
                params.get("hypothesis_template") or hf_common.HYPOTHESIS_TEMPLATE, ModelError
            )
            self.scoring = params.get("scoring") or "softmax"
            if self.scoring not in hf_common.ZERO_SHOT_SCORING:
                raise ModelError(
                    f"parameter scoring {self.scoring!r}: one of {hf_common.ZERO_SHOT_SCORING}"
                )
            self.scale = float(params["logit_scale"])
            self.bias = float(params.get("logit_bias") or 0.0)
            # Texts per call of the text model: build gives the towers this model's
            # max_batch_size.
            self.text_batch = int(config["max_batch_size"] or 1)
            self.limits = hf_common.image_limits(params)
        except (KeyError, ValueError) as e:
            raise pb_utils.TritonModelException(f"{self.name}: {type(e).__name__}: {e}") from e
        except ModelError as e:
            raise pb_utils.TritonModelException(f"{self.name}: {e}") from e
        self.inputs = [i["name"] for i in config["input"] if i["name"] in hf_common.IMAGE_INPUTS]
        pb_utils.Logger.log_info(
            f"{self.name}: zero-shot image classification over {self.image_model} (image) and "
            f"{self.text_model} (text), {self.scoring} of {self.scale:g} x cosine"
            f"{f' + {self.bias:g}' if self.bias else ''}, template {self.template!r}"
        )

    async def execute(self, requests):
        return await asyncio.gather(*(self._respond(request) for request in requests))

    async def _respond(self, request):
        try:
            scores = await self._classify(request)
        except UpstreamError as e:
            return pb_utils.InferenceResponse(error=e.error)
        except Exception as e:  # BadInput -> 400, anything else -> 500, to this request only
            return hf_common.error_response(e)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(SCORES, scores)])

    async def _classify(self, request):
        name, image = hf_common.one_input(request, self.inputs)
        # Checked here too: an error a tower returns through BLS reaches this model as a 500.
        hf_common.check_images(name, image.as_numpy(), *self.limits)
        rows = pb_utils.get_input_tensor_by_name(request, LABELS).as_numpy()
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise BadInput(f"input '{LABELS}': at least one label per image, got {rows.shape}")
        labels = [
            [_label((i, j), item) for j, item in enumerate(row)] for i, row in enumerate(rows)
        ]
        template = hf_common.request_parameters(request).get("hypothesis_template", self.template)
        template = _template(template, BadInput)
        unique = list(dict.fromkeys(label for row in labels for label in row))
        hypotheses = [template.format(label) for label in unique]
        chunks = [
            hypotheses[i : i + self.text_batch] for i in range(0, len(hypotheses), self.text_batch)
        ]
        image_embeds, *text_embeds = await asyncio.gather(
            self._infer(self.image_model, [image], "image_embeds"),
            *(
                self._infer(
                    self.text_model,
                    [pb_utils.Tensor("text", np.array(chunk, dtype=np.object_).reshape(-1, 1))],
                    "text_embeds",
                )
                for chunk in chunks
            ),
        )
        logits = self.scale * (image_embeds @ np.concatenate(text_embeds).T) + self.bias
        column = {label: i for i, label in enumerate(unique)}
        out = np.empty((len(labels), 1), dtype=np.object_)
        for i, row in enumerate(labels):
            ranking = hf_common.zero_shot_ranking(
                logits[i, [column[label] for label in row]], row, self.scoring
            )
            out[i, 0] = json.dumps(ranking, ensure_ascii=False).encode("utf-8")
        return out

    async def _infer(self, model, inputs, output):
        response = await pb_utils.InferenceRequest(
            model_name=model, inputs=inputs, requested_output_names=[output]
        ).async_exec()
        if response.has_error():
            raise UpstreamError(model, response.error())
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()
