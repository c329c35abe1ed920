"""Triton Python-backend model: a Hugging Face image processor, optionally followed by its model.

The same file serves two roles, told apart by the outputs declared in config.pbtxt:

* ``python_vit`` (python_model_repository): processor + model in one step; outputs are
  the model's own output names (``last_hidden_state``, ``pooler_output``; ``logits`` for
  image classification).
* ``preprocessing`` (ensemble_model_repository): processor only; the one output is
  ``pixel_values``, fed to the ONNX model by the ensemble.

Images arrive in one of three optional inputs, exactly one per request:
``image`` (FP32 H x W x 3, 0..255: the tutorial's contract), ``image_uint8`` (UINT8, 4x fewer
bytes) or ``image_bytes`` (BYTES, one encoded JPEG/PNG per batch item; sizes may differ).

Preprocessing has two paths: ``reference`` is the checkpoint's Hugging Face image processor;
``vectorized`` resizes each image with the same PIL filter, then rescales and normalises the
whole batch in one numpy expression. It is used when the processor is a plain
resize/rescale/normalise one (ViT, DeiT, ...) and matches the reference to ~1e-6.

config.pbtxt is the source of truth: tensor names and dtypes, the checkpoint (hub id or
local directory), its revision, the image-processor backend and the preprocessing path. The file
depends on numpy, torch, transformers and Triton's ``triton_python_backend_utils`` only,
so the repository runs unchanged in NVIDIA's container.
"""

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import transformers
import triton_python_backend_utils as pb_utils
from PIL import Image
from transformers import AutoImageProcessor

IMAGE = "image"
IMAGE_UINT8 = "image_uint8"
IMAGE_BYTES = "image_bytes"
IMAGE_INPUTS = (IMAGE, IMAGE_UINT8, IMAGE_BYTES)
PIXEL_VALUES = "pixel_values"
#: The model class per task (same table as the build command's).
AUTO_CLASSES = {
    "image-feature-extraction": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
}
STANDIN_MARKER = "HF_TRITON_STANDIN.json"
# A side longer than this is no photo; refuse before the processor allocates for it.
MAX_SIDE_PX = 8192


def _quantize_int8(model):
    """Dynamic int8, per-channel weights; the feed-forward output projections (fed by GELU's
    outliers) stay fp32. The same rule as hf_triton.precision, whose gate admitted it."""
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    spec = {
        name: qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not (name.endswith("output.dense") and "attention" not in name)
    }
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def _apply_precision(name, model, precision, device):
    """The model in the requested precision; the input dtype it expects."""
    if precision == "fp32":
        return model, torch.float32
    if precision == "bf16":
        return model.to(torch.bfloat16), torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise pb_utils.TritonModelException(f"{name}: precision fp16 needs a KIND_GPU instance")
        return model.to(torch.float16), torch.float16
    if precision == "int8":
        if device.type != "cpu":
            raise pb_utils.TritonModelException(f"{name}: precision int8 runs on KIND_CPU only")
        return _quantize_int8(model), torch.float32
    raise pb_utils.TritonModelException(
        f"{name}: precision must be fp32, bf16, fp16 or int8, got {precision!r}"
    )


class BadInput(ValueError):
    """A request the model cannot serve; its message goes back to the client as a 400."""


def _invalid(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


def _check_size(name, height, width):
    if height < 1 or width < 1:
        raise BadInput(f"input '{name}': expected H x W x 3 with H, W >= 1, got {height} x {width}")
    if max(height, width) > MAX_SIDE_PX:
        raise BadInput(
            f"input '{name}': image of {height} x {width} exceeds the {MAX_SIDE_PX} px "
            "limit per side; resize it before sending"
        )


def _decode(name, index, data):
    """One encoded image (JPEG, PNG, ...) -> uint8 H x W x 3."""
    if len(data) == 0:
        raise BadInput(f"input '{name}'[{index}]: empty; expected encoded image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(f"{name}[{index}]", img.height, img.width)
            return np.asarray(img.convert("RGB"))
    except BadInput:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadInput(
            f"input '{name}'[{index}]: not a decodable image ({type(e).__name__}: {e})"
        ) from e


class VectorizedImageProcessor:
    """Resize per image (PIL, the processor's filter, in threads: PIL releases the GIL),
    then one affine map for the whole batch, channel-first so each loop is contiguous."""

    @classmethod
    def supports(cls, processor):
        size = processor.size or {}
        return (
            bool(getattr(processor, "do_resize", False))
            and bool(size.get("height"))
            and bool(size.get("width"))
            and not getattr(processor, "do_center_crop", False)
            and not getattr(processor, "do_pad", False)
        )

    def __init__(self, processor):
        self.size = (int(processor.size["width"]), int(processor.size["height"]))
        self.resample = Image.Resampling(int(processor.resample))
        scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        mean = np.asarray(processor.image_mean if processor.do_normalize else 0.0, np.float32)
        std = np.asarray(processor.image_std if processor.do_normalize else 1.0, np.float32)
        # ((x * scale) - mean) / std == x * (scale / std) - mean / std
        self.gain = np.broadcast_to(scale / std, (3,)).astype(np.float32).reshape(1, 3, 1, 1)
        self.bias = np.broadcast_to(-mean / std, (3,)).astype(np.float32).reshape(1, 3, 1, 1)
        self.pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))

    def _resize(self, image):
        return np.asarray(Image.fromarray(image).resize(self.size, self.resample))

    def __call__(self, images):
        if len(images) > 1:
            resized = np.stack(list(self.pool.map(self._resize, images)))
        else:
            resized = self._resize(images[0])[None]
        pixels = resized.transpose(0, 3, 1, 2).astype(np.float32)
        pixels *= self.gain
        pixels += self.bias
        return pixels


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
        task = params.get("task", "image-feature-extraction")
        if task not in AUTO_CLASSES:
            raise pb_utils.TritonModelException(
                f"{self.name}: task {task!r} is not one of {sorted(AUTO_CLASSES)}"
            )
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
        path = params.get("preprocessing", "vectorized")
        if path not in ("vectorized", "reference"):
            raise pb_utils.TritonModelException(
                f"{self.name}: parameter 'preprocessing' must be 'vectorized' or 'reference', "
                f"got {path!r}"
            )
        self.fast = None
        if path == "vectorized" and VectorizedImageProcessor.supports(self.processor):
            self.fast = VectorizedImageProcessor(self.processor)
        self.inputs = [i["name"] for i in config["input"] if i["name"] in IMAGE_INPUTS]
        self.model = None
        if self.output_names != [PIXEL_VALUES]:
            auto = getattr(transformers, AUTO_CLASSES[task])
            model = auto.from_pretrained(checkpoint, revision=revision).to(self.device).eval()
            self.model, self.input_dtype = _apply_precision(
                self.name, model, params.get("precision", "fp32"), self.device
            )
            self._check_outputs()

        weights = "pretrained weights"
        if os.path.exists(os.path.join(checkpoint, STANDIN_MARKER)):
            weights = "OFFLINE STAND-IN, RANDOM WEIGHTS: outputs are not meaningful"
        role = "processor only"
        if self.model is not None:
            role = f"processor + model in {params.get('precision', 'fp32')}"
        pb_utils.Logger.log_info(
            f"{self.name}: {role}, checkpoint {checkpoint} ({weights}), "
            f"{type(self.processor).__name__} ({'vectorized' if self.fast else 'reference'}), "
            f"device {self.device}"
        )

    def _check_outputs(self):
        """Fail at load time, not on the first request, when config and model disagree."""
        size = self.processor.size
        height, width = size.get("height", 224), size.get("width", 224)
        with torch.inference_mode():
            pixels = torch.zeros(1, 3, height, width, device=self.device, dtype=self.input_dtype)
            out = self.model(pixel_values=pixels)
        missing = [n for n in self.output_names if getattr(out, n, None) is None]
        if missing:
            available = [k for k, v in out.items() if v is not None]
            raise pb_utils.TritonModelException(
                f"{self.name}: config.pbtxt declares outputs {missing} that "
                f"{type(self.model).__name__} does not produce; it produces {available}"
            )

    def _images(self, request):
        """The request's images as a list of H x W x 3 arrays (uint8, or float32 0..255)."""
        given = [
            (name, tensor)
            for name in self.inputs
            if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None
        ]
        if len(given) != 1:
            raise BadInput(
                f"expected exactly one of the inputs {self.inputs}, "
                f"got {[name for name, _ in given] or 'none'}"
            )
        name, tensor = given[0]
        if name == IMAGE_BYTES:
            items = tensor.as_numpy().reshape(-1)
            return [_decode(name, i, bytes(item)) for i, item in enumerate(items)]
        images = tensor.as_numpy()
        _check_size(name, images.shape[1], images.shape[2])
        if name == IMAGE:
            if not np.isfinite(images).all():
                raise BadInput(f"input '{name}': pixel values must be finite, got NaN or Inf")
            low, high = float(images.min()), float(images.max())
            if low < 0.0 or high > 255.0:
                raise BadInput(
                    f"input '{name}': pixel values must be in [0, 255] (RGB, H x W x 3), "
                    f"got range [{low:g}, {high:g}]"
                )
        return list(images)

    def _preprocess(self, images):
        if self.fast is not None:
            # uint8 for PIL; float inputs are whole numbers 0..255 in practice (the
            # reference processor rejects anything else), so rounding loses nothing.
            return self.fast(
                [im if im.dtype == np.uint8 else np.rint(im).astype(np.uint8) for im in images]
            )
        return self.processor(
            images=images, return_tensors="np", input_data_format="channels_last"
        )[PIXEL_VALUES]

    def execute(self, requests):
        responses = [None] * len(requests)
        images, owners = [], []
        for i, request in enumerate(requests):
            try:
                batch = self._images(request)
            except BadInput as e:
                responses[i] = _invalid(str(e))
                continue
            images.extend(batch)
            owners.append((i, len(batch)))
        if not images:
            return responses

        # All images of all requests in one preprocessing call and one forward pass.
        pixel_values = self._preprocess(images)
        if self.model is None:
            outputs = {PIXEL_VALUES: pixel_values}
        else:
            with torch.inference_mode():
                pixels = torch.from_numpy(pixel_values).to(self.device, self.input_dtype)
                out = self.model(pixel_values=pixels)
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
