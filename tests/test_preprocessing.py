"""model.py's image decoding and vectorised preprocessing against transformers' own
(``load_image`` and the families' image processors), without a server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_utils import load_image

from hf_triton.bench import load_model_py
from hf_triton.serve import DEFAULT_REPOSITORIES

from conftest import PHOTO

#: Max |vectorised - reference| on normalised pixel values (range about [-2, 2]).
PIXEL_ATOL = 1e-5


@pytest.fixture(scope="module")
def model_py():
    return load_model_py(DEFAULT_REPOSITORIES[0] / "python_vit" / "1" / "model.py")


def _processors():
    """Each processor class with the settings its family's hub checkpoints use."""
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        ConvNextImageProcessor,
        DeiTImageProcessor,
        ViTImageProcessor,
    )

    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    return {
        "vit": ViTImageProcessor(),
        "vit-imagenet-bicubic": ViTImageProcessor(**imagenet, resample=3),
        "vit-non-square": ViTImageProcessor(size={"height": 96, "width": 128}),
        "deit-resize-crop": DeiTImageProcessor(),
        "convnext-crop-pct": ConvNextImageProcessor(size={"shortest_edge": 224}),
        "clip-shortest-edge-crop": CLIPImageProcessor(),
        "bit-dinov2": BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **imagenet
        ),
    }


@pytest.mark.parametrize("kind", list(_processors()))
def test_vectorized_matches_the_processor(model_py, tmp_path, kind):
    _processors()[kind].save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    fast = model_py.VectorizedImageProcessor(processor)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(600, 512), (31, 45), (224, 224), (1, 1), (3, 3), (300, 1000)]
    ]
    want = processor(images=images, return_tensors="np", input_data_format="channels_last")
    got = fast([model_py.Pending(image.size // 3, lambda image=image: image) for image in images])
    assert got.dtype == np.float32 and got.shape == want["pixel_values"].shape
    assert np.max(np.abs(got - want["pixel_values"])) <= PIXEL_ATOL
    # A lone image takes the path without threads; it must be the same pixels, laid out as a
    # C-contiguous batch of one (what Triton's tensors and torch.from_numpy are handed) with
    # the strides of a stacked batch: numpy calls a batch axis of stride 0 contiguous, but
    # torch.compile's guards tell the two apart and compiled a graph for it while serving.
    for j, image in enumerate(images[:2]):
        one = fast([model_py.Pending(image.size // 3, lambda image=image: image)])
        assert one.flags["C_CONTIGUOUS"] and np.array_equal(one, got[j : j + 1])
        assert one.strides == np.empty_like(one, order="C").strides == got[j : j + 1].strides


def test_processor_the_vectorized_path_cannot_follow_is_refused(model_py, tmp_path):
    """EfficientNet divides by std again after normalising (include_top): the geometry-only
    pass is not 8-bit, so the fast path refuses it and model.py uses the processor."""
    from transformers import EfficientNetImageProcessor

    EfficientNetImageProcessor().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    with pytest.raises(ValueError, match="changes pixel values during geometry"):
        model_py.VectorizedImageProcessor(processor)


def test_self_check_catches_a_disagreeing_fast_path(model_py, tmp_path):
    from transformers import ViTImageProcessor

    ViTImageProcessor().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    fast = model_py.VectorizedImageProcessor(processor)
    assert model_py._self_check(fast, processor) <= PIXEL_ATOL
    fast.bias = fast.bias + 0.01  # a fast path that drifted from the processor
    assert model_py._self_check(fast, processor) > model_py.SELF_CHECK_ATOL


# -- decoding as transformers.image_utils.load_image does ---------------------------------------


def _photo() -> Image.Image:
    with Image.open(PHOTO) as img:
        return img.convert("RGB").resize((120, 90))


def _encoded() -> dict[str, bytes]:
    """Odd encodings of a real photo, each as a file's bytes."""
    photo = _photo()
    out = {}

    def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out["exif-rotated-jpeg"] = save(photo, "JPEG", exif=exif.tobytes())
    gray16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    out["16-bit-png"] = save(Image.fromarray(gray16), "PNG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    out["rgba-png"] = save(rgba, "PNG")
    out["palette-png"] = save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    out["cmyk-jpeg"] = save(photo.convert("CMYK"), "JPEG")
    out["grayscale-jpeg"] = save(photo.convert("L"), "JPEG")
    out["webp"] = save(photo, "WEBP")
    return out


ENCODED = _encoded()


@pytest.mark.parametrize("kind", list(ENCODED))
def test_decoding_matches_load_image(model_py, tmp_path, kind):
    path = tmp_path / "image"
    path.write_bytes(ENCODED[kind])
    want = np.asarray(load_image(str(path)))
    height, width = model_py.hf_common.image_size("image_bytes", 0, ENCODED[kind], 8192)
    assert height * width == want.shape[0] * want.shape[1]  # before EXIF rotation
    got = np.asarray(model_py.decode("image_bytes", 0, ENCODED[kind]))
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if kind == "exif-rotated-jpeg":
        assert got.shape[:2] == (120, 90)  # portrait after applying the orientation


def test_corrupt_and_empty_bytes_are_bad_input(model_py):
    with pytest.raises(model_py.BadInput, match=r"'image_bytes'\[2\]: not a decodable image"):
        model_py.hf_common.image_size("image_bytes", 2, b"\xff\xd8 not really a jpeg", 8192)
    with pytest.raises(model_py.BadInput, match=r"'image_bytes'\[0\]: empty"):
        model_py.hf_common.image_size("image_bytes", 0, b"", 8192)
    jpeg = ENCODED["exif-rotated-jpeg"]
    truncated = jpeg[: len(jpeg) * 2 // 3]  # the header survives, the pixels do not
    assert model_py.hf_common.image_size("image_bytes", 1, truncated, 8192) == (90, 120)
    with pytest.raises(model_py.BadInput, match=r"'image_bytes'\[1\]: not a decodable image"):
        model_py.decode("image_bytes", 1, truncated)


def test_oversized_image_refused_before_decoding(model_py):
    huge = io.BytesIO()
    Image.new("RGB", (9000, 10), "white").save(huge, format="PNG")
    with pytest.raises(model_py.BadInput, match="exceeds the 8192 px limit per side"):
        model_py.hf_common.image_size("image_bytes", 0, huge.getvalue(), 8192)
