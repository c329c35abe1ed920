#!/usr/bin/env python3
"""Send an image to a Hugging Face model served by Triton and print what comes back.

    python client.py --model_name ensemble_model
    python client.py --model_name python_vit --image photo.jpg --url localhost:8000
    python client.py --model_name ensemble_model --text "A man eats." --text "Someone is eating."
    python client.py --model_name ensemble_model --labels "a cat,a dog,a rocket"   # CLIP/SigLIP

Needs only tritonclient[http], numpy and pillow (plus matplotlib for the default
photo), so it runs outside this project's venv too. Exit code 0 on success, 1 when
the server or the model is not there or the reply is malformed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image

MODELS = ("python_vit", "ensemble_model")
#: --input-format -> (input tensor, Triton dtype). All three are inputs of both models.
FORMATS = {
    "fp32": ("image", "FP32"),
    "uint8": ("image_uint8", "UINT8"),
    "jpeg": ("image_bytes", "BYTES"),
}


def default_image() -> Path:
    """A real photo available offline: matplotlib's sample of Grace Hopper (600 x 512)."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: no --image given and matplotlib (which ships the sample photo) is missing")
    return Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


def load_image(path: Path) -> np.ndarray:
    """The photo as the tutorial's input contract: float32 H x W x 3, values 0..255."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def encode_request(path: Path, input_format: str, batch: int) -> np.ndarray:
    """The request tensor: N x H x W x 3 pixels (fp32, uint8), or N x 1 encoded files (jpeg)."""
    if input_format == "jpeg":
        # The file's own bytes (JPEG, PNG, ...): the server decodes them.
        return np.array([[path.read_bytes()]] * batch, dtype=object)
    image = load_image(path)
    if input_format == "uint8":
        image = image.astype(np.uint8)
    return np.repeat(image[None], batch, axis=0)


def payload_bytes(tensor: np.ndarray) -> int:
    if tensor.dtype == object:
        return sum(len(b) for b in tensor.reshape(-1))
    return int(tensor.nbytes)


def infer(
    url: str,
    model_name: str,
    images: np.ndarray,
    input_format: str = "fp32",
    timeout_s: float = 60.0,
    parameters: dict | None = None,
    labels: list[str] | None = None,
) -> dict:
    """One HTTP request with a batch of images; every output of the model as numpy.
    ``parameters`` go with the request (object detection reads ``threshold`` and ``top_k``,
    zero-shot ``hypothesis_template``); ``labels``: zero-shot's candidate labels, the same
    for every image."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with httpclient.InferenceServerClient(
        url=url, connection_timeout=timeout_s, network_timeout=timeout_s
    ) as client:
        try:
            if not client.is_server_live():
                raise SystemExit(f"error: Triton at {url} is not live")
        except (ConnectionError, OSError, InferenceServerException) as e:
            raise SystemExit(
                f"error: no Triton server at {url} ({e}). Start one with ./run_server.sh"
            ) from e
        try:
            metadata = client.get_model_metadata(model_name)
        except InferenceServerException as e:
            available = (
                sorted(
                    m["name"]
                    for m in client.get_model_repository_index()
                    if m.get("state") == "READY"
                )
                if _index_allowed(client)
                else []
            )
            hint = f"; ready models: {', '.join(available)}" if available else ""
            raise SystemExit(
                f"error: model '{model_name}' is not available at {url}: {e.message()}{hint}"
            ) from e
        takes = {i["name"] for i in metadata["inputs"]}
        if "candidate_labels" in takes and not labels:
            raise SystemExit(
                f"error: '{model_name}' scores an image against labels: pass --labels "
                '"a cat,a dog,..."'
            )
        if labels and "candidate_labels" not in takes:
            raise SystemExit(
                f"error: --labels is for zero-shot models (CLIP, SigLIP); '{model_name}' takes "
                f"{', '.join(sorted(takes))}"
            )
        name, dtype = FORMATS[input_format]
        tensor = httpclient.InferInput(name, list(images.shape), dtype)
        tensor.set_data_from_numpy(images, binary_data=True)
        inputs = [tensor]
        if labels:
            rows = np.array([[x.encode("utf-8") for x in labels]] * len(images), dtype=np.object_)
            inputs.append(httpclient.InferInput("candidate_labels", list(rows.shape), "BYTES"))
            inputs[-1].set_data_from_numpy(rows, binary_data=True)
        outputs = [
            httpclient.InferRequestedOutput(o["name"], binary_data=True)
            for o in metadata["outputs"]
        ]
        try:
            result = client.infer(
                model_name, inputs, outputs=outputs, parameters=parameters or None
            )
        except InferenceServerException as e:
            raise SystemExit(f"error: inference failed: {e.message()}") from e
        return {o["name"]: result.as_numpy(o["name"]) for o in metadata["outputs"]}


def draw(path: Path, detections: list[dict], out: Path) -> None:
    """The image with each detection's box and "label score" drawn on it (Pillow only)."""
    from PIL import ImageDraw, ImageOps

    with Image.open(path) as img:
        canvas = ImageOps.exif_transpose(img).convert("RGB")  # the orientation the server saw
    pen = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 200))
    for d in detections:
        b = d["box"]
        pen.rectangle((b["xmin"], b["ymin"], b["xmax"], b["ymax"]), outline="red", width=width)
        pen.text(
            (b["xmin"] + width, b["ymin"] + width), f"{d['label']} {d['score']:.2f}", fill="red"
        )
    canvas.save(out)


def infer_text(
    url: str,
    model_name: str,
    texts: list[str],
    timeout_s: float = 60.0,
    parameters: dict | None = None,
) -> dict:
    """One HTTP request with a batch of texts (the ``text`` BYTES input); ``parameters`` go
    with the request (token classification reads ``aggregation_strategy``)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with httpclient.InferenceServerClient(url=url, network_timeout=timeout_s) as client:
        try:
            metadata = client.get_model_metadata(model_name)
        except (ConnectionError, OSError) as e:
            raise SystemExit(f"error: no Triton server at {url} ({e}). Start one first") from e
        except InferenceServerException as e:
            raise SystemExit(
                f"error: model '{model_name}' is not available at {url}: {e.message()}"
            ) from e
        names = [i["name"] for i in metadata["inputs"]]
        if "text" not in names:
            raise SystemExit(f"error: model '{model_name}' takes {names}, not 'text'")
        data = np.array([[t.encode()] for t in texts], dtype=object)
        tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        try:
            result = client.infer(model_name, [tensor], parameters=parameters or None)
        except InferenceServerException as e:
            raise SystemExit(f"error: inference failed: {e.message()}") from e
        return {o["name"]: result.as_numpy(o["name"]) for o in metadata["outputs"]}


def _index_allowed(client) -> bool:
    try:
        client.get_model_repository_index()
        return True
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_name",
        default="ensemble_model",
        help=f"model to call: {' or '.join(MODELS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="image file (default: matplotlib's grace_hopper.jpg)",
    )
    parser.add_argument("--url", default="localhost:8000", help="Triton HTTP endpoint")
    parser.add_argument(
        "--input-format",
        choices=sorted(FORMATS),
        default="fp32",
        help="fp32: float pixels (the tutorial's input); uint8: 4x smaller; "
        "jpeg: the image file's own bytes, decoded on the server (default: %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="send the image this many times in one request (default: 1)",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=None,
        help="send text instead of an image (repeatable: one batch; with a sentence-embedding "
        "model, prints the cosine similarity of each pair; with a token-classification "
        "model, the entities)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="object detection: the score a detection needs (default: the model's config)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="object detection: keep only the k best detections",
    )
    parser.add_argument(
        "--draw",
        type=Path,
        default=None,
        help="object detection: write the image with its boxes and labels drawn to this file",
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="zero-shot image classification (CLIP, SigLIP): comma-separated candidate labels "
        'to score the image against, e.g. "a cat,a dog,a rocket"',
    )
    parser.add_argument(
        "--hypothesis-template",
        default=None,
        help="zero-shot: the text each label is put into (default: the model's config, \"This "
        'is a photo of {}.")',
    )
    parser.add_argument(
        "--aggregation-strategy",
        choices=["none", "simple", "first", "average", "max"],
        default=None,
        help="token classification: how tokens become entities (default: the model's config)",
    )
    args = parser.parse_args(argv)
    if args.text:
        return _main_text(args)

    path = args.image or default_image()
    if not path.exists():
        parser.error(f"image {path} does not exist")
    with Image.open(path) as img:
        width, height = img.size
    request = encode_request(path, args.input_format, args.batch)
    print(
        f"Sending {path.name} ({width}x{height} px) x{args.batch} as {args.input_format} "
        f"({payload_bytes(request) / args.batch / 1e6:.3f} MB per image) "
        f"to '{args.model_name}' at {args.url}"
    )
    parameters = {}
    if args.threshold is not None:
        parameters["threshold"] = args.threshold
    if args.top_k is not None:
        parameters["top_k"] = args.top_k
    if args.hypothesis_template is not None:
        parameters["hypothesis_template"] = args.hypothesis_template
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if args.labels is not None and not labels:
        parser.error("--labels needs at least one label (comma-separated)")
    outputs = infer(
        args.url, args.model_name, request, args.input_format, parameters=parameters, labels=labels
    )

    scores = outputs.pop("scores", None)
    if scores is not None:
        # One JSON list per image: plain json.loads, no project code needed.
        ranking = json.loads(scores.reshape(-1)[0])
        print(f"{path.name}: {len(ranking)} labels, best first")
        for r in ranking:
            print(f"  {r['score']:.4f}  {r['label']}")
        return 0

    detections = outputs.pop("detections", None)
    if detections is not None:
        # One JSON list per image: plain json.loads, no project code needed.
        found = json.loads(detections.reshape(-1)[0])
        print(f"{len(found)} detections in {path.name} ({width}x{height} px):")
        for d in found:
            b = d["box"]
            print(
                f"  {d['label']:<12} {d['score']:.3f}  "
                f"({b['xmin']}, {b['ymin']}) - ({b['xmax']}, {b['ymax']})"
            )
        if args.draw:
            draw(path, found, args.draw)
            print(f"Drew them on {args.draw}")
        return 0
    if args.draw:
        parser.error(
            f"--draw needs an object-detection model (output 'detections'); "
            f"'{args.model_name}' gives {', '.join(outputs)}"
        )

    for name, value in outputs.items():
        print(
            f"{name}: shape {tuple(value.shape)} {value.dtype}, "
            f"mean {value.mean():+.4f}, std {value.std():.4f}"
        )
        if not np.isfinite(value).all():
            print(f"error: {name} contains NaN or Inf", file=sys.stderr)
            return 1
        if value.shape[0] != args.batch:
            print(f"error: {name} has batch {value.shape[0]}, sent {args.batch}", file=sys.stderr)
            return 1
    hidden = outputs.get("last_hidden_state")
    if hidden is not None:
        print(f"CLS embedding (first 5): {np.array2string(hidden[0, 0, :5], precision=4)}")
    return 0


def _main_text(args: argparse.Namespace) -> int:
    print(f"Sending {len(args.text)} text(s) to '{args.model_name}' at {args.url}")
    parameters = {}
    if args.aggregation_strategy:
        parameters["aggregation_strategy"] = args.aggregation_strategy
    outputs = infer_text(args.url, args.model_name, args.text, parameters=parameters)
    entities = outputs.pop("entities", None)
    if entities is not None:
        # One JSON list per text: plain json.loads, no project code needed.
        for text, row in zip(args.text, entities.reshape(-1), strict=True):
            found = json.loads(row)
            print(f"{text!r}: {len(found)} entities")
            for e in found:
                label = e.get("entity_group", e.get("entity"))
                print(
                    f"  {label:<8} {e['score']:.3f}  [{e['start']}:{e['end']}] "
                    f"{text[e['start'] : e['end']]!r}"
                )
    for name, value in outputs.items():
        print(f"{name}: shape {tuple(value.shape)} {value.dtype}")
        if not np.isfinite(value).all() or value.shape[0] != len(args.text):
            print(f"error: {name} is malformed", file=sys.stderr)
            return 1
    embeddings = outputs.get("sentence_embedding", outputs.get("text_embeds"))
    if embeddings is not None and len(args.text) > 1:
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        similarity = unit @ unit.T
        print("cosine similarity:")
        for i in range(len(args.text)):
            for j in range(i + 1, len(args.text)):
                print(f"  {similarity[i, j]:+.4f}  {args.text[i]!r} ~ {args.text[j]!r}")
    logits = outputs.get("logits")
    if logits is not None:
        for text, row in zip(args.text, logits, strict=True):
            print(f"  {text!r}: argmax {int(np.argmax(row))}, logits {np.round(row, 3).tolist()}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `client.py ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    sys.exit(code)
