"""`build --torch-compile`: the Python pipeline's model compiled by torch.compile while it loads,
gated against eager fp32, served by the real server and checked against references we did not
write (transformers' processor + model, sentence-transformers), at a batch of one and larger
batches (two compiled graphs), and measured by the benchmark against bare PyTorch compiled
alike. Tiny models: every one is compiled twice (the build's gate, then
the stub), and a real all-MiniLM-L6-v2 made this the suite's slowest test; the real MiniLM
compiled in bf16 is measured and gated by `hf-triton optimize` (docs/optimize)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from test_bench import run_bench
from test_precision import SMALL_VIT
from test_text import SENTENCES, send_text

from hf_triton import precision
from hf_triton.build import BuildOptions, build
from hf_triton.checkpoints import build_vit_checkpoint
from hf_triton.conformance import _sentence_transformer
from hf_triton.families import FAMILIES
from hf_triton.spec import ModelSpec
from hf_triton.tasks import UnsupportedModel
from hf_triton.templates import hf_common

from conftest import launch
from helpers import run_cli


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _build(model: Path, name: str, prec: str, out: Path) -> list[Path]:
    run = run_cli(
        "build",
        "--model",
        str(model),
        "--name",
        name,
        "--approach",
        "python",
        "--precision",
        prec,
        "--torch-compile",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"accuracy gate: {prec}+torch.compile vs fp32" in run.stdout
    assert "PASSED" in run.stdout
    return [out / "python_model_repository"]


def test_compiled_pipelines_serve_the_references_answers(tmp_path, photo):
    """An fp32 ViT and a BERT sentence encoder (mean pooling, normalised) in bf16, compiled:
    every image and sentence answered as transformers / sentence-transformers answer it, alone
    and in batches."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    vit = build_vit_checkpoint(tmp_path / "vit", seed=1, **SMALL_VIT)
    bert = FAMILIES["bert"].make(tmp_path / "bert", "text-feature-extraction")
    encoder = _sentence_transformer(bert, tmp_path / "st", "mean")
    # The two builds at once: each spends most of its time in one core's Python (tracing).
    with ThreadPoolExecutor(2) as pool:
        built = pool.map(
            lambda job: _build(*job),
            [(vit, "cvit", "fp32", tmp_path / "cvit"), (encoder, "cst", "bf16", tmp_path / "cst")],
        )
        repos = [repo for repositories in built for repo in repositories]
    params = tmp_path / "cvit" / "python_model_repository" / "python_cvit" / "config.pbtxt"
    assert 'key: "torch_compile"\n    value: { string_value: "1" }' in params.read_text()

    rng = np.random.default_rng(0)
    images = [photo.astype(np.uint8), rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)]
    processor = transformers.AutoImageProcessor.from_pretrained(vit, backend="pil")
    model = transformers.AutoModel.from_pretrained(vit).eval()
    st = SentenceTransformer(str(encoder), device="cpu")

    launched = launch(repos, tmp_path / "w")
    try:
        client = httpclient.InferenceServerClient(url=launched.url, network_timeout=120)
        for batch in ([images[0]], [images[1]] * 3):  # the graph of one, then the batched one
            pixels = np.stack([np.asarray(Image.fromarray(i).resize((320, 240))) for i in batch])
            tensor = httpclient.InferInput("image_uint8", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            got = client.infer("python_cvit", [tensor]).as_numpy("last_hidden_state")
            with torch.inference_mode():
                want = model(**processor(images=list(pixels), return_tensors="pt"))
            cosines = _cosines(got, want.last_hidden_state.numpy())
            assert cosines.min() >= 0.9999, cosines  # fp32: compiled, same arithmetic
        client.close()
        for texts in ([SENTENCES[0]], SENTENCES):
            got = send_text(launched.url, "python_cst", texts, "sentence_embedding")
            want = st.encode(texts, convert_to_numpy=True)
            cosines = _cosines(got, want)
            assert cosines.min() >= precision.MIN_COSINE, cosines  # bf16: the gate's bound
        # The benchmark measures it against bare PyTorch compiled as model.py compiles it, and
        # checks the served answer against that first.
        out = tmp_path / "bench"
        run = run_bench(
            "--url", launched.url, "--protocol", "http", "--models", "python_cvit",
            "--formats", "uint8", "--concurrency", "1", "--out", str(out),
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
        assert set(rows) == {"python_cvit", "bare-pytorch-compiled"}, rows
        assert rows["python_cvit"]["check"].startswith("ok (cos"), rows["python_cvit"]
        log = launched.log()
        assert "python_cvit: processor + ViTModel (torch.compile: " in log
        assert "python_cst: tokenizer + BertModel (torch.compile: " in log
        # model.py logs every graph compiled after its warm-up: none may be, whatever the
        # batch (a lone image once compiled a third graph, seconds on a client's request).
        assert "[__recompiles]" not in log, log[log.index("[__recompiles]") - 200 :][:2000]
    finally:
        launched.stop()


@pytest.mark.parametrize(
    "options,words",
    [
        (dict(precision="int8"), "--torch-compile is offered for --precision fp32 or bf16"),
        (dict(instance_kind="KIND_GPU"), "--torch-compile runs on KIND_CPU instances"),
    ],
)
def test_what_compile_is_not_offered_for_is_refused_before_writing(tmp_path, options, words):
    vit = build_vit_checkpoint(tmp_path / "vit", seed=1, **SMALL_VIT)
    with pytest.raises(UnsupportedModel, match=words):
        build(
            ModelSpec.resolve(vit),
            tmp_path / "out",
            approach="python",
            options=BuildOptions(torch_compile=True, **options),
        )
    with pytest.raises(UnsupportedModel, match="--approach python or both"):
        build(
            ModelSpec.resolve(vit),
            tmp_path / "out",
            approach="ensemble",
            options=BuildOptions(torch_compile=True),
        )
    assert not (tmp_path / "out").exists()


def test_model_py_refuses_a_torch_compile_it_cannot_honour():
    """What a hand-edited config.pbtxt gets at load time (model.py's check)."""
    import torch

    cpu = torch.device("cpu")
    assert hf_common.wants_compile({}, "fp32", cpu) is False
    assert hf_common.wants_compile({"torch_compile": "1"}, "bf16", cpu) is True
    with pytest.raises(hf_common.ModelError, match="must be 0 or 1, got 'yes'"):
        hf_common.wants_compile({"torch_compile": "yes"}, "fp32", cpu)
    with pytest.raises(hf_common.ModelError, match="not int8"):
        hf_common.wants_compile({"torch_compile": "1"}, "int8", cpu)
    with pytest.raises(hf_common.ModelError, match="KIND_CPU"):
        hf_common.wants_compile({"torch_compile": "1"}, "fp32", torch.device("cuda", 0))
