"""The repositories as Triton reads them: configs valid under Triton's schema, one model.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_triton.serve import DEFAULT_REPOSITORIES, onnx_models, read_config

CONFIGS = sorted(p for repo in DEFAULT_REPOSITORIES for p in repo.glob("*/config.pbtxt"))


def test_repositories_have_the_tutorial_layout():
    names = {p.parent.name for p in CONFIGS}
    assert names == {"python_vit", "preprocessing", "ensemble_model", "vit"}
    vit = [m.name for repo in DEFAULT_REPOSITORIES for m in onnx_models(repo)]
    assert vit == ["vit"]


def test_vit_config_is_tuning_only():
    """The tensor schema of `vit` comes from model.onnx (auto-complete), never by hand."""
    cfg = read_config(DEFAULT_REPOSITORIES[1] / "vit" / "config.pbtxt")
    assert cfg.backend == "onnxruntime"
    assert not cfg.input and not cfg.output and cfg.max_batch_size == 0
    assert {"intra_op_thread_count", "execution_mode"} <= set(cfg.parameters)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_config_parses_with_triton_schema(path: Path):
    cfg = read_config(path)
    assert cfg.name == path.parent.name
    if cfg.backend == "python":
        assert cfg.parameters["checkpoint"].string_value == "google/vit-base-patch16-224-in21k"
    if cfg.name != "vit":
        assert cfg.max_batch_size == 8


def test_python_models_are_one_file():
    """preprocessing and python_vit share one model.py (role chosen by the config's outputs)."""
    a, b = (repo.glob("*/1/model.py") for repo in DEFAULT_REPOSITORIES)
    texts = {p.read_text() for p in [*a, *b]}
    assert len(texts) == 1


def test_ensemble_wires_named_tensors():
    ensemble = read_config(DEFAULT_REPOSITORIES[1] / "ensemble_model" / "config.pbtxt")
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocessing", "vit"]
    assert dict(steps[1].output_map) == {
        "last_hidden_state": "last_hidden_state",
        "pooler_output": "pooler_output",
    }


def test_templates_share_one_copy_of_the_tables():
    """model.py files take their tables from hf_common.py, which the package imports too."""
    from hf_triton import build, checkpoints, precision, tasks
    from hf_triton.templates import hf_common

    assert {name: task.auto_class for name, task in tasks.TASKS.items()} == hf_common.MODEL_CLASSES
    assert precision.PRECISIONS is hf_common.PRECISIONS
    assert checkpoints.STANDIN_MARKER is hf_common.STANDIN_MARKER
    for template in build.MODEL_PY.values():
        source = template.read_text()
        for copy in ("MODEL_CLASSES =", "STANDIN_MARKER =", "PRECISIONS", "AutoModel", "qconfig"):
            assert copy not in source, f"{template.name} carries its own {copy!r}"
    for repo in DEFAULT_REPOSITORIES:
        for model_py in repo.glob("*/1/model.py"):
            common = model_py.with_name("hf_common.py")
            assert common.read_bytes() == build.COMMON_PY.read_bytes(), common
