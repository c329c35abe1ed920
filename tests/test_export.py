"""Export to ONNX: validation against PyTorch passes a good model and rejects a tampered one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hf_triton import export
from hf_triton.checkpoints import Checkpoint
from hf_triton.serve import ensure_exported


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    report = export.export_onnx(tiny_checkpoint, path)
    assert report.ok and set(report.max_abs_diff) == {"last_hidden_state", "pooler_output"}
    return path


def test_export_names_and_dynamic_batch(exported):
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"


def test_export_records_its_checkpoint(exported, tiny_checkpoint):
    assert export.exported_checkpoint(exported) == str(tiny_checkpoint)


def test_validation_rejects_tampered_model(exported, tiny_checkpoint, tmp_path):
    proto = onnx.load(str(exported))
    weights = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(weights).copy()
    array += np.random.default_rng(0).normal(0, 0.1, array.shape).astype(array.dtype)
    weights.CopyFrom(numpy_helper.from_array(array, weights.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    with pytest.raises(export.ExportValidationError) as err:
        export.validate_onnx(tampered, tiny_checkpoint)
    assert "last_hidden_state: max |diff|" in str(err.value)


def test_failed_export_leaves_target_untouched(tiny_checkpoint, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(export.ExportValidationError):
        export.export_onnx(tiny_checkpoint, target, atol=-1.0)  # nothing can pass
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]


def test_launcher_reexports_only_when_stale(exported, tiny_checkpoint, tmp_path):
    model_dir = tmp_path / "vit"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(exported.read_bytes())
    current = Checkpoint(str(tiny_checkpoint), Path(tiny_checkpoint))
    before = (model_dir / "1" / "model.onnx").stat().st_mtime_ns
    ensure_exported(model_dir, current, tmp_path / "cache")
    assert (model_dir / "1" / "model.onnx").stat().st_mtime_ns == before

    other = tmp_path / "other"
    other.symlink_to(tiny_checkpoint, target_is_directory=True)
    ensure_exported(model_dir, Checkpoint(str(other), other), tmp_path / "cache")
    assert export.exported_checkpoint(model_dir / "1" / "model.onnx") == str(other)
