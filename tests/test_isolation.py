"""A bad request fails alone, for every kind of model: 8 requests sent at once, 2 of them bad.

The 2 bad ones get a 400 naming the problem; the 6 good ones get exactly what they get when
sent alone. Triton's dynamic batcher puts such a burst into one execution (checked in its
statistics), so a model that failed the whole batch for one request could not pass. Also
here: memory stays bounded under maximal image requests.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from hf_triton.soak import rss_bytes

Inputs = Callable[[], list[httpclient.InferInput]]


def tensor(name: str, datatype: str, data: np.ndarray) -> httpclient.InferInput:
    t = httpclient.InferInput(name, list(data.shape), datatype)
    t.set_data_from_numpy(data)
    return t


def jpeg(seed: int, height: int = 96, width: int = 128) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def image_bytes(*blobs: bytes) -> Inputs:
    return lambda: [tensor("image_bytes", "BYTES", np.array([[b] for b in blobs], dtype=object))]


def uint8_image(seed: int) -> Inputs:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (1, 40 + seed, 48, 3), dtype=np.uint8)
    return lambda: [tensor("image_uint8", "UINT8", image)]


def fp32_image(fill: float, nan: bool = False) -> Inputs:
    image = np.full((1, 32, 32, 3), fill, np.float32)
    if nan:
        image[0, 3, 3, 1] = np.nan
    return lambda: [tensor("image", "FP32", image)]


def texts(*items: bytes) -> Inputs:
    return lambda: [tensor("text", "BYTES", np.array([[t] for t in items], dtype=object))]


def _batches(url: str, model: str) -> dict[int, int]:
    client = httpclient.InferenceServerClient(url=url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}


def _send(url: str, model: str, inputs: Inputs) -> dict[str, np.ndarray] | InferenceServerException:
    client = httpclient.InferenceServerClient(url=url, network_timeout=120)
    try:
        result = client.infer(model, inputs())
        return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    except InferenceServerException as e:
        return e
    finally:
        client.close()


def burst(url: str, model: str, batched: str, requests: list[Inputs]) -> list:
    """Send every request at the same moment; retry until Triton ran some of them together
    (with no batcher delay, the default, a burst forms a batch only when it queues behind a
    running execution; most tries do)."""
    for _ in range(20):
        before = _batches(url, batched)
        start = threading.Barrier(len(requests))

        def one(inputs: Inputs, start: threading.Barrier = start):
            start.wait()
            return _send(url, model, inputs)

        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(one, requests))
        after = _batches(url, batched)
        if any(after.get(size, 0) > before.get(size, 0) for size in after if size > 1):
            return results
    pytest.fail(f"{batched} never ran two requests of a burst together")


def _text_ids(text_server, sentences: list[str]) -> list[dict[str, np.ndarray]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(text_server.minilm))
    return [dict(tokenizer([s], return_tensors="np")) for s in sentences]


def _ids(feed: dict[str, np.ndarray], bad: bool = False) -> Inputs:
    feed = {k: v.astype(np.int64).copy() for k, v in feed.items()}
    if bad:
        feed["input_ids"][0, 1] = 10**6  # far outside the vocabulary
    return lambda: [tensor(k, "INT64", v) for k, v in feed.items()]


GOOD_IMAGES = [uint8_image(i) for i in range(5)] + [fp32_image(0.5)]  # 0.5: rounded, served


def _vision_cases():
    truncated = jpeg(9)[:-400]  # the header decodes, the pixels do not
    return {
        # model called, model whose statistics show the batch, good requests, bad requests, words
        "vision python": (
            "python_vit",
            "python_vit",
            GOOD_IMAGES,
            fp32_image(7.0, nan=True),
            "NaN",
        ),
        "image preprocessing": (
            "preprocessing",
            "preprocessing",
            [image_bytes(jpeg(i)) for i in range(6)],
            image_bytes(truncated),
            "not a decodable image",
        ),
        "vision ensemble": (
            "ensemble_model",
            "preprocessing",
            [image_bytes(jpeg(i)) for i in range(6)],
            image_bytes(b"\x89PNG not really"),
            "not a decodable image",
        ),
    }


SENTENCES = [f"Sentence number {i} about {w}." for i, w in enumerate("abcdef")]


def _text_cases(text_server):
    feeds = _text_ids(text_server, SENTENCES)
    return {
        "ONNX step": (
            "minilm",
            "minilm",
            [_ids(f) for f in feeds],
            _ids(feeds[0], bad=True),
            "out of data bounds",
        ),
        "text python": (
            "python_minilm",
            "python_minilm",
            [texts(s.encode()) for s in SENTENCES],
            texts(b"\xff\xfe broken"),
            "not valid UTF-8",
        ),
        "tokenizer": (
            "minilm_pre",
            "minilm_pre",
            [texts(s.encode()) for s in SENTENCES],
            texts(b""),
            "empty text",
        ),
        "text ensemble": (
            "ensemble_minilm",
            "minilm_pre",
            [texts(s.encode()) for s in SENTENCES],
            texts(b"nul\x00byte"),
            "contains a NUL",
        ),
    }


def _check_isolation(url: str, case) -> None:
    model, batched, good, bad, words = case
    alone = [_send(url, model, inputs) for inputs in good]
    assert all(isinstance(a, dict) for a in alone), alone
    order = [good[0], bad, *good[1:4], bad, *good[4:]]
    results = burst(url, model, batched, order)
    for inputs, result in zip(order, results, strict=True):
        if inputs is bad:
            assert isinstance(result, InferenceServerException), result
            assert result.status() == "400" and words in result.message(), result.message()
        else:
            want = alone[good.index(inputs)]
            assert isinstance(result, dict), result.message()
            for name, value in want.items():
                np.testing.assert_allclose(result[name], value, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind", list(_vision_cases()))
def test_bad_request_fails_alone_vision(server, kind):
    _check_isolation(server.url, _vision_cases()[kind])


@pytest.mark.parametrize("kind", ["ONNX step", "text python", "tokenizer", "text ensemble"])
def test_bad_request_fails_alone_text(text_server, kind):
    _check_isolation(text_server.url, _text_cases(text_server)[kind])


# -- bounded memory ---------------------------------------------------------------------------


def _big_jpeg(width: int, height: int) -> bytes:
    """A smooth photo-sized image: megapixels of data, a small file."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _peak_rss_during(server, requests: int, inputs: Inputs) -> tuple[int, list]:
    peak = rss_bytes(server.process.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, rss_bytes(server.process.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(requests) as pool:
            results = list(
                pool.map(lambda _: _send(server.url, "python_vit", inputs), range(requests))
            )
    finally:
        done.set()
        sampler.join()
    return peak, results


def test_maximal_requests_keep_memory_bounded(server):
    """Requests at the per-request budget (64 megapixels: two 32 MP photos each): the server's
    peak memory does not grow with how many arrive together (images are decoded one per worker
    at a time, whatever the batch holds), and one pixel more is a 400 before any decoding."""
    big = _big_jpeg(8000, 4000)
    request = image_bytes(big, big)
    baseline = rss_bytes(server.process.pid)
    peak_2, results_2 = _peak_rss_during(server, 2, request)
    peak_8, results_8 = _peak_rss_during(server, 8, request)
    for result in results_2 + results_8:
        assert isinstance(result, dict) and result["pooler_output"].shape[0] == 2, result
    growth_2, growth_8 = (peak_2 - baseline) / 2**20, (peak_8 - baseline) / 2**20
    print(f"peak RSS growth: {growth_2:.0f} MiB with 2 maximal requests, {growth_8:.0f} with 8")
    # 16 decoded 32 MP images alone would be 1.5 GiB; streaming holds a worker's one or two.
    assert growth_8 < growth_2 + 256 and growth_8 < 1536, (growth_2, growth_8)

    over = _send(server.url, "python_vit", image_bytes(big, big, _big_jpeg(16, 16)))
    assert isinstance(over, InferenceServerException) and over.status() == "400"
    assert "megapixels in one request exceed the budget of 64" in over.message()
