"""Compact inputs (UINT8 pixels, encoded JPEG/PNG bytes) and batching, on the real server."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import ATOL, MODELS, assert_close, infer, synthetic


def send(url: str, model: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        tensors = []
        for name, array in inputs.items():
            dtype = {"image": "FP32", "image_uint8": "UINT8", "image_bytes": "BYTES"}[name]
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(model, tensors)
        return {n: result.as_numpy(n) for n in ("last_hidden_state", "pooler_output")}


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("model", MODELS)
def test_uint8_equals_fp32(server, photo, model):
    fp32 = infer(server.url, model, photo[None])
    uint8 = send(server.url, model, image_uint8=photo.astype(np.uint8)[None])
    assert_close(uint8, fp32, 1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_png_bytes_equal_fp32(server, photo, model):
    fp32 = infer(server.url, model, photo[None])
    png = send(server.url, model, image_bytes=np.array([[encode(photo, "PNG")]], dtype=object))
    assert_close(png, fp32, 1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_jpeg_batch_of_mixed_sizes(server, reference, photo, model):
    images = [photo, synthetic(3, 31, 45), photo[100:300, 50:450]]
    blobs = [encode(im, "JPEG") for im in images]
    assert len(blobs[0]) < 100_000  # a 600x512 photo: ~0.1 MB instead of 3.7 MB as FP32
    got = send(server.url, model, image_bytes=np.array(blobs, dtype=object).reshape(-1, 1))
    assert got["last_hidden_state"].shape[0] == 3
    assert_close(got, reference([decoded(b) for b in blobs]), ATOL[model])


@pytest.mark.parametrize("model", MODELS)
def test_more_than_one_image_input_is_rejected(server, photo, model):
    with pytest.raises(InferenceServerException, match="exactly one of the inputs") as err:
        send(server.url, model, image=photo[None], image_uint8=photo.astype(np.uint8)[None])
    assert err.value.status() == "400"


@pytest.mark.parametrize("model", MODELS)
def test_corrupt_bytes_rejected_others_in_flight_unaffected(server, photo, model):
    blobs = np.array([[encode(photo, "JPEG")], [b"\x89PNG garbage"]], dtype=object)
    with pytest.raises(InferenceServerException, match=r"'image_bytes'\[1\]: not a decodable"):
        send(server.url, model, image_bytes=blobs)
    assert send(server.url, model, image_bytes=blobs[:1])["pooler_output"].shape[0] == 1


def _stats(url: str, model: str) -> tuple[int, int]:
    with httpclient.InferenceServerClient(url=url) as client:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])


@pytest.mark.parametrize("model,batched", [("python_vit", "python_vit"), ("ensemble_model", "vit")])
def test_dynamic_batcher_forms_batches_under_load(server, model, batched):
    inf0, exe0 = _stats(server.url, batched)
    image = synthetic(7, 64, 64).astype(np.uint8)[None]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: send(server.url, model, image_uint8=image), range(48)))
    inf1, exe1 = _stats(server.url, batched)
    assert inf1 - inf0 >= 48  # and the launcher's probe may have come by
    assert exe1 - exe0 < inf1 - inf0 - 8, (
        f"{batched}: {exe1 - exe0} executions, {inf1 - inf0} inferences"
    )
