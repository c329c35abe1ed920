"""Bad input against the real server: a 4xx naming the problem, then service as usual.

The cases follow ../shared/RELIABILITY.md (Triton's own QA suites); raw HTTP is used so
malformed bodies can be sent at all.
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from helpers import MODELS, infer

H, W = 16, 20


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None):
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(data)
        message = parsed.get("error", "") if isinstance(parsed, dict) else ""
    except ValueError:
        message = data.decode(errors="replace")
    return response.status, message


def json_request(name: str, datatype: str, shape: list[int], data) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    ).encode()


def pixels(shape, value=100.0):
    return np.full(shape, value, dtype=np.float32).reshape(-1).tolist()


def binary_request(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def _truncated() -> tuple[bytes, dict]:
    body, headers = binary_request("image", "FP32", [1, H, W, 3], bytes(H * W * 3 * 4))
    return body[:-100], headers


# (case id, body builder -> (body, headers), expected status, words the message must contain)
def _cases():
    nan = pixels([1, H, W, 3])
    nan[5] = float("nan")
    cases = {
        # Triton refuses a request without inputs before the model sees it.
        "missing-input": (lambda: (b'{"inputs": []}', {}), 400, ["request has 0 inputs"]),
        "unknown-input-name": (
            lambda: (json_request("picture", "FP32", [1, H, W, 3], pixels([1, H, W, 3])), {}),
            400,
            ["picture"],
        ),
        "uint8-to-fp32-input": (
            lambda: (json_request("image", "UINT8", [1, H, W, 3], [1] * (H * W * 3)), {}),
            400,
            ["image", "UINT8", "FP32"],
        ),
        "fp32-to-uint8-input": (
            lambda: (json_request("image_uint8", "FP32", [1, H, W, 3], pixels([1, H, W, 3])), {}),
            400,
            ["image_uint8", "FP32", "UINT8"],
        ),
        "grayscale-HxW": (
            lambda: (json_request("image", "FP32", [1, H, W], pixels([1, H, W])), {}),
            400,
            ["image", "shape"],
        ),
        "HxWx1": (
            lambda: (json_request("image", "FP32", [1, H, W, 1], pixels([1, H, W, 1])), {}),
            400,
            ["image", "shape"],
        ),
        "RGBA-HxWx4": (
            lambda: (json_request("image", "FP32", [1, H, W, 4], pixels([1, H, W, 4])), {}),
            400,
            ["image", "shape"],
        ),
        "CHW-instead-of-HWC": (
            lambda: (json_request("image", "FP32", [1, 3, H, W], pixels([1, 3, H, W])), {}),
            400,
            ["image", "shape"],
        ),
        "zero-sized-dimension": (
            lambda: (json_request("image", "FP32", [1, 0, W, 3], []), {}),
            400,
            ["image"],
        ),
        "far-too-large": (
            lambda: binary_request("image_uint8", "UINT8", [1, 9000, 2, 3], bytes(9000 * 2 * 3)),
            400,
            ["image_uint8", "8192 px"],
        ),
        "byte-size-mismatch": (
            lambda: binary_request("image", "FP32", [1, H, W, 3], bytes(H * W * 3 * 4 - 4)),
            400,
            ["image"],
        ),
        # Triton 2.51's HTTP front end answers 500 (not 400) for a body it cannot parse;
        # the message is clear and the server keeps serving (README, known limits).
        "malformed-json": (
            lambda: (b'{"inputs": [ {"name": "image", ', {}),
            500,
            ["failed to parse the request JSON"],
        ),
        "truncated-binary-body": (_truncated, 400, ["image"]),
        "batch-over-max": (
            lambda: binary_request("image_uint8", "UINT8", [9, H, W, 3], bytes(9 * H * W * 3)),
            400,
            ["batch-size must be <= 8"],
        ),
        "nan-pixels": (
            lambda: (json_request("image", "FP32", [1, H, W, 3], nan), {}),
            400,
            ["image", "NaN"],
        ),
        "negative-pixels": (
            lambda: (json_request("image", "FP32", [1, H, W, 3], pixels([1, H, W, 3], -3.0)), {}),
            400,
            ["image", "[0, 255]"],
        ),
        "pixels-over-255": (
            lambda: (json_request("image", "FP32", [1, H, W, 3], pixels([1, H, W, 3], 300.0)), {}),
            400,
            ["image", "[0, 255]"],
        ),
        "corrupt-image-bytes": (
            lambda: binary_request(
                "image_bytes", "BYTES", [1, 1], len(b"GIF8junk").to_bytes(4, "little") + b"GIF8junk"
            ),
            400,
            ["image_bytes", "not a decodable image"],
        ),
        "empty-image-bytes": (
            lambda: binary_request("image_bytes", "BYTES", [1, 1], (0).to_bytes(4, "little")),
            400,
            ["image_bytes", "empty"],
        ),
        "two-image-inputs": (
            lambda: (
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "FP32",
                                "shape": [1, H, W, 3],
                                "data": pixels([1, H, W, 3]),
                            },
                            {
                                "name": "image_uint8",
                                "datatype": "UINT8",
                                "shape": [1, H, W, 3],
                                "data": [1] * (H * W * 3),
                            },
                        ]
                    }
                ).encode(),
                {},
            ),
            400,
            ["exactly one"],
        ),
    }
    return cases


CASES = _cases()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_4xx_and_server_keeps_serving(server, model, case):
    build, status, words = CASES[case]
    body, headers = build()
    got_status, message = post(server.url, f"/v2/models/{model}/infer", body, headers)
    assert got_status == status, f"{case}: {got_status} {message}"
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    good = np.full((1, H, W, 3), 100.0, np.float32)
    assert infer(server.url, model, good)["last_hidden_state"].shape[0] == 1


@pytest.mark.parametrize(
    "path", ["/v2/models/nope/infer", "/v2/models/python_vit/versions/7/infer"]
)
def test_unknown_model_or_version(server, path):
    status, message = post(server.url, path, json_request("image", "FP32", [1, 1, 1, 3], [0, 0, 0]))
    assert 400 <= status < 500 and ("nope" in message or "7" in message), message


@pytest.mark.parametrize("model", MODELS)
def test_one_by_one_image_is_served(server, model):
    assert (
        infer(server.url, model, np.zeros((1, 1, 1, 3), np.float32))["pooler_output"].shape[0] == 1
    )
