"""The vectorised preprocessing path against the Hugging Face image processor (the reference)."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
from transformers import AutoImageProcessor

from hf_triton.serve import DEFAULT_REPOSITORIES

#: Max |vectorised - reference| on normalised pixel values (range about [-1, 1]).
PIXEL_ATOL = 1e-5


def load_model_py():
    """Import python_vit/1/model.py outside Triton (pb_utils is only used at serve time)."""
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("pb_utils_unused"))
    path = DEFAULT_REPOSITORIES[0] / "python_vit" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("python_vit_model", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_py():
    return load_model_py()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # ViT in21k: mean/std 0.5, bilinear
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3},
        {"size": {"height": 96, "width": 128}},
    ],
    ids=["vit", "imagenet-bicubic", "non-square"],
)
def test_vectorized_matches_hf_processor(model_py, tmp_path, kwargs):
    from transformers import ViTImageProcessor

    ViTImageProcessor(**kwargs).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert model_py.VectorizedImageProcessor.supports(processor)
    fast = model_py.VectorizedImageProcessor(processor)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(600, 512), (31, 45), (224, 224), (1, 1), (3, 3)]
    ]
    want = processor(images=images, return_tensors="np", input_data_format="channels_last")
    got = fast(images)
    assert got.dtype == np.float32 and got.shape == want["pixel_values"].shape
    assert np.max(np.abs(got - want["pixel_values"])) <= PIXEL_ATOL


def test_unsupported_processor_falls_back(model_py, tmp_path):
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"shortest_edge": 224}).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert not model_py.VectorizedImageProcessor.supports(processor)


def test_corrupt_and_empty_bytes_are_bad_input(model_py):
    with pytest.raises(model_py.BadInput, match=r"'image_bytes'\[2\]: not a decodable image"):
        model_py._decode("image_bytes", 2, b"\xff\xd8 not really a jpeg")
    with pytest.raises(model_py.BadInput, match=r"'image_bytes'\[0\]: empty"):
        model_py._decode("image_bytes", 0, b"")
