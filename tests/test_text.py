"""Text models served by the real server (the `text_server` fixture: real all-MiniLM-L6-v2 and
a tiny BERT classifier, both approaches, launcher defaults on): meaning, labels through Triton's
classification extension, bad text, and the client script."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers import run_client

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The stock market fell sharply today.",
]
APPROACHES = ["python", "ensemble"]


def send_text(url: str, model: str, texts: list[str], output: str, class_count: int = 0):
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        data = np.array([[t.encode()] for t in texts], dtype=object)
        tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        out = httpclient.InferRequestedOutput(output, class_count=class_count)
        return client.infer(model, [tensor], outputs=[out]).as_numpy(output)


def test_minilm_equals_sentence_transformers(text_server):
    """The headline check, the conformance matrix's own (`hf-triton conformance --families
    minilm`): the real all-MiniLM-L6-v2 served both ways against sentence-transformers on the
    same weights, sentences with Unicode, emoji, whitespace and more tokens than it takes."""
    from hf_triton import conformance

    (case,) = conformance.cases(["minilm"])  # the matrix's own case, served here
    case.checkpoint = text_server.minilm
    rows = conformance.check(case, text_server.url, {})
    assert [r.approach for r in rows] == APPROACHES, rows
    for row in rows:
        assert row.verdict == "pass" and row.value >= conformance.MIN_COSINE, row


@pytest.mark.parametrize("approach", APPROACHES)
def test_minilm_related_sentences_score_higher(text_server, approach):
    e = send_text(text_server.url, f"{approach}_minilm", SENTENCES, "sentence_embedding")
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)  # Normalize module
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[3])
    assert related > unrelated + 0.2, (related, unrelated)


@pytest.mark.parametrize("approach", APPROACHES)
def test_top_k_labels_through_the_classification_extension(text_server, approach):
    import transformers

    pipe = transformers.pipeline("text-classification", model=str(text_server.classifier))
    want = pipe(list(SENTENCES), top_k=None)
    top = send_text(text_server.url, f"{approach}_bertcls", SENTENCES, "logits", class_count=2)
    for row, expected in zip(top, want, strict=True):
        entries = [entry.decode().split(":") for entry in row]  # "logit:index:label"
        assert [label for _, _, label in entries] == [e["label"] for e in expected]
        # The extension reports logits; their softmax is the pipeline's probabilities.
        logits = np.array([float(value) for value, _, _ in entries])
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        atol = 1e-4 if approach == "python" else 1e-3
        np.testing.assert_allclose(probabilities, [e["score"] for e in expected], atol=atol)


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize(
    "texts,words",
    [([""], "empty text"), (["   "], "empty text"), (["nul\x00byte"], "contains a NUL")],
)
def test_bad_text_is_rejected(text_server, approach, texts, words):
    with pytest.raises(InferenceServerException) as err:
        send_text(text_server.url, f"{approach}_minilm", texts, "sentence_embedding")
    assert err.value.status() == "400"
    assert f"input 'text'[0]: {words}" in err.value.message()


@pytest.mark.parametrize("approach", APPROACHES)
def test_invalid_utf8_is_rejected_and_overlong_text_truncated(text_server, approach):
    tensor = httpclient.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"\xff\xfe broken"]], dtype=object))
    with (
        httpclient.InferenceServerClient(url=text_server.url) as client,
        pytest.raises(InferenceServerException) as err,
    ):
        client.infer(f"{approach}_minilm", [tensor])
    assert err.value.status() == "400" and "input 'text'[0]: not valid UTF-8" in err.value.message()
    long = " ".join(["word"] * 600)  # far past max_seq_length 256: truncated, still served
    assert send_text(text_server.url, f"{approach}_minilm", [long], "sentence_embedding").shape == (
        1,
        384,
    )


def test_client_prints_similarity(text_server):
    run = run_client(
        "--url",
        text_server.url,
        "--model_name",
        "ensemble_minilm",
        "--text",
        SENTENCES[0],
        "--text",
        SENTENCES[1],
    )
    assert run.returncode == 0, run.stderr
    assert "sentence_embedding: shape (2, 384)" in run.stdout and "cosine similarity" in run.stdout
