"""Zero-shot image classification served for real (the `text_server` fixture serves a tiny
SigLIP, both approaches): labels per image, the hypothesis template, the towers alone, bad
input, the client, and what `build` writes and refuses.

CLIP's scores and towers against transformers on every test image are the conformance
matrix's job (tests/test_conformance.py runs it); SigLIP's differ where it matters here: a
sigmoid per label, and texts padded to 64 tokens without a mask.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from hf_triton import conformance
from hf_triton.families import FAMILIES

from helpers import run_cli, run_client

APPROACHES = ["python", "ensemble"]
#: More labels than a text-tower call takes (max_batch_size 8): the zero-shot model splits them.
LABELS = [
    "a cat",
    "a dog",
    "a bird",
    "a car",
    "a house",
    "a tree",
    "a person",
    "a flower",
    "Größe café 東京",
    "an emoji 🚀",
]


def entry(approach: str) -> str:
    return "python_siglip" if approach == "python" else "ensemble_siglip"


def classify(url, model, images, labels, **parameters) -> list[list[dict]]:
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        data = np.stack(images).astype(np.uint8)
        rows = np.array([[x.encode() for x in row] for row in labels], dtype=object)
        tensors = [
            httpclient.InferInput("image_uint8", list(data.shape), "UINT8"),
            httpclient.InferInput("candidate_labels", list(rows.shape), "BYTES"),
        ]
        tensors[0].set_data_from_numpy(data)
        tensors[1].set_data_from_numpy(rows)
        result = client.infer(model, tensors, parameters=parameters or None)
        return [json.loads(row) for row in result.as_numpy("scores").reshape(-1)]


@pytest.fixture(scope="module")
def pipeline(text_server):
    import transformers

    return transformers.pipeline("zero-shot-image-classification", model=str(text_server.siglip))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]


@pytest.mark.parametrize("approach", APPROACHES)
def test_each_image_its_own_labels_as_the_pipeline(text_server, pipeline, images, approach):
    """Three images in one request, each with its own ten labels (more than one text-tower
    call takes): every ranking is the pipeline's for that image and those labels."""
    rows = [LABELS, LABELS[::-1], LABELS[3:] + LABELS[:3]]
    got = classify(text_server.url, entry(approach), images, rows)
    want = [
        pipeline(Image.fromarray(image), candidate_labels=row)
        for image, row in zip(images, rows, strict=True)
    ]
    row = conformance.judge_zero_shot(got, want, conformance.ATOL[approach])
    assert row.verdict == "pass", row
    # Not vacuous: the scores spread, so an order or scoring mistake would show.
    assert max(d["score"] for d in want[0]) - min(d["score"] for d in want[0]) > 1e-3


@pytest.mark.parametrize("approach", APPROACHES)
def test_hypothesis_template_is_a_request_parameter(text_server, pipeline, images, approach):
    template = "a blurry picture of {}"
    (got,) = classify(
        text_server.url, entry(approach), images[:1], [LABELS[:4]], hypothesis_template=template
    )
    (default,) = classify(text_server.url, entry(approach), images[:1], [LABELS[:4]])
    image = Image.fromarray(images[0])
    want = pipeline(image, candidate_labels=LABELS[:4], hypothesis_template=template)
    want_default = pipeline(image, candidate_labels=LABELS[:4])
    atol = conformance.ATOL[approach]
    assert conformance.judge_zero_shot([got], [want], atol).verdict == "pass"
    assert conformance.judge_zero_shot([default], [want_default], atol).verdict == "pass"
    assert {d["label"]: d["score"] for d in got} != {d["label"]: d["score"] for d in default}


@pytest.mark.parametrize("approach", APPROACHES)
def test_text_tower_pads_to_siglips_length(text_server, pipeline, approach):
    """text_embeds of a short text sent with a long one are the model's own, padded to 64
    tokens as SigLIP was trained (padding to the batch's longest would change them)."""
    import torch

    texts = ["a cat", "a photograph of a long and unusually described scene by a lake"]
    data = np.array([[t.encode()] for t in texts], dtype=object)
    tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    with httpclient.InferenceServerClient(url=text_server.url) as client:
        got = client.infer(f"{entry(approach)}_text", [tensor]).as_numpy("text_embeds")
    model, tokenizer = pipeline.model, pipeline.tokenizer
    with torch.inference_mode():
        encoded = tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
        features = model.get_text_features(**encoded).pooler_output
        longest = tokenizer(texts, padding=True, return_tensors="pt")
        unpadded = model.get_text_features(**longest).pooler_output
    want = (features / features.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(got - want).max() < conformance.ATOL[approach]
    wrong = (unpadded / unpadded.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(wrong - want).max() > 1e-2  # the rule matters for this model


def _error(url, model, inputs, **parameters) -> tuple[int, str]:
    with (
        httpclient.InferenceServerClient(url=url) as client,
        pytest.raises(InferenceServerException) as info,
    ):
        client.infer(model, inputs, parameters=parameters or None)
    return int(info.value.status()), info.value.message()


def _inputs(labels, image=True, blob=None):
    tensors = []
    if blob is not None:
        tensors.append(httpclient.InferInput("image_bytes", [1, 1], "BYTES"))
        tensors[-1].set_data_from_numpy(np.array([[blob]], dtype=object))
    elif image:
        tensors.append(httpclient.InferInput("image_uint8", [1, 20, 30, 3], "UINT8"))
        tensors[-1].set_data_from_numpy(np.zeros((1, 20, 30, 3), np.uint8))
    rows = np.array(labels, dtype=object)
    tensors.append(httpclient.InferInput("candidate_labels", list(rows.shape), "BYTES"))
    tensors[-1].set_data_from_numpy(rows)
    return tensors


@pytest.mark.parametrize("approach", APPROACHES)
def test_bad_input_is_a_400_naming_it(text_server, approach):
    url, model = text_server.url, entry(approach)
    cases = [
        (_inputs([[b"a cat", b"  "]]), {}, "'candidate_labels'[0, 1]: empty label"),
        (_inputs([[b"\xff\xfe"]]), {}, "not valid UTF-8"),
        (_inputs([[b"a cat"]], image=False), {}, "expected exactly one of the inputs"),
        (_inputs([[b"a cat"]], blob=b"no image"), {}, "'image_bytes'[0]: not a decodable image"),
        (_inputs([[b"a cat"]]), {"hypothesis_template": "{0} and {1}"}, "hypothesis_template"),
    ]
    for inputs, parameters, expected in cases:
        status, message = _error(url, model, inputs, **parameters)
        assert status == 400 and expected in message, (status, message)
    # The model still answers.
    assert classify(url, model, [np.zeros((8, 8, 3), np.uint8)], [["a cat", "a dog"]])


def test_client_scores_labels(text_server):
    run = run_client(
        "--url", text_server.url, "--model_name", "ensemble_siglip", "--labels", "a cat, a dog"
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 labels, best first" in run.stdout and "a dog" in run.stdout
    run = run_client("--url", text_server.url, "--model_name", "python_siglip")
    assert run.returncode == 1 and "pass --labels" in run.stderr + run.stdout


# -- what build writes and refuses -----------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return FAMILIES["clip"].make(
        tmp_path_factory.mktemp("clip") / "ckpt", "zero-shot-image-classification"
    )


def test_build_writes_towers_and_zero_shot_model(clip, tmp_path):
    """A CLIPModel checkpoint is zero-shot by its config; the build writes each tower and the
    zero-shot model per approach, the towers' ONNX graphs validated against PyTorch."""
    run = run_cli("build", "--model", str(clip), "--name", "clip", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "zero-shot-image-classification" in run.stdout
    python = sorted(p.name for p in (tmp_path / "python_model_repository").iterdir())
    assert python == ["python_clip", "python_clip_image", "python_clip_text"]
    ensemble = tmp_path / "ensemble_model_repository"
    assert sorted(p.name for p in ensemble.iterdir()) == [
        "clip_image",
        "clip_text",
        "ensemble_model",
        "ensemble_model_image",
        "ensemble_model_text",
        "preprocessing",
        "preprocessing_text",
    ]
    for tower in ("clip_image", "clip_text"):
        assert (ensemble / tower / "1" / "model.onnx").stat().st_size > 0
    assert "validated image_embeds" in run.stdout and "validated text_embeds" in run.stdout
    config = (ensemble / "ensemble_model" / "config.pbtxt").read_text()
    assert 'string_value: "ensemble_model_image"' in config
    assert 'key: "logit_scale"' in config and 'string_value: "softmax"' in config


def test_reduced_precision_passes_the_gate_on_both_towers_and_the_ranking(clip, tmp_path):
    """int8 (Python approach): each tower's embeddings by cosine, then zero-shot rankings over
    the gate's labels (top-1 agreement), before anything is written."""
    run = run_cli(
        "build",
        "--model",
        str(clip),
        "--name",
        "clip",
        "--approach",
        "python",
        "--precision",
        "int8",
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    gates = [line for line in run.stdout.splitlines() if "accuracy gate:" in line]
    assert [g.split(" vs fp32")[0].split(": ")[-1] for g in gates] == [
        "int8 image tower",
        "int8 text tower",
        "int8 zero-shot",
    ]
    assert all("PASSED" in g for g in gates) and "top-1 agreement" in gates[2]
    config = tmp_path / "python_model_repository" / "python_clip_text" / "config.pbtxt"
    assert 'string_value: "int8"' in config.read_text()


def test_gate_refuses_a_tower_that_differs(clip):
    """The gate can fail: identical runners pass; a text tower whose rows come back in another
    order (each text gets another's embedding) is refused."""
    from hf_triton import precision
    from hf_triton.spec import ModelSpec

    spec = ModelSpec.resolve(clip)
    runners = {
        side: precision._torch_runners(spec.for_tower(side), "fp32") for side in ("image", "text")
    }
    reports = precision.gate_image_text(spec, "identity", runners)
    assert reports[-1].top1_agreement == 1.0 and reports[-1].min_cosine > 0.99999
    reference, _ = runners["text"]
    runners["text"] = (reference, lambda chunk: [reference(chunk)[0][::-1]])
    with pytest.raises(precision.GateFailed, match="text tower"):
        precision.gate_image_text(spec, "shuffled", runners)


def test_optimize_names_why_it_does_not_apply(clip, tmp_path):
    run = run_cli("optimize", "--model", str(clip), "--workdir", str(tmp_path))
    assert run.returncode != 0
    said = run.stderr + run.stdout
    assert "optimize measures one model per variant" in said and "hf-triton bench" in said
