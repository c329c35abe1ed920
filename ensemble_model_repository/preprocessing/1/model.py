"""Triton Python-backend model: a Hugging Face image processor, optionally followed by its model.

The same file serves two roles, told apart by the outputs declared in config.pbtxt:

* ``python_vit`` (python_model_repository): processor + model in one step; outputs are
  the model's own output names (``last_hidden_state``, ``pooler_output``; ``logits`` for
  image classification; ``image_embeds`` for an image-text model's image tower, CLIP's or
  SigLIP's, L2-normalised).
* ``preprocessing`` (ensemble_model_repository): processor only; the output is
  ``pixel_values``, fed to the ONNX model by the ensemble (object detection adds each image's
  ``target_size``, its height and width as sent);
* ``postprocessing`` (object detection's third ensemble step): inputs model.onnx's ``logits``
  and ``pred_boxes`` and the ``target_size``; output ``detections``.

Object detection outputs ``detections``: one JSON list per image, what transformers'
object-detection pipeline returns (``score``, ``label``, ``box`` with integer ``xmin``,
``ymin``, ``xmax``, ``ymax`` in the image's own pixels), from the image processor's own
``post_process_object_detection``. ``threshold`` (default 0.5, the pipeline's) and ``top_k``
(0: all; else the k best, highest first) are config parameters a request may override with
parameters of the same names.

Images arrive in one of three optional inputs, exactly one per request:
``image`` (FP32 H x W x 3, 0..255: the tutorial's contract; values are rounded to whole
numbers, as 8-bit images are), ``image_uint8`` (UINT8, 4x fewer bytes) or ``image_bytes``
(BYTES, one encoded JPEG/PNG/... per batch item; sizes may differ), decoded exactly as
``transformers.image_utils.load_image`` decodes a file (EXIF orientation applied, then RGB).

Preprocessing has two paths. ``reference`` is the checkpoint's Hugging Face image processor.
``vectorized`` runs the processor's own geometry (resize, crop) per image in threads, then
its rescale and normalisation as one affine map over the whole batch; it checks itself
against the reference when the model loads and falls back to it when they differ.

Memory is bounded before anything is decoded: a side limit and a pixel budget per request
(``max_side_px``, ``max_request_megapixels``, checked on the headers), and images are decoded
and resized as a pixel budget allows (``max_decode_megapixels``), so a batch never holds more
full-size images than that, however many requests it gathers.

config.pbtxt is the source of truth: tensor names and dtypes, the checkpoint (hub id or
local directory), its revision, the precision, the preprocessing path and the budgets.
Depends on numpy, torch, transformers, pillow, Triton's ``triton_python_backend_utils`` and
``hf_common.py`` beside it, so the repository runs unchanged in NVIDIA's container.
"""

import contextlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import hf_common
import numpy as np
import triton_python_backend_utils as pb_utils
from hf_common import (
    IMAGE,
    IMAGE_BYTES,
    IMAGE_INPUTS,
    BadInput,
    ModelError,
    open_image,
)
from PIL import Image, ImageOps

PIXEL_VALUES = "pixel_values"
TARGET_SIZE = "target_size"
DETECTIONS = "detections"
#: Pixels decoded and being resized at once, across worker threads (memory: ~12 bytes each).
MAX_DECODE_MEGAPIXELS = 48
#: The vectorised path must match the processor this closely (normalised pixel values).
SELF_CHECK_ATOL = 1e-4


def decode(name, index, data):
    """Encoded bytes -> an RGB PIL image, as ``transformers.image_utils.load_image`` makes it:
    EXIF orientation applied, then converted to RGB. The processor reads the PIL image as is,
    so a photo is held decoded once, and only while it is being resized."""
    img = open_image(name, index, data)
    try:
        img.load()
        # In place, and converted only if not RGB yet: load_image's pixels without its copies
        # of a photo that may be 100 MB decoded.
        ImageOps.exif_transpose(img, in_place=True)
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # truncated or corrupt data shows only when decoding
        raise BadInput(
            f"input '{name}'[{index}]: not a decodable image ({type(e).__name__}: {e})"
        ) from e


def process(processor, images, **kwargs):
    """``processor`` on RGB PIL images or uint8 H x W x 3 arrays (channels last, even for a
    1 x 1 x 3 array)."""
    out = processor(images=images, input_data_format="channels_last", return_tensors="np", **kwargs)
    return out[PIXEL_VALUES]


class Pending:
    """An image whose size is known (from its header, or its array) and whose pixels come
    from ``load()``, each time anew: decoding waits for the image's turn under the
    :class:`PixelBudget`, and nothing keeps the decoded pixels once they are resized."""

    __slots__ = ("load", "pixels", "settings", "size")

    def __init__(self, pixels, load):
        self.pixels = pixels
        self.load = load
        self.size = None  # (height, width) once loaded: where detected boxes are mapped to
        self.settings = None  # object detection: the request's threshold and top_k


class PixelBudget:
    """At most ``limit`` pixels decoded and being resized at once, across worker threads (an
    image larger than the limit runs alone). Bounds memory whatever a batch holds."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels):
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


class VectorizedImageProcessor:
    """The processor's geometry per image (in threads: PIL releases the GIL), then its
    rescale and normalisation as one affine map for the whole batch.

    The affine map is measured, not assumed: processing two constant images (0 and 255)
    gives each channel's gain and bias, whatever rescale/normalise chain the processor has.
    """

    def __init__(self, processor):
        self.processor = processor
        self.direct = _plain_resize(processor)
        zero = self._geometry(np.zeros((64, 64, 3), np.uint8))
        if zero.dtype != np.uint8:
            raise ValueError(f"{type(processor).__name__} changes pixel values during geometry")
        full = process(processor, [np.full((64, 64, 3), 255, np.uint8)])
        none = process(processor, [np.zeros((64, 64, 3), np.uint8)])
        low = none[0, :, 0, 0].astype(np.float64)
        high = full[0, :, 0, 0].astype(np.float64)
        self.gain = ((high - low) / 255.0).astype(np.float32).reshape(-1, 1, 1)  # per channel
        self.bias = low.astype(np.float32).reshape(-1, 1, 1)
        self.pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))

    def _geometry(self, image):
        if self.direct is not None:  # the processor's own PIL resize, without its conversions
            size, resample = self.direct
            pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
            return np.asarray(pil.resize(size, resample)).transpose(2, 0, 1)
        out = process(self.processor, [image], do_rescale=False, do_normalize=False)
        return np.asarray(out[0])

    def __call__(self, images, budget=None):
        """``images``: :class:`Pending` images, decoded and resized in worker threads as the
        ``budget`` allows."""
        budget = budget or PixelBudget(float("inf"))

        def resize(item):
            with budget.hold(item.pixels):
                image = item.load()
                item.size = _height_width(image)
                geometry = self._geometry(image)
            # Normalised here, in the worker, not after the batch is stacked: the same
            # element-wise float32 operations, and the serving thread is left only the stack.
            pixels = geometry.astype(np.float32, order="C")
            pixels *= self.gain
            pixels += self.bias
            return pixels

        # A lone image is resized here: no thread hand-off. expand_dims, not [None]: the batch
        # axis gets the stride a stacked batch has, not 0 (torch.compile guards on strides:
        # a stride of 0 compiled a third graph on the first lone image, ~9 s of ViT-base).
        if len(images) == 1:
            return np.expand_dims(resize(images[0]), 0)
        return np.stack(list(self.pool.map(resize, images)))


def _height_width(image):
    """(height, width) of a PIL image or an H x W x 3 array, as loaded (EXIF applied)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def _plain_resize(processor):
    """(size, filter) when the processor's geometry is only a resize to a fixed height x
    width with PIL (ViT-like): then PIL can do it directly. None otherwise."""
    try:  # transformers >= 5 (older releases keep the general path)
        from transformers.image_processing_backends import PilBackend
    except ImportError:
        return None
    size = processor.size or {}
    kind = type(processor)
    plain = (
        getattr(processor, "do_resize", False)
        and size.get("height")
        and size.get("width")
        and not getattr(processor, "do_center_crop", False)
        and not getattr(processor, "do_pad", False)
        and kind.resize is PilBackend.resize
        and kind._preprocess is PilBackend._preprocess
        and getattr(processor, "resample", None) is not None
    )
    if not plain:
        return None
    return (int(size["width"]), int(size["height"])), Image.Resampling(int(processor.resample))


def _self_check(fast, processor):
    """Max |vectorised - reference| on a few awkward sizes; None when the two disagree in shape."""
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(37, 53), (480, 640), (224, 224), (301, 199), (1, 1)]
    ]
    want = process(processor, images)
    got = fast([Pending(image.size // 3, lambda image=image: image) for image in images])
    if got.shape != want.shape:
        return None
    return float(np.max(np.abs(got - want)))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        try:
            self._initialize(args, config)
        except ModelError as e:
            raise pb_utils.TritonModelException(f"{self.name}: {e}") from e

    def _initialize(self, args, config):
        import transformers  # here, not at the top: Triton also imports model.py just to
        # auto-complete its config, in a process of its own that never serves

        params = hf_common.parameters(config)
        checkpoint = params.get("checkpoint")
        if not checkpoint:
            raise ModelError("config.pbtxt needs parameter 'checkpoint' (hub id or directory)")
        revision = params.get("revision") or None
        task = params.get("task", "image-feature-extraction")
        if task not in hf_common.IMAGE_TASKS:
            raise ModelError(f"task {task!r} is not an image task of {list(hf_common.IMAGE_TASKS)}")
        self.max_side, self.max_request_pixels = hf_common.image_limits(params)
        self.budget = PixelBudget(
            int(float(params.get("max_decode_megapixels") or MAX_DECODE_MEGAPIXELS) * 1e6)
        )
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        self.device = hf_common.device(
            args["model_instance_kind"], args["model_instance_device_id"]
        )
        local = hf_common.local_checkpoint(checkpoint, revision)
        backend = params.get("image_processor_backend") or None
        self.processor = transformers.AutoImageProcessor.from_pretrained(
            local, **({"backend": backend} if backend else {})
        )
        path = params.get("preprocessing", "vectorized")
        if path not in ("vectorized", "reference"):
            raise ModelError(
                f"parameter 'preprocessing' must be 'vectorized' or 'reference', got {path!r}"
            )
        self.fast = None
        why = "configured"
        if path == "vectorized":
            self.fast, why = self._vectorized()
        self.inputs = [i["name"] for i in config["input"] if i["name"] in IMAGE_INPUTS]
        self.model = None
        self.compile_s = None  # seconds torch.compile took, when the config asks for it
        self.precision = params.get("precision", "fp32")
        self.postprocess_only = "logits" in [i["name"] for i in config["input"]]
        self.detection = None
        if task == "object-detection":
            self.detection = {
                "threshold": _threshold(params.get("threshold") or "0.5", ModelError),
                "top_k": _top_k(params.get("top_k") or "0", ModelError),
            }
            self.id2label = transformers.AutoConfig.from_pretrained(local).id2label
        if self.postprocess_only:
            if self.detection is None:
                raise ModelError("a logits input needs task object-detection")
        elif not set(self.output_names) <= {PIXEL_VALUES, TARGET_SIZE}:
            auto = getattr(transformers, hf_common.MODEL_CLASSES[task])
            model = auto.from_pretrained(local).to(self.device).eval()
            if task == hf_common.ZERO_SHOT:  # an image-text model's image tower
                model = hf_common.embedding_tower(model, "image")
            self.model, self.input_dtype = hf_common.apply_precision(
                model, self.precision, self.device
            )
            self.threads = hf_common.set_torch_threads(params)
            if hf_common.wants_compile(params, self.precision, self.device):
                self.model, self.compile_s = hf_common.compile_model(self.model, self._warm_up)
            self._check_outputs()

        role = "processor only"
        if self.model is not None:
            role = (
                f"processor + {hf_common.describe_model(self.model, self.compile_s)} in "
                f"{self.precision}, {self.threads} torch threads"
            )
        if self.postprocess_only:
            role = "postprocessing: logits, boxes -> detections"
        if self.detection is not None:
            role += f", threshold {self.detection['threshold']}, top_k {self.detection['top_k']}"
        pb_utils.Logger.log_info(
            f"{self.name}: {role}, checkpoint {checkpoint} ({hf_common.weights_note(local)}), "
            f"{type(self.processor).__name__} "
            f"({'vectorized' if self.fast else 'reference'}: {why}), device {self.device}"
        )

    def _vectorized(self):
        """The vectorised path if it reproduces the processor here; else None and why not."""
        try:
            fast = VectorizedImageProcessor(self.processor)
        except ValueError as e:
            return None, f"not applicable ({e})"
        diff = _self_check(fast, self.processor)
        if diff is None or diff > SELF_CHECK_ATOL:
            return None, f"self-check against the processor failed (max |diff| {diff})"
        return fast, f"self-check max |diff| {diff:.1e}"

    def _warm_up(self, module, batch):
        """``module`` on ``batch`` copies of a small black image, as _run feeds it."""
        import torch

        probe = process(self.processor, [np.zeros((64, 64, 3), np.uint8)] * batch)
        module(pixel_values=torch.from_numpy(probe).to(self.device, self.input_dtype))

    def _check_outputs(self):
        """Fail at load time, not on the first request, when config and model disagree."""
        import torch

        probe = np.zeros((64, 64, 3), np.uint8)
        with torch.inference_mode():  # the input too, as _run makes it (a compiled model's
            # guards tell inference tensors from others: fp32 compiled a graph for this probe)
            pixels = torch.from_numpy(process(self.processor, [probe]))
            out = self.model(pixel_values=pixels.to(self.device, self.input_dtype))
        wanted = ["logits", "pred_boxes"] if self.detection is not None else self.output_names
        missing = [n for n in wanted if getattr(out, n, None) is None]
        if missing:
            available = [k for k, v in out.items() if v is not None]
            raise ModelError(
                f"config.pbtxt declares outputs {missing} that "
                f"{hf_common.describe_model(self.model)} does not produce; it produces {available}"
            )

    def _items(self, request):
        """What one request brings: its images, each with the request's detection settings,
        or (post-processing step) each image's logits, boxes and size."""
        if self.postprocess_only:
            settings = self._settings(request)

            def get(name):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            logits, boxes, sizes = get("logits"), get("pred_boxes"), get(TARGET_SIZE)
            return [
                (logits[j], boxes[j], tuple(int(v) for v in sizes[j]), settings)
                for j in range(len(logits))
            ]
        images = self._images(request)
        if self.detection is not None:
            settings = self._settings(request)
            for image in images:
                image.settings = settings
        return images

    def _settings(self, request):
        """threshold and top_k: the request's parameters, else the config's."""
        given = hf_common.request_parameters(request)
        return {
            "threshold": _threshold(given.get("threshold", self.detection["threshold"]), BadInput),
            "top_k": _top_k(given.get("top_k", self.detection["top_k"]), BadInput),
        }

    def _images(self, request):
        """The request's images as :class:`Pending` ones: a PIL image once decoded (bytes), or
        a uint8 H x W x 3 array."""
        name, tensor = hf_common.one_input(request, self.inputs)
        images = tensor.as_numpy()
        sizes = hf_common.check_images(name, images, self.max_side, self.max_request_pixels)
        if name == IMAGE_BYTES:
            return [
                Pending(h * w, lambda i=i, data=bytes(data): decode(name, i, data))
                for i, (data, (h, w)) in enumerate(zip(images.flat, sizes, strict=True))
            ]
        if name == IMAGE:
            # 8-bit pixels, as every image processor expects them (a [0, 1] float image would
            # otherwise be rescaled by one path and not by the other).
            return [
                Pending(im.size // 3, lambda im=im: np.rint(im).astype(np.uint8)) for im in images
            ]
        return [Pending(im.size // 3, lambda im=im: im) for im in images]

    def _preprocess(self, images):
        """pixel_values for the batch, and each image's (height, width) as loaded."""
        if self.fast is not None:
            return self.fast(images, self.budget), [item.size for item in images]
        # Reference path: the processor itself, one image at a time.
        pixels = []
        for item in images:
            image = item.load()
            item.size = _height_width(image)
            pixels.append(process(self.processor, [image]))
        return np.concatenate(pixels), [item.size for item in images]

    def _run(self, items):
        if self.postprocess_only:
            return self._detections(items)
        pixel_values, sizes = self._preprocess(items)
        if self.model is None:
            out = {PIXEL_VALUES: pixel_values}
            if TARGET_SIZE in self.output_names:
                out[TARGET_SIZE] = np.array(sizes, dtype=np.int64).reshape(-1, 2)
            return out
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(pixel_values).to(self.device, self.input_dtype)
            out = self.model(pixel_values=pixels)
        if self.detection is not None:
            logits = out.logits.float().cpu().numpy()
            boxes = out.pred_boxes.float().cpu().numpy()
            return self._detections(
                [(logits[j], boxes[j], sizes[j], item.settings) for j, item in enumerate(items)]
            )
        return {n: getattr(out, n).float().cpu().numpy() for n in self.output_names}

    def _detections(self, rows):
        """The processor's post_process_object_detection per image, formatted as transformers'
        object-detection pipeline formats it; then the top_k best, when asked."""
        out = np.empty((len(rows), 1), dtype=object)
        for j, (logits, boxes, size, settings) in enumerate(rows):
            (found,) = hf_common.post_process_detections(
                self.processor, logits[None], boxes[None], settings["threshold"], [size]
            )
            detections = hf_common.pipeline_detections(found, self.id2label, settings["top_k"])
            out[j, 0] = json.dumps(detections).encode("utf-8")
        return {DETECTIONS: out}

    def execute(self, requests):
        return hf_common.respond(requests, self._items, self._run, self.output_dtypes)


def _threshold(value, error):
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise error(f"parameter threshold {value!r}: a score between 0 and 1")
    return threshold


def _top_k(value, error):
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        top_k = -1
    if top_k < 0 or str(top_k) != str(value).strip():
        raise error(f"parameter top_k {value!r}: a whole number >= 0 (0: every detection)")
    return top_k
