"""`hf-triton build` without a server: task dispatch, the tutorial repositories as its output,
and what it refuses (naming why) before writing anything. Serving every family both ways is
tests/test_conformance.py; the text models' serving behaviour is tests/test_text.py."""

from __future__ import annotations

import re
import shutil

import pytest

from hf_triton import checkpoints, families, tasks
from hf_triton.build import BuildOptions, build
from hf_triton.serve import DEFAULT_REPOSITORIES
from hf_triton.spec import ModelSpec

from conftest import TINY_VIT

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
        ({"architectures": ["XLMRobertaForTokenClassification"]}, "token-classification"),
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


def test_torch_threads_parameter_sets_pytorch_threads():
    """The Python pipeline's ``torch_threads`` (optimize splits the cores between instances)."""
    import torch

    from hf_triton.templates import hf_common

    before = torch.get_num_threads()
    try:
        assert hf_common.set_torch_threads({"torch_threads": "1"}) == 1 == torch.get_num_threads()
        assert hf_common.set_torch_threads({"torch_threads": "0"}) == 1  # 0: left as it is
        with pytest.raises(hf_common.ModelError, match="torch_threads must be >= 0"):
            hf_common.set_torch_threads({"torch_threads": "-2"})
    finally:
        torch.set_num_threads(before)


def test_token_classification_ensemble_has_a_postprocessing_step(tmp_path):
    """NER: tokenizer (+ offsets) -> model.onnx (logits) -> postprocessing (entities); an
    unknown aggregation strategy is refused before anything is written."""
    ckpt = families.FAMILIES["distilbert"].make(tmp_path / "ner", "token-classification")
    spec = ModelSpec.resolve(ckpt)
    with pytest.raises(tasks.UnsupportedModel, match="aggregation strategy 'longest'"):
        build(spec, tmp_path / "bad", options=BuildOptions(aggregation_strategy="longest"))
    assert not (tmp_path / "bad").exists()
    result = build(spec, tmp_path / "out", options=BuildOptions(name="ner"), export_onnx=False)
    assert result.models == [
        "python_ner",
        "preprocessing",
        "ner",
        "ensemble_model",
        "postprocessing",
    ]
    ensemble = (tmp_path / "out/ensemble_model_repository/ensemble_model/config.pbtxt").read_text()
    steps = [line.split('"')[1] for line in ensemble.splitlines() if "model_name:" in line]
    assert steps == ["preprocessing", "ner", "postprocessing"]
    post = (tmp_path / "out/ensemble_model_repository/postprocessing/config.pbtxt").read_text()
    for name in ("text", "input_ids", "offset_mapping", "special_tokens_mask", "logits"):
        assert f'name: "{name}"' in post
    assert 'key: "aggregation_strategy"' in post and 'string_value: "simple"' in post
    # DistilBERT takes no token_type_ids: neither the ONNX step nor the tokenizer step has them.
    assert "token_type_ids" not in ensemble


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


# -- what build refuses, before writing anything ----------------------------------------------


def test_unsupported_sentence_transformers_module_is_refused(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    base = families.FAMILIES["bert"].make(tmp_path / "hf", "text-feature-extraction")
    transformer = modules.Transformer(str(base))
    dim = transformer.get_embedding_dimension()
    stack = [transformer, modules.Pooling(dim, "mean"), modules.LayerNorm(dim)]
    SentenceTransformer(modules=stack, device="cpu").save(str(tmp_path / "st"))
    with pytest.raises(tasks.UnsupportedModel) as err:
        build(ModelSpec.resolve(tmp_path / "st"), tmp_path / "out")
    assert "sentence-transformers module" in str(err.value) and "LayerNorm" in str(err.value)
    assert "supported: Transformer, Pooling, Dense, Normalize" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_model_that_fails_on_its_own_processor_output_is_refused(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    ViTModel(ViTConfig(**TINY_VIT)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 96, "width": 96}).save_pretrained(tmp_path / "vit")
    with pytest.raises(tasks.UnsupportedModel) as err:
        build(ModelSpec.resolve(tmp_path / "vit"), tmp_path / "out")
    assert "ViTModel fails on its own ViTImageProcessorPil's output" in str(err.value)
    assert "doesn't match model" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", 'q"uote'])
def test_model_names_cannot_leave_the_output_directory(tmp_path, tiny_checkpoint, name):
    with pytest.raises(tasks.UnsupportedModel, match="a model name is a directory name"):
        build(ModelSpec.resolve(tiny_checkpoint), tmp_path / "out", options=BuildOptions(name=name))
    assert not (tmp_path / "out").exists()


def test_checkpoint_path_with_quotes_stays_one_pbtxt_string(tmp_path, tiny_checkpoint):
    from hf_triton.serve import read_config

    odd = tmp_path / 'my "best" checkpoint\\v2'
    shutil.copytree(tiny_checkpoint, odd)
    build(ModelSpec.resolve(odd), tmp_path / "out", export_onnx=False)
    repo = tmp_path / "out" / "python_model_repository"
    config = read_config(repo / "python_vit" / "config.pbtxt")
    assert config.parameters["checkpoint"].string_value == str(odd)


def test_gpu_placement_is_written_and_precisions_that_cannot_run_there_are_refused(
    tmp_path, tiny_checkpoint
):
    """--instance-kind KIND_GPU reaches the Python pipeline's instance_group (Triton's schema
    parses it); fp16 off a GPU and PyTorch int8 on one are refused before anything is written."""
    from tritonclient.grpc import model_config_pb2

    from hf_triton.serve import read_config

    spec = ModelSpec.resolve(tiny_checkpoint)
    build(spec, tmp_path / "ok", "python", BuildOptions(instance_kind="KIND_GPU"), False)
    cfg = read_config(tmp_path / "ok" / "python_model_repository" / "python_vit" / "config.pbtxt")
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    refused = {
        "fp16 runs on GPU instances only: add --instance-kind KIND_GPU": BuildOptions(
            precision="fp16"
        ),
        "int8 (PyTorch's dynamic int8) runs on CPU instances only": BuildOptions(
            precision="int8", instance_kind="KIND_GPU"
        ),
        "--instance-kind 'KIND_TPU': one of KIND_CPU, KIND_GPU": BuildOptions(
            instance_kind="KIND_TPU"
        ),
    }
    for message, options in refused.items():
        with pytest.raises(tasks.UnsupportedModel, match=re.escape(message)):
            build(spec, tmp_path / "no", "python", options, False)
        assert not (tmp_path / "no").exists()


def test_unbounded_queue_writes_no_queue_policy_so_triton_can_prefetch(tmp_path, tiny_checkpoint):
    """Triton prefetches the next batch only without a queue policy (no size limit, no
    timeout); `--max-queue-size 0` writes none (README: the late batches at saturation)."""
    from hf_triton.serve import read_config

    spec = ModelSpec.resolve(tiny_checkpoint)
    for name, options in (("bounded", BuildOptions()), ("open", BuildOptions(max_queue_size=0))):
        build(spec, tmp_path / name, "python", options, False)
    path = "python_model_repository/python_vit/config.pbtxt"
    bounded = read_config(tmp_path / "bounded" / path).dynamic_batching
    assert bounded.default_queue_policy.max_queue_size == 16
    assert bounded.default_queue_policy.default_timeout_microseconds == 10_000_000
    assert not read_config(tmp_path / "open" / path).dynamic_batching.HasField(
        "default_queue_policy"
    )


def test_instances_flag_sets_the_instance_group_count_and_zero_is_refused(
    tmp_path, tiny_checkpoint
):
    """`build --instances N` (what the GPU check serves with) reaches Triton's instance_group
    count of the Python pipeline, on the kind asked for; 0 is refused before writing."""
    from tritonclient.grpc import model_config_pb2

    from hf_triton.serve import read_config

    from helpers import run_cli

    common = ("build", "--model", str(tiny_checkpoint), "--approach", "python", "--no-export")
    gpu = ("--instances", "3", "--instance-kind", "KIND_GPU")
    ok = run_cli(*common, *gpu, "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    cfg = read_config(tmp_path / "ok" / "python_model_repository" / "python_vit" / "config.pbtxt")
    (group,) = cfg.instance_group
    assert (group.count, group.kind) == (3, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    no = run_cli(*common, "--instances", "0", "--out", str(tmp_path / "no"))
    assert no.returncode != 0 and "--instances 0: 1 or more" in no.stdout + no.stderr
    assert not (tmp_path / "no").exists()


def test_onnx_spin_writes_the_backends_auto_or_onnx_runtimes_own_key(tmp_path, tiny_checkpoint):
    """`--onnx-spin` (default auto: the backend chooses when it loads), never / within-run as
    ONNX Runtime's own session options; anything else refused before writing."""
    from hf_triton.build import BuildOptions, build
    from hf_triton.serve import read_config
    from hf_triton.spec import ModelSpec
    from hf_triton.tasks import UnsupportedModel

    spec = ModelSpec.resolve(tiny_checkpoint)
    expected = {
        "auto": ("intra_op_spinning", "auto"),
        "never": ("session.intra_op.allow_spinning", "0"),
        "within-run": ("session.force_spinning_stop", "1"),
    }
    for mode, (key, value) in expected.items():
        out = tmp_path / mode
        build(spec, out, "ensemble", BuildOptions(onnx_spin=mode), export_onnx=False)
        params = read_config(out / "ensemble_model_repository" / "vit" / "config.pbtxt").parameters
        spinning = {k: p.string_value for k, p in params.items() if "spin" in k}
        assert spinning == {key: value}, (mode, spinning)
    with pytest.raises(UnsupportedModel, match="--onnx-spin 'sometimes': one of auto, never"):
        build(spec, tmp_path / "no", "ensemble", BuildOptions(onnx_spin="sometimes"))
    assert not (tmp_path / "no").exists()
