"""Triton Python-backend model: a Hugging Face image processor, optionally followed by its model.

The same file serves two roles, told apart by the outputs declared in config.pbtxt:

* ``python_vit`` (python_model_repository): processor + model in one step; outputs are
  the model's own output names (``last_hidden_state``, ``pooler_output``).
* ``preprocessing`` (ensemble_model_repository): processor only; the one output is
  ``pixel_values``, fed to the ONNX model by the ensemble.

config.pbtxt is the source of truth: tensor names and dtypes, the checkpoint (hub id or
local directory), its revision and the image-processor backend come from it. The file
depends on numpy, torch, transformers and Triton's ``triton_python_backend_utils`` only,
so the repository runs unchanged in NVIDIA's container.
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoImageProcessor, AutoModel

IMAGE = "image"
PIXEL_VALUES = "pixel_values"
STANDIN_MARKER = "HF_TRITON_STANDIN.json"
# A side longer than this is no photo; refuse before the processor allocates for it.
MAX_SIDE_PX = 8192


def _invalid(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        checkpoint = params.get("checkpoint")
        if not checkpoint:
            raise pb_utils.TritonModelException(
                f"{self.name}: config.pbtxt needs parameter 'checkpoint' (hub id or directory)"
            )
        revision = params.get("revision") or None
        processor_kwargs = {}
        if params.get("image_processor_backend"):
            processor_kwargs["backend"] = params["image_processor_backend"]
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

        if args["model_instance_kind"] == "GPU":
            if not torch.cuda.is_available():
                raise pb_utils.TritonModelException(
                    f"{self.name}: instance is KIND_GPU but torch sees no CUDA device"
                )
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")

        self.processor = AutoImageProcessor.from_pretrained(
            checkpoint, revision=revision, **processor_kwargs
        )
        self.model = None
        if self.output_names != [PIXEL_VALUES]:
            self.model = AutoModel.from_pretrained(checkpoint, revision=revision)
            self.model.to(self.device).eval()
            self._check_outputs()

        weights = "pretrained weights"
        if os.path.exists(os.path.join(checkpoint, STANDIN_MARKER)):
            weights = "OFFLINE STAND-IN, RANDOM WEIGHTS: outputs are not meaningful"
        role = "processor + model" if self.model is not None else "processor only"
        pb_utils.Logger.log_info(
            f"{self.name}: {role}, checkpoint {checkpoint} ({weights}), "
            f"{type(self.processor).__name__}, device {self.device}"
        )

    def _check_outputs(self):
        """Fail at load time, not on the first request, when config and model disagree."""
        size = self.processor.size
        height, width = size.get("height", 224), size.get("width", 224)
        with torch.inference_mode():
            out = self.model(pixel_values=torch.zeros(1, 3, height, width, device=self.device))
        missing = [n for n in self.output_names if getattr(out, n, None) is None]
        if missing:
            available = [k for k, v in out.items() if v is not None]
            raise pb_utils.TritonModelException(
                f"{self.name}: config.pbtxt declares outputs {missing} that "
                f"{type(self.model).__name__} does not produce; it produces {available}"
            )

    def _validate(self, images):
        """An error message for a bad image batch, or None. Triton has checked dtype and rank."""
        _, height, width, _ = images.shape
        if height < 1 or width < 1:
            return f"input '{IMAGE}': expected H x W x 3 with H, W >= 1, got {images.shape[1:]}"
        if max(height, width) > MAX_SIDE_PX:
            return (
                f"input '{IMAGE}': image of {height} x {width} exceeds the {MAX_SIDE_PX} px "
                "limit per side; resize it before sending"
            )
        if not np.isfinite(images).all():
            return f"input '{IMAGE}': pixel values must be finite, got NaN or Inf"
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 255.0:
            return (
                f"input '{IMAGE}': pixel values must be in [0, 255] (RGB, H x W x 3), "
                f"got range [{low:g}, {high:g}]"
            )
        return None

    def execute(self, requests):
        responses = [None] * len(requests)
        images, owners = [], []
        for i, request in enumerate(requests):
            batch = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy()
            error = self._validate(batch)
            if error:
                responses[i] = _invalid(error)
                continue
            images.extend(batch)
            owners.append((i, len(batch)))
        if not images:
            return responses

        # All images of all requests in one processor call and one forward pass.
        pixel_values = self.processor(
            images=images, return_tensors="np", input_data_format="channels_last"
        )[PIXEL_VALUES]
        if self.model is None:
            outputs = {PIXEL_VALUES: pixel_values}
        else:
            with torch.inference_mode():
                out = self.model(pixel_values=torch.from_numpy(pixel_values).to(self.device))
            outputs = {n: getattr(out, n).float().cpu().numpy() for n in self.output_names}

        start = 0
        for i, count in owners:
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        name,
                        np.ascontiguousarray(
                            outputs[name][start : start + count].astype(self.output_dtypes[name])
                        ),
                    )
                    for name in self.output_names
                ]
            )
            start += count
        return responses
