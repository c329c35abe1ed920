"""Reduced precision: each variant builds, passes (or correctly fails) its gate, and serves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import numpy_helper

from hf_triton import precision
from hf_triton.build import BuildOptions, build
from hf_triton.checkpoints import build_vit_checkpoint
from hf_triton.errors import HfTritonError
from hf_triton.serve import SERVER_ENV
from hf_triton.spec import ModelSpec

from conftest import launch
from helpers import run_cli

#: Big enough that int8 quantisation has real matrices to work on, still ~1 s to build.
SMALL_VIT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=224,
    patch_size=32,
)


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory) -> Path:
    return build_vit_checkpoint(tmp_path_factory.mktemp("pvit") / "vit", seed=1, **SMALL_VIT)


def test_gate_statistics():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert precision.compare("x", ref, ref, classifier=True).passed
    report = precision.compare("x", ref, np.array([[1.0, 0.0], [1.0, 0.1]]), classifier=True)
    assert not report.passed and report.top1_agreement == 0.5
    with pytest.raises(precision.GateFailed, match="REFUSED"):
        precision.gate("x", lambda c: ref[: len(c)], lambda c: -ref[: len(c)], [0, 1], False)


def test_eval_sets_are_fixed():
    assert precision.eval_sentences() == precision.eval_sentences()
    assert len(set(precision.eval_sentences())) == 300
    a, b = precision.eval_images(), precision.eval_images()
    assert len(a) == 24 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "approach,prec", [("python", "bf16"), ("python", "int8"), ("ensemble", "int8")]
)
def test_variant_builds_and_passes_the_gate(small_vit, tmp_path, approach, prec):
    result = build(
        ModelSpec.resolve(small_vit),
        tmp_path,
        approach=approach,
        options=BuildOptions(name=f"vit_{prec}", precision=prec),
    )
    assert len(result.gates) == 1 and result.gates[0].passed
    assert result.gates[0].min_cosine >= precision.MIN_COSINE


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_precisions_the_ensemble_cannot_run_are_refused(small_vit, tmp_path, prec):
    with pytest.raises(HfTritonError) as err:
        build(
            ModelSpec.resolve(small_vit),
            tmp_path,
            approach="ensemble",
            options=BuildOptions(precision=prec),
        )
    assert str(err.value).startswith(
        f"precision '{prec}' is not offered for the ensemble approach; choose one of fp32, int8"
    )
    assert not (tmp_path / "ensemble_model_repository").exists()  # refused before writing


def test_calibrated_int8_quantises_every_matmul(tmp_path):
    """With calibration data every weight MatMul runs in int8 (activation outliers migrated
    into the weights); without, the GELU-fed projections stay fp32."""
    from hf_triton.export import export_onnx
    from hf_triton.families import FAMILIES

    ckpt = FAMILIES["bert"].make(tmp_path / "bert", "text-classification")
    spec = ModelSpec.resolve(ckpt)
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(spec, fp32)

    def float_weight_matmuls(path) -> int:
        graph = onnx.load(str(path)).graph
        weights = {i.name for i in graph.initializer}
        return sum(n.op_type == "MatMul" and n.input[1] in weights for n in graph.node)

    assert float_weight_matmuls(fp32) > 0
    smoothed = precision.quantize_onnx(
        fp32, tmp_path / "smoothed.onnx", precision.calibration_feeds(spec)
    )
    assert smoothed.kind == "smoothed" and smoothed.alpha in precision.SMOOTHING_ALPHAS
    assert float_weight_matmuls(tmp_path / "smoothed.onnx") == 0
    plain = precision.quantize_onnx(fp32, tmp_path / "plain.onnx")
    assert plain.kind == "gelu-fp32" and float_weight_matmuls(tmp_path / "plain.onnx") == 2
    report = precision.gate_onnx(spec, "int8", fp32, tmp_path / "smoothed.onnx")
    assert report.passed, report.summary()
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "smoothed.onnx")).metadata_props}
    assert (
        meta["hf_triton.precision"] == "int8"
        and "every MatMul int8" in meta["hf_triton.int8_recipe"]
    )


def test_token_classification_gate_compares_each_tokens_label(tmp_path):
    """NER: the gate judges every real token (label agreement + cosine of its logits), so a
    variant that keeps the sentence-level picture but flips tokens' labels is refused."""
    from hf_triton.families import FAMILIES

    ckpt = FAMILIES["bert"].make(tmp_path / "ner", "token-classification")
    spec = ModelSpec.resolve(ckpt)
    report = precision.gate_python(spec, "int8")
    tokens = int(spec.encode(precision.eval_sentences())["attention_mask"].sum())
    assert report.unit == "tokens" and report.examples == tokens
    assert report.passed and report.top1_agreement is not None, report.summary()
    assert f"on {tokens} tokens" in report.summary()

    def swapped(chunk):  # labels 1 and 2 exchanged on every token: same norms, other labels
        rows = precision._per_example(spec, chunk, [_logits(spec, chunk)])
        return rows[:, [0, 2, 1, *range(3, rows.shape[1])]]

    with pytest.raises(precision.GateFailed, match="REFUSED"):
        precision.gate(
            "int8",
            lambda chunk: precision._per_example(spec, chunk, [_logits(spec, chunk)]),
            swapped,
            precision.eval_sentences()[:16],
            classifier=True,
        )


def test_detection_gate_matches_detections_not_query_positions():
    """Object detection: a detection is found again by label and box overlap, whatever query
    produced it; a moved box, another label or an invented detection counts against it."""
    box = np.array([0.1, 0.2, 0.5, 0.6])
    image = [(0, 0.9, box), (1, 0.7, np.array([0.6, 0.1, 0.9, 0.4]))]
    reordered = [(image[1][0], 0.69, image[1][2] + 0.005), (0, 0.91, box)]
    report = precision.compare_detections("int8", [image], [reordered])
    assert report.passed and report.detection_agreement == 1.0, report.summary()
    assert "2 detections found again" in report.summary()
    for changed in (
        [(2, 0.9, box), image[1]],  # another label
        [(0, 0.9, box + [0.2, 0.2, 0.2, 0.2]), image[1]],  # moved: IoU < 0.9
        [*image, (0, 0.8, np.array([0.0, 0.0, 1.0, 1.0]))],  # one invented
    ):
        report = precision.compare_detections("int8", [image] * 10, [image] * 9 + [changed])
        assert report.detection_agreement < 1.0
    report = precision.compare_detections("int8", [image], [[(2, 0.9, box), image[1]]])
    assert not report.passed and "REFUSED" in report.summary()


def _logits(spec: ModelSpec, chunk: list[str]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        feed = [torch.from_numpy(a) for a in spec.encode(chunk).values()]
        return spec.module(*feed)[0].numpy()


def test_broken_variant_fails_the_gate(small_vit, tmp_path):
    """A deliberately damaged int8 model must be refused: the gate can fail."""
    from hf_triton.export import export_onnx

    fp32 = tmp_path / "fp32.onnx"
    export_onnx(small_vit, fp32)
    broken = tmp_path / "int8.onnx"
    precision.quantize_onnx(fp32, broken)
    proto = onnx.load(str(broken))
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.int8 and array.size > 1000:  # the quantised weight matrices
            noise = rng.integers(-128, 128, array.shape).astype(np.int8)
            init.CopyFrom(numpy_helper.from_array(noise, init.name))
    onnx.save(proto, str(broken))
    with pytest.raises(precision.GateFailed, match="REFUSED"):
        precision.gate_onnx(ModelSpec.resolve(small_vit), "int8", fp32, broken)


def test_variants_serve_and_record_their_precision(small_vit, tmp_path, photo):
    """bf16 (python) and int8 (both approaches) built by the CLI, served, and compared with
    transformers' own fp32 answer."""
    import torch
    import transformers

    repos = []
    for prec, approach in (("bf16", "python"), ("int8", "both")):
        name = f"v{prec}"
        run = run_cli(
            "build",
            "--model",
            str(small_vit),
            "--name",
            name,
            "--precision",
            prec,
            "--approach",
            approach,
            "--preprocessing-name",
            f"{name}_pre",
            "--ensemble-name",
            f"ensemble_{name}",
            "--out",
            str(tmp_path / name),
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "accuracy gate:" in run.stdout and "PASSED" in run.stdout
        repos += [p for p in (tmp_path / name).iterdir() if p.name.endswith("repository")]
    image = photo.astype(np.uint8)[None]
    processor = transformers.AutoImageProcessor.from_pretrained(small_vit, backend="pil")
    model = transformers.AutoModel.from_pretrained(small_vit).eval()
    with torch.inference_mode():
        reference = model(**processor(images=list(image), return_tensors="pt"))
    reference = reference.last_hidden_state.numpy().reshape(-1)
    launched = launch(repos, tmp_path / "w")
    try:
        client = httpclient.InferenceServerClient(url=launched.url, network_timeout=120)
        for model_name in ("python_vbf16", "python_vint8", "ensemble_vint8"):
            tensor = httpclient.InferInput("image_uint8", list(image.shape), "UINT8")
            tensor.set_data_from_numpy(image)
            got = client.infer(model_name, [tensor]).as_numpy("last_hidden_state").reshape(-1)
            cosine = float(got @ reference / np.linalg.norm(got) / np.linalg.norm(reference))
            assert cosine >= precision.MIN_COSINE, (model_name, cosine)
        params = client.get_model_config("python_vbf16")["parameters"]
        assert params["precision"]["string_value"] == "bf16"
        client.close()
    finally:
        launched.stop()


def test_benchmark_precision_axis_smoke(small_vit, tmp_path):
    """`bench --precisions`: the int8 variant is built, gated, served and measured bare."""
    import json

    from hf_triton.serve import DEFAULT_REPOSITORIES

    run = run_cli(
        "bench",
        "--model-repository",
        str(DEFAULT_REPOSITORIES[1]),
        "--checkpoint",
        str(small_vit),
        "--precisions",
        "fp32,int8",
        "--formats",
        "uint8",
        "--concurrency",
        "1",
        "--models",
        "ensemble_model",
        "--window-s",
        "0.3",
        "--min-requests",
        "3",
        "--warmup-s",
        "0.2",
        "--max-windows",
        "3",
        "--workdir",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "out"),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "accuracy gate: int8" in run.stdout
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    # The benchmark's own server: its OpenMP waiting (the launcher's, unless the caller's
    # environment says otherwise) is named with the figures.
    waiting = " ".join(f"{k}={os.environ.get(k, v)}" for k, v in SERVER_ENV.items())
    assert "GOMP_SPINCOUNT=" in waiting and data["machine"]["server_env"] == waiting
    assert f"server environment: {waiting}" in run.stdout
    rows = data["results"]
    seen = {(r["name"], r["precision"]) for r in rows}
    assert {
        ("ensemble_model_int8", "int8"),
        ("bare-onnxruntime", "int8"),
        ("ensemble_model", "fp32"),
    } <= seen
