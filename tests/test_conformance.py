"""The conformance matrix as users run it (`hf-triton conformance --quick`): every model
family's features (through the ensemble; through the Python pipeline too where it has code of
its own), one family per kind of classification head and ModernBERT's NER, both approaches,
served by real servers and judged by references this project did not write (transformers'
pipelines, the families' processors and models, sentence-transformers). `hf-triton conformance`
without --quick runs every family, task and approach (the README's table).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_triton import conformance, families

from helpers import Background

CASES = conformance.cases(quick=True)


@pytest.fixture(scope="module")
def matrix(conformance_run: Background | None) -> tuple[int, list[dict], Path]:
    """The report of `hf-triton conformance --quick`, which the session started first
    (conftest.conformance_run) so that it runs beside the other tests."""
    assert conformance_run is not None
    run = conformance_run.result(timeout=1800)
    out = conformance_run.out.parent
    assert (out / "conformance.json").exists(), run.stdout[-6000:]
    rows = json.loads((out / "conformance.json").read_text())["rows"]
    return run.returncode, rows, out


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.family}-{c.task}-{c.name}".replace(" ", "_") for c in CASES]
)
def test_served_both_ways_like_the_reference(matrix, case):
    _, rows, _ = matrix
    mine = [
        r
        for r in rows
        if (r["family"], r["task"], r["reference"]) == (case.family, case.task, case.reference)
    ]
    assert [r["approach"] for r in mine] == list(case.approaches), mine
    for row in mine:
        assert row["verdict"] == "pass", row


def test_matrix_covers_every_family_and_task(matrix):
    returncode, rows, out = matrix
    assert returncode == 0, [r for r in rows if r["verdict"] != "pass"]
    covered = {(r["family"], r["task"], r["approach"]) for r in rows}
    for family in families.FAMILIES.values():
        for task in family.tasks:
            served = {a for f, t, a in covered if (f, t) == (family.name, task)}
            if task.endswith("feature-extraction"):
                python = family.name in conformance.QUICK_PYTHON_FEATURES
                assert served == {"python", "ensemble"} if python else {"ensemble"}, served
            elif family.name in conformance.quick_families(task):
                assert served == {"python", "ensemble"}, (family.name, task)
    table = (out / "conformance.md").read_text()
    assert "| family | task | approach |" in table and "all-MiniLM-L6-v2" not in table
    assert "minilm" in {c.name for c in conformance.cases(["minilm"], quick=True)}


def test_image_text_towers_equal_the_models_own_features(matrix):
    """CLIP's towers, served alone (image -> image_embeds, text -> text_embeds), against the
    model's get_image_features / get_text_features, normalised."""
    _, rows, _ = matrix
    towers = [r for r in rows if r["reference"] == conformance.TOWERS_REFERENCE]
    assert [(r["family"], r["approach"]) for r in towers] == [
        ("clip", "python"),
        ("clip", "ensemble"),
    ]
    for row in towers:
        assert row["verdict"] == "pass" and "image_embeds, text_embeds" in row["note"], row


def test_vectorised_path_self_checks_and_falls_back(matrix):
    """Served processors: the fast path where it reproduces the processor, else the processor."""
    _, _, out = matrix
    log = (out / "work" / "image" / "tritonserver.log").read_text()
    line = next(x for x in log.splitlines() if "efficientnet_fe_pre: processor only" in x)
    assert "(reference: not applicable (EfficientNetImageProcessorPil changes pixel" in line
    for family in ("vit", "deit", "convnext", "dinov2", "clip"):
        line = next(x for x in log.splitlines() if f"{family}_fe_pre: processor only" in x)
        assert "(vectorized: self-check max |diff|" in line, line
    line = next(x for x in log.splitlines() if "python_vit_fe: processor +" in x)
    assert "(vectorized: self-check max |diff|" in line, line  # the pipeline's own copy


# -- the judges can fail ---------------------------------------------------------------------


def test_judges_fail_what_differs():
    """Each comparison refuses a near miss, so a passing row means something."""
    rng = np.random.default_rng(0)
    want = rng.normal(size=(4, 16)).astype(np.float32)
    assert conformance.judge_embeddings(want.copy(), want).verdict == "pass"
    assert (
        conformance.judge_embeddings(want + 0.05 * rng.normal(size=want.shape), want).verdict
        == "FAIL"
    )
    assert conformance.judge_embeddings(want[:, :8], want).verdict == "FAIL"

    features = {"last_hidden_state": want[None], "pooler_output": want[:1]}
    assert conformance.judge_features(features, features, 1e-4).verdict == "pass"
    shifted = {n: v + 1e-3 for n, v in features.items()}
    assert conformance.judge_features(shifted, features, 1e-4).verdict == "FAIL"
    assert conformance.judge_features({"logits": want}, features, 1e-4).verdict == "FAIL"

    labels = ["NEGATIVE", "POSITIVE"]
    pipeline_answer = [[{"label": "POSITIVE", "score": 0.7}, {"label": "NEGATIVE", "score": 0.3}]]
    good = np.array([[0.3, 0.7]])
    assert conformance.judge_scores(good, pipeline_answer, labels, 1e-4).verdict == "pass"
    assert conformance.judge_scores(good[:, ::-1], pipeline_answer, labels, 1e-4).verdict == "FAIL"
    assert (
        conformance.judge_scores(good + [[-0.01, 0.01]], pipeline_answer, labels, 1e-4).verdict
        == "FAIL"
    )

    box = {"xmin": 1, "ymin": 2, "xmax": 30, "ymax": 40}
    found = [
        [{"score": 0.9, "label": "cat", "box": box}, {"score": 0.6, "label": "dog", "box": box}]
    ]
    assert conformance.judge_detections(found, found, 1e-3, 1).verdict == "pass"
    for change in ({"label": "bird"}, {"score": 0.902}, {"box": {**box, "xmax": 32}}):
        near = [[{**found[0][0], **change}, found[0][1]]]
        assert conformance.judge_detections(near, found, 1e-3, 1).verdict == "FAIL", change
    assert conformance.judge_detections([found[0][:1]], found, 1e-3, 1).verdict == "FAIL"
    one_px = [[{**found[0][0], "box": {**box, "xmin": 2}}, found[0][1]]]
    assert conformance.judge_detections(one_px, found, 1e-3, 1).verdict == "pass"

    entity = {"entity_group": "PER", "score": 0.9, "word": "angela", "start": 0, "end": 6}
    want_entities = [[entity, {**entity, "entity_group": "LOC", "start": 7, "end": 13}]]
    assert conformance.judge_entities(want_entities, want_entities, 1e-4).verdict == "pass"
    for change in ({"end": 5}, {"entity_group": "ORG"}, {"word": "angel"}, {"score": 0.9002}):
        near = [[{**entity, **change}, want_entities[0][1]]]
        assert conformance.judge_entities(near, want_entities, 1e-4).verdict == "FAIL", change
    assert conformance.judge_entities([want_entities[0][:1]], want_entities, 1e-4).verdict == (
        "FAIL"
    )

    ranking = [{"score": 0.5, "label": "a cat"}, {"score": 0.3, "label": "a dog"}]
    ranking.append({"score": 0.2, "label": "a bird"})
    assert conformance.judge_zero_shot([ranking], [ranking], 1e-4).verdict == "pass"
    swapped = [ranking[1], ranking[0], ranking[2]]
    assert conformance.judge_zero_shot([swapped], [ranking], 1e-4).verdict == "FAIL"
    nudged = [{**ranking[0], "score": 0.5002}, *ranking[1:]]
    assert conformance.judge_zero_shot([nudged], [ranking], 1e-4).verdict == "FAIL"
    renamed = [ranking[0], {**ranking[1], "label": "a dgo"}, ranking[2]]
    assert conformance.judge_zero_shot([renamed], [ranking], 1e-4).verdict == "FAIL"
    assert conformance.judge_zero_shot([ranking[:2]], [ranking], 1e-4).verdict == "FAIL"
    tie = [ranking[0], {**ranking[1], "score": 0.25}, {**ranking[2], "score": 0.25}]
    near_tie = [tie[0], tie[2], tie[1]]  # equal scores: either order is the pipeline's
    assert conformance.judge_zero_shot([near_tie], [tie], 1e-4).verdict == "pass"
