"""Token classification (NER) served for real (the `text_server` fixture's tiny BERT NER model,
both approaches), judged against transformers' own ``pipeline("token-classification")``.

The tiny model has random weights, so its entities are arbitrary but plentiful: words split
into several pieces, runs of one type, adjacent entities of different types. The tests assert
that the references really contain those cases, so a pass is never vacuous.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers import run_client

SENTENCES = [
    "Angela Merkel met Barack Obama in Zürich and Tōkyō yesterday.",
    "Ünïcödé: naïve café, Größe, 東京タワー, Ελληνικά 🚀🙂 at the New York Times.",
    "  Leading spaces, then Antidisestablishmentarianism in Łódź.",
    "Short.",
]
STRATEGIES = ["none", "simple", "first", "average", "max"]
APPROACHES = ["python", "ensemble"]
#: |served score - pipeline score|: PyTorch in the pipeline vs PyTorch (python) or ONNX Runtime.
SCORE_ATOL = {"python": 1e-4, "ensemble": 1e-3}


def send(url: str, model: str, texts: list[str], strategy: str | None = None) -> list[list]:
    with httpclient.InferenceServerClient(url=url, network_timeout=120) as client:
        data = np.array([[t.encode()] for t in texts], dtype=object)
        tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        params = {"aggregation_strategy": strategy} if strategy else None
        result = client.infer(model, [tensor], parameters=params)
        return [json.loads(row) for row in result.as_numpy("entities").reshape(-1)]


@pytest.fixture(scope="module")
def pipelines(text_server):
    import transformers

    model = transformers.AutoModelForTokenClassification.from_pretrained(text_server.ner)
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_server.ner)
    return {
        s: transformers.pipeline(
            "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=s
        )
        for s in STRATEGIES
    }


def _plain(entities: list[dict]) -> list[dict]:
    """Everything but the score, as JSON types (the pipeline returns numpy integers)."""
    return [
        {k: (v if isinstance(v, str) else int(v)) for k, v in e.items() if k != "score"}
        for e in entities
    ]


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_equal_the_pipeline(text_server, pipelines, approach, strategy):
    """One request of texts of different lengths: every entity's label, word and character
    offsets equal the pipeline's, scores within the approach's bound."""
    got = send(text_server.url, f"{approach}_bertner", SENTENCES, strategy)
    for text, served in zip(SENTENCES, got, strict=True):
        want = pipelines[strategy](text)
        assert _plain(served) == _plain(want), text
        for s, w in zip(served, want, strict=True):
            assert abs(s["score"] - float(w["score"])) <= SCORE_ATOL[approach], (text, s, w)
            assert text[s["start"] : s["end"]].strip()  # offsets index the text as sent


def test_the_references_cover_subwords_and_adjacent_entities(pipelines):
    """The cases the issue names exist in what the tests compare (not vacuous)."""
    simple = [pipelines["simple"](t) for t in SENTENCES]
    first = [pipelines["first"](t) for t in SENTENCES]
    assert any(len(e["word"].split()) > 1 or "##" in e["word"] for es in simple for e in es)
    assert any(
        a["entity_group"] != b["entity_group"] and b["start"] - a["end"] <= 1
        for es in first
        for a, b in zip(es, es[1:], strict=False)
    )
    assert any(e["end"] - e["start"] > 1 for es in first for e in es)  # multi-piece words


@pytest.mark.parametrize("approach", APPROACHES)
def test_default_strategy_is_the_configs(text_server, pipelines, approach):
    """No request parameter: the build's --aggregation-strategy (default simple)."""
    got = send(text_server.url, f"{approach}_bertner", SENTENCES[:1])
    assert _plain(got[0]) == _plain(pipelines["simple"](SENTENCES[0]))


@pytest.mark.parametrize("approach", APPROACHES)
def test_unknown_strategy_and_bad_text_are_refused(text_server, approach):
    with pytest.raises(InferenceServerException) as err:
        send(text_server.url, f"{approach}_bertner", SENTENCES[:1], "longest")
    assert err.value.status() == "400"
    assert "aggregation_strategy 'longest': one of none, simple, first, average, max" in (
        err.value.message()
    )
    with pytest.raises(InferenceServerException) as err:
        send(text_server.url, f"{approach}_bertner", ["   "])
    assert err.value.status() == "400" and "input 'text'[0]: empty text" in err.value.message()


def test_client_prints_entities(text_server, pipelines):
    run = run_client(
        "--url",
        text_server.url,
        "--model_name",
        "ensemble_bertner",
        "--text",
        SENTENCES[0],
        "--aggregation-strategy",
        "first",
    )
    assert run.returncode == 0, run.stderr
    want = pipelines["first"](SENTENCES[0])
    assert f"{len(want)} entities" in run.stdout
    first = want[0]
    span = SENTENCES[0][first["start"] : first["end"]]
    assert (
        f"{first['entity_group']:<8} {first['score']:.3f}  [{first['start']}:{first['end']}]"
        in (run.stdout)
        and repr(span) in run.stdout
    )
