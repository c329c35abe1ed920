"""Object detection served for real (the `text_server` fixture also serves a tiny RT-DETR, both
approaches): boxes in each image's own pixels, the request parameters, bad input, the client.

Equality with transformers' ``pipeline("object-detection")`` on every test image of the
conformance matrix is judged here by the matrix's own check (`hf-triton conformance` runs the
same on its own build; its ``--quick``, the one tests/test_conformance.py runs, leaves detection
to this server).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import run_client

APPROACHES = ["python", "ensemble"]


def detect(url: str, model: str, images: list[np.ndarray], **parameters) -> list[list[dict]]:
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        data = np.stack(images).astype(np.uint8)
        tensor = httpclient.InferInput("image_uint8", list(data.shape), "UINT8")
        tensor.set_data_from_numpy(data)
        result = client.infer(model, [tensor], parameters=parameters or None)
        return [json.loads(row) for row in result.as_numpy("detections").reshape(-1)]


@pytest.fixture(scope="module")
def pipeline(text_server):
    import transformers

    return transformers.pipeline("object-detection", model=str(text_server.detector))


def test_every_test_image_in_one_request_as_the_pipeline(text_server):
    """The conformance matrix's detection check: its photos and odd encodings (EXIF-rotated
    JPEG, 16-bit PNG, RGBA, palette, CMYK, grayscale) sent as the files' bytes in one request,
    at the pipeline's default threshold and at threshold 0 with top_k 5, both approaches."""
    from hf_triton import conformance

    (case,) = (c for c in conformance.cases(["rt-detr"]) if c.task == "object-detection")
    case.name, case.checkpoint = "det", text_server.detector  # served here as python_det, ...
    rows = conformance.check(case, text_server.url, conformance.test_images())
    assert [r.approach for r in rows] == APPROACHES, rows
    for row in rows:
        assert row.verdict == "pass", row


@pytest.mark.parametrize("approach", APPROACHES)
def test_boxes_are_in_each_images_own_pixels(text_server, pipeline, approach):
    """Two images of different sizes, in two requests: each answer is the pipeline's for that
    image, so boxes scale with the image they belong to."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    large = np.asarray(Image.fromarray(small).resize((800, 480), Image.Resampling.BILINEAR))
    for image in (small, large):
        (got,) = detect(text_server.url, f"{approach}_det", [image], threshold=0.0, top_k=5)
        want = sorted(pipeline(Image.fromarray(image), threshold=0.0), key=lambda d: -d["score"])
        assert [d["label"] for d in got] == [d["label"] for d in want[:5]]
        for g, w in zip(got, want, strict=False):
            assert abs(g["score"] - w["score"]) < 1e-3
            assert all(abs(g["box"][k] - w["box"][k]) <= 1 for k in g["box"]), (g, w)
        height, width = image.shape[:2]
        assert all(-width <= d["box"]["xmax"] <= 2 * width for d in got)
        assert all(-height <= d["box"]["ymax"] <= 2 * height for d in got)


@pytest.mark.parametrize("approach", APPROACHES)
def test_threshold_and_top_k_are_request_parameters(text_server, approach):
    image = np.random.default_rng(1).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    model = f"{approach}_det"
    everything = detect(text_server.url, model, [image], threshold=0.0)[0]
    assert len(everything) >= 10  # 20 queries: the tiny model's every query passes 0
    best = detect(text_server.url, model, [image], threshold=0.0, top_k=3)[0]
    assert best == sorted(everything, key=lambda d: -d["score"])[:3]
    middle = float(np.median([d["score"] for d in everything]))
    above = detect(text_server.url, model, [image], threshold=middle)[0]
    assert above == [d for d in everything if d["score"] > middle]
    default = detect(text_server.url, model, [image])[0]  # the config's 0.5, top_k 0
    assert default == [d for d in everything if d["score"] > 0.5]


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize(
    "parameters,words",
    [
        ({"threshold": 1.5}, "parameter threshold 1.5: a score between 0 and 1"),
        ({"threshold": "high"}, "parameter threshold 'high'"),
        ({"top_k": -2}, "parameter top_k -2: a whole number >= 0"),
    ],
)
def test_bad_parameters_are_refused(text_server, approach, parameters, words):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(InferenceServerException) as err:
        detect(text_server.url, f"{approach}_det", [image], **parameters)
    assert err.value.status() == "400" and words in err.value.message()


def test_client_prints_and_draws_detections(text_server, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (150, 220, 3), dtype=np.uint8)).save(
        photo
    )
    drawn = tmp_path / "drawn.png"
    run = run_client(
        "--url",
        text_server.url,
        "--model_name",
        "ensemble_det",
        "--image",
        str(photo),
        "--input-format",
        "jpeg",
        "--threshold",
        "0",
        "--top-k",
        "4",
        "--draw",
        str(drawn),
    )
    assert run.returncode == 0, run.stderr
    assert "4 detections in photo.png (220x150 px):" in run.stdout
    with Image.open(drawn) as out, Image.open(photo) as original:
        assert out.size == original.size
        pixels = np.asarray(out.convert("RGB")).reshape(-1, 3)
        assert ((pixels == (255, 0, 0)).all(axis=1)).sum() > 20  # red boxes drawn
