"""Helpers shared by the serving tests: one request, closeness, synthetic images."""

from __future__ import annotations

import numpy as np
import tritonclient.http as httpclient

MODELS = ["python_vit", "ensemble_model"]
#: Max |served - transformers|: python_vit runs the same PyTorch code (batching may
#: change the kernel's summation order); the ensemble runs ONNX Runtime, held to the
#: tutorial's export bound.
ATOL = {"python_vit": 1e-4, "ensemble_model": 1e-3}
OUTPUTS = ["last_hidden_state", "pooler_output"]


def infer(url: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(url=url, network_timeout=120)
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images.astype(np.float32))
    result = client.infer(model, [tensor])
    return {name: result.as_numpy(name) for name in OUTPUTS}


def assert_close(got: dict, want: dict, atol: float) -> None:
    for name in OUTPUTS:
        assert got[name].shape == want[name].shape, name
        diff = float(np.max(np.abs(got[name] - want[name])))
        assert diff <= atol, f"{name}: max |served - transformers| = {diff:.3g} > {atol}"


def synthetic(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3)).astype(np.float32)
