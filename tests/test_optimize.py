"""`hf-triton optimize`: the machine's kind, the candidates it can run, the choice by
measurement, tuning by reloading configs, and a written repository that serves transformers'
numbers. No speed is asserted: the choice must be the best *measured* candidate."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from hf_triton import hardware, optimize
from hf_triton.families import FAMILIES
from hf_triton.optimize import OptimizeError

from conftest import launch
from helpers import run_cli

AVX2 = "fpu sse sse2 avx fma avx2"
AVX512 = f"{AVX2} avx512f avx512bw avx512vl avx512_vnni avx512_bf16"
AMX = f"{AVX512} amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    ("flags", "kind", "bf16"),
    [
        (AVX2, "AVX2", False),
        (f"{AVX2} avx_vnni", "AVX2 + VNNI", False),
        ("fpu sse sse2 avx fma avx2 avx512f avx512_vnni", "AVX-512 + VNNI", False),
        (AVX512, "AVX-512 + BF16 + VNNI", True),
        (AMX, "AMX", True),
        ("fpu sse sse2", "no AVX2", False),
    ],
)
def test_machine_kind_from_cpuinfo(flags, kind, bf16):
    text = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    cpu, parsed = hardware.parse_cpuinfo(text)
    machine = hardware.Machine(cpu, 2, parsed)
    assert (cpu, machine.kind, machine.bf16) == ("Some CPU", kind, bf16)
    plan = {c.key: c.skipped for c in optimize.candidates(machine)}
    assert bool(plan["bf16-pytorch"]) is not bf16, plan["bf16-pytorch"]
    assert plan["fp16-pytorch"] == "fp16 needs a GPU"
    assert not plan["int8-onnxruntime"] and not plan["fp32-pytorch"]
    # torch.compile: where a C++ compiler is (this machine has g++), for what runs eager here
    assert not plan["fp32-pytorch-compiled"], plan["fp32-pytorch-compiled"]
    assert plan["bf16-pytorch-compiled"] == plan["bf16-pytorch"]


def test_compiled_candidates_need_a_cpp_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    plan = {
        c.key: c.skipped for c in optimize.candidates(hardware.Machine("x", 2, frozenset({"avx2"})))
    }
    assert "needs a C++ compiler" in plan["fp32-pytorch-compiled"]
    assert not plan["fp32-pytorch"]


def test_gpu_machine_offers_fp16_and_no_cpu_only_backend():
    plan = {c.key: c.skipped for c in optimize.candidates(hardware.Machine("x", 8, gpu="H100"))}
    assert not plan["fp16-pytorch"] and not plan["bf16-pytorch"]
    assert "CPU build" in plan["int8-onnxruntime"] and "CPU only" in plan["int8-pytorch"]
    assert "CPU instances" in plan["bf16-pytorch-compiled"]
    assert plan["fp32-pytorch-compiled"] == plan["bf16-pytorch-compiled"]
    onnx = optimize.Candidate("fp32-onnxruntime", "fp32", "ensemble")
    assert optimize._options(onnx, gpu=True).instance_kind == "KIND_CPU"
    python = optimize.Candidate("fp16-pytorch", "fp16", "python")
    assert optimize._options(python, gpu=True).instance_kind == "KIND_GPU"


def test_unknown_candidate_is_refused():
    with pytest.raises(OptimizeError, match="unknown candidates"):
        optimize.candidates(hardware.detect(), ["fp64-pytorch"])


def _instances(config: str) -> int:
    return int(re.search(r"instance_group \[\s*\{\s*count: (\d+)", config).group(1))


def test_optimize_measures_chooses_tunes_and_writes_a_servable_winner(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    checkpoint = FAMILIES["bert"].make(tmp_path / "bert-cls", "text-classification")
    out = tmp_path / "out"
    asked = ["int8-onnxruntime", "fp32-pytorch"]  # one per approach
    run = run_cli(
        "optimize",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
        "--candidates",
        ",".join(asked),
        "--concurrency",
        "2",
        "--rounds",
        "1",
        "--window-s",
        "0.5",
        "--name",
        "cls",
        "--tune",
        "instances,spin,batch,queue",  # the reload path; each knob more is two reloads more
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "optimize_report.json").read_text())
    assert report["machine"]["kind"] == hardware.detect().kind
    by_key = {c["key"]: c for c in report["candidates"]}
    assert list(by_key) == [key for key, *_ in optimize.CANDIDATES]
    for key, c in by_key.items():
        if key in asked:
            assert c["served"] and c["bare"] and not c["refused"] and not c["skipped"], c
            assert c["check"].startswith("ok"), c["check"]
        else:
            assert c["skipped"], c
    assert "PASSED" in by_key["int8-onnxruntime"]["gate"]
    # Both are finalists (the default 2): each tuned, then measured tuned, alternating; the
    # choice is the best of those measurements, not of the untuned rounds.
    tuned_served = {k: statistics.median(by_key[k]["tuned_served"]) for k in asked}
    assert report["winner"] == max(tuned_served, key=tuned_served.get)
    assert report["tuned_served"] == tuned_served[report["winner"]]
    assert all(by_key[k]["tuned_config"] for k in asked)
    assert [t["change"] for t in report["trials"]], "the winner was not tuned"
    assert all(t["ratios"] and len(t["served"]) == len(t["ratios"]) for t in report["trials"])
    text = (out / "optimize_report.md").read_text()
    assert "**chosen**" in text and "skipped: not asked for" in text
    assert f"Tuned {report['winner']}: " in text and "each tuned and then measured" in text

    # The written repository carries the tuned config and serves transformers' logits.
    winner, tuned = by_key[report["winner"]], report["tuned"]
    if winner["approach"] == "ensemble":
        repo = out / "ensemble_model_repository"
        compute, entry = repo / "cls", "ensemble_model"
    else:
        repo = out / "python_model_repository"
        compute, entry = repo / "python_cls", "python_cls"
    config = (compute / "config.pbtxt").read_text()
    assert _instances(config) == tuned["instances"]
    assert f"max_queue_delay_microseconds: {tuned['max_queue_delay_us']}" in config
    # concurrency 2 < max_batch_size 8: a preferred batch (2 per kept instance) was tried.
    assert any(t["change"].startswith("preferred batch of ") for t in report["trials"])
    preferred = tuned["preferred_batch_size"]
    assert (f"preferred_batch_size: [ {preferred} ]" in config) is bool(preferred), config
    # The queue bound was tried without (Triton then forms the next batch while one runs);
    # the written config has the policy exactly when the bound was kept.
    assert any(t["change"].startswith("unbounded queue") for t in report["trials"])
    assert ("default_queue_policy" in config) is bool(tuned["max_queue_size"]), config
    assert ("No queue policy" in config) is not bool(tuned["max_queue_size"]), config
    assert tuned["max_queue_size"] in (0, 16)
    if winner["approach"] == "ensemble":  # int8 ONNX Runtime: the spin knob was tried on it
        # The other of what "auto" chose on this machine was tried.
        tried = "never spin" if optimize.spins_within_run("auto") else "spin within a request"
        assert any(t["change"] == f"ONNX Runtime's threads {tried}" for t in report["trials"])
        spins = '"session.force_spinning_stop"' in config
        assert spins is bool(tuned["onnx_spin_within_run"]) is ("allow_spinning" not in config)
    threads = "torch_threads" if winner["approach"] == "python" else "intra_op_thread_count"
    kept = tuned["torch_threads" if winner["approach"] == "python" else "intra_op_threads"]
    assert f'string_value: "{kept}"' in config.split(f'key: "{threads}"')[1].split("}")[0]
    sentences = ["The food was great.", "Naïve café, zero stars 😞"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        want = model(**tokenizer(sentences, return_tensors="pt", padding=True)).logits.numpy()
    launched = launch([repo], tmp_path / "serve")
    try:
        client = httpclient.InferenceServerClient(url=launched.url)
        data = np.array([[s.encode()] for s in sentences], dtype=object)
        tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        got = client.infer(entry, [tensor]).as_numpy("logits")
        client.close()
    finally:
        launched.stop()
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99, cos  # the gate's bound: the winner may be int8
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize(
    ("family", "task", "fused_ops"),
    [
        ("bert", "text-classification", {"Attention", "SkipLayerNormalization"}),
        # ViT's attention (no mask) is not matched by ONNX Runtime's attention fusion; layer
        # norms and GELU are.
        ("vit", "image-feature-extraction", {"SkipLayerNormalization", "BiasGelu"}),
    ],
)
def test_fused_graph_is_exact_and_fused(tmp_path, family, task, fused_ops):
    """The fused candidate: ONNX Runtime's transformer fusions on a real export, same inputs,
    same numbers as the unfused graph."""
    import onnxruntime as ort

    from hf_triton import export
    from hf_triton.spec import ModelSpec

    checkpoint = FAMILIES[family].make(tmp_path / family, task)
    spec = ModelSpec.resolve(checkpoint)
    plain, fused = tmp_path / "plain.onnx", tmp_path / "fused.onnx"
    export.export_onnx(spec, plain)
    operators = optimize.fuse_onnx(spec, plain, fused)
    assert fused_ops <= set(operators), operators
    if spec.modality == "text":
        feed = spec.encode(["A short one.", "Naïve café, a longer sentence with more tokens."])
    else:
        feed = spec.sample(2, 0)
    want, got = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for p in (plain, fused)
    )
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    ("approach", "instances", "delay", "concurrency", "max_batch", "want"),
    [
        # One instance, as many clients as max_batch_size: full batches go at once already.
        ("ensemble", 1, 0, 8, 8, None),
        ("ensemble", 1, 0, 8, 16, ("preferred batch of 8, waiting up to 2 ms for it", 8, 2000)),
        ("python", 2, 0, 8, 8, ("preferred batch of 4, waiting up to 2 ms for it", 4, 2000)),
        ("ensemble", 1, 500, 2, 8, ("preferred batch of 2, waiting up to 0.5 ms for it", 2, 500)),
    ],
)
def test_preferred_batch_trial_follows_the_current_best(
    approach, instances, delay, concurrency, max_batch, want
):
    c = optimize.Candidate("x", "fp32", approach)
    best = {"instances": instances, "max_queue_delay_us": delay, "preferred_batch_size": 0}
    step = optimize._trial("batch", c, 2, best, concurrency, max_batch)
    if want is None:
        assert step is None
    else:
        change, delta = step
        assert (change, delta["preferred_batch_size"], delta["max_queue_delay_us"]) == want


def test_queue_knob_tries_no_bound_only_where_there_is_one():
    for approach in ("python", "ensemble"):
        c = optimize.Candidate("x", "fp32", approach)
        change, delta = optimize._trial("queue", c, 2, {"max_queue_size": 16}, 8, 8)
        assert delta == {"max_queue_size": 0} and "503" in change
        assert optimize._trial("queue", c, 2, {"max_queue_size": 0}, 8, 8) is None


def test_preprocessing_knob_is_for_the_ensemble_only():
    python = optimize.Candidate("x", "fp32", "python")
    assert optimize._trial("preprocessing", python, 2, {}, 8, 8) is None
    ensemble = optimize.Candidate("x", "fp32", "ensemble")
    assert optimize._trial("preprocessing", ensemble, 2, {}, 8, 8)[1] == {
        "preprocessing_instances": 2
    }


def test_finalists_are_the_best_served_and_the_best_bare():
    def candidate(key: str, served: float, bare: float) -> optimize.Candidate:
        c = optimize.Candidate(key, "fp32", "ensemble")
        c.served, c.bare = [served, served], [bare, bare]
        return c

    # MiniLM-like: one instance serves all within the noise, bare tells them apart.
    fused, bf16, int8, fp32 = (
        candidate("fused", 412, 793),
        candidate("bf16", 408, 1002),
        candidate("int8", 386, 1468),
        candidate("fp32", 397, 833),
    )
    picked = optimize.select_finalists([fp32, fused, int8, bf16], 2)
    assert [c.key for c in picked] == ["fused", "bf16", "int8"]
    # ViT-base-like: served and bare agree, so no extra finalist.
    assert optimize.select_finalists([fp32, bf16], 1) == [bf16]


def test_spin_knob_is_for_the_onnx_step_only_and_tries_the_other_setting():
    python = optimize.Candidate("x", "bf16", "python")
    assert optimize._trial("spin", python, 2, {"onnx_spin_within_run": 0}, 8, 8) is None
    ensemble = optimize.Candidate("x", "int8", "ensemble")
    for spins in (0, 1):
        _, change = optimize._trial("spin", ensemble, 2, {"onnx_spin_within_run": spins}, 8, 8)
        assert change == {"onnx_spin_within_run": 1 - spins}
    # "auto", as built, is what the backend chooses on this machine: within a run with AMX.
    amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    assert optimize.spins_within_run("auto") is amx
    assert optimize.spins_within_run("never") is False
    assert optimize.spins_within_run("within-run") is True


def test_preferred_batch_size_is_written_loaded_and_served(tmp_path, tiny_checkpoint):
    """What optimize writes when it keeps a preferred batch: every batched step carries it (the
    ONNX step declares max_batch_size for it), Triton loads it, and the ensemble answers."""
    from hf_triton.build import BuildOptions, build
    from hf_triton.serve import read_config
    from hf_triton.spec import ModelSpec
    from hf_triton.tasks import UnsupportedModel

    spec = ModelSpec.resolve(tiny_checkpoint)
    with pytest.raises(UnsupportedModel, match="--preferred-batch-size 9: between 1 and"):
        build(spec, tmp_path / "bad", options=BuildOptions(preferred_batch_size=9))
    assert not (tmp_path / "bad").exists()
    options = BuildOptions(max_queue_delay_us=2000, preferred_batch_size=4)
    repos = build(spec, tmp_path / "out", "both", options).repositories
    configs = [read_config(p) for repo in repos for p in sorted(repo.glob("*/config.pbtxt"))]
    batched = [c for c in configs if c.HasField("dynamic_batching")]
    assert {c.name for c in batched} == {"python_vit", "preprocessing", "vit"}
    for config in batched:  # parsed with Triton's schema
        assert list(config.dynamic_batching.preferred_batch_size) == [4], config.name
        assert config.max_batch_size == 8, config.name
    launched = launch([repos[1]], tmp_path / "serve")
    try:
        image = np.zeros((2, 64, 48, 3), np.uint8)
        tensor = httpclient.InferInput("image_uint8", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        with httpclient.InferenceServerClient(url=launched.url) as client:
            served = client.get_model_config("vit")
            out = client.infer("ensemble_model", [tensor]).as_numpy("pooler_output")
        assert served["dynamic_batching"]["preferred_batch_size"] == [4]
        assert out.shape == (2, 32) and np.isfinite(out).all()
    finally:
        launched.stop()
    default = build(spec, tmp_path / "default", "ensemble", export_onnx=False).repositories[0]
    assert "preferred_batch_size" not in (default / "vit" / "config.pbtxt").read_text()


def test_finalists_must_be_one_or_more(tmp_path):
    with pytest.raises(OptimizeError, match="--finalists 0: 1 or more"):
        optimize.run(optimize.OptimizeRun("unused", tmp_path / "out", finalists=0))
    assert not (tmp_path / "out").exists()


def test_requests_of_several_items_set_the_bare_batches_and_the_preferred_batch(tmp_path):
    """`--items-per-request K`: the bare batch is every request in flight with its K items, at
    most max_batch_size; the p50 is one request's against bare batch K; the preferred batch
    divides the items in flight; K above max_batch_size is refused before anything is built."""
    one = optimize.OptimizeRun("unused", tmp_path / "out", concurrency=8)
    assert (one.items, one.bare_batch()) == (1, 8)
    assert one.load() == (
        "8 requests in flight, one item each, against bare batch 8; p50 of one request "
        "against bare batch 1"
    )
    four = optimize.OptimizeRun("unused", tmp_path / "out", concurrency=4)
    four.settings.items_per_request = 4
    four.options.max_batch_size = 32
    assert four.bare_batch() == 16
    four.options.max_batch_size = 8
    assert four.bare_batch() == 8 and "4 requests in flight of 4 items each" in four.load()
    c = optimize.Candidate("x", "fp32", "python")
    best = {"instances": 2, "max_queue_delay_us": 0, "preferred_batch_size": 0}
    change, _ = optimize._trial("batch", c, 2, best, 2 * 4, 16, 4)  # two requests of four
    assert change == "preferred batch of 4, waiting up to 2 ms for it"
    change, _ = optimize._trial("batch", c, 2, best, 3 * 3, 16, 3)  # whole requests only
    assert change == "preferred batch of 3, waiting up to 2 ms for it"
    # Four requests of eight, two instances: half of max_batch_size 8 is less than a request.
    assert optimize._trial("batch", c, 2, best, 4 * 8, 8, 8) is None
    # A request that fills max_batch_size goes at once: a batcher delay would wait for nothing.
    assert optimize._trial("delay", c, 2, best, 4 * 8, 8, 8) is None
    assert optimize._trial("delay", c, 2, best, 4 * 4, 8, 4)[1] == {"max_queue_delay_us": 2000}
    for items in (0, 9):
        bad = optimize.OptimizeRun("unused", tmp_path / "out")
        bad.settings.items_per_request = items
        with pytest.raises(OptimizeError, match=f"--items-per-request {items}: 1 to the built"):
            optimize.run(bad)
    assert not (tmp_path / "out").exists()


def test_reload_gives_a_post_processing_step_the_batcher_settings_and_keeps_its_instances():
    """What build writes for every step of an ensemble (the batcher's delay, preferred batch,
    queue policy) is what tuning measures on every step, post-processing included; instance
    counts change only where a knob asks (the ONNX step, preprocessing)."""

    def config(name: str, backend: str) -> dict:
        policy = {"max_queue_size": 16, "timeout_action": "REJECT"}
        return {
            "name": name,
            "backend": backend,
            "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
            "dynamic_batching": {"max_queue_delay_microseconds": 0, "default_queue_policy": policy},
        }

    class Client:  # Triton's HTTP client as the reloader uses it: get a config, load one
        def __init__(self) -> None:
            self.configs = {
                "pre": config("pre", "python"),
                "det": config("det", "onnxruntime"),
                "post": config("post", "python"),
            }
            self.loaded: dict[str, dict] = {}

        def get_model_config(self, model: str) -> dict:
            return self.configs[model]

        def load_model(self, model: str, headers=None, config: str = "") -> None:
            self.loaded[model] = json.loads(config)

    reloader = optimize._Reloader.__new__(optimize._Reloader)
    reloader.client, reloader.headers, reloader.original, reloader.loaded = Client(), None, {}, {}
    values = {
        "instances": 2,
        "preprocessing_instances": 3,
        "intra_op_threads": 1,
        "torch_threads": 0,
        "onnx_spin_within_run": 0,
        "max_queue_delay_us": 2000,
        "preferred_batch_size": 4,
        "max_queue_size": 0,
    }
    reloader.apply(values, {"onnx": "det", "preprocessing": "pre", "postprocessing": "post"})
    loaded = reloader.client.loaded
    assert [loaded[m]["instance_group"][0]["count"] for m in ("det", "pre", "post")] == [2, 3, 1]
    for model in ("det", "pre", "post"):
        batching = loaded[model]["dynamic_batching"]
        assert batching["max_queue_delay_microseconds"] == 2000, model
        assert batching["preferred_batch_size"] == [4], model
        assert "default_queue_policy" not in batching, model
    assert "intra_op_thread_count" in loaded["det"]["parameters"]
    assert "parameters" not in loaded["post"]  # the ONNX step's threads stay the ONNX step's


def test_ensemble_roles_find_the_onnx_step_and_a_post_processing_step():
    backends = {"pre": "python", "det": "onnxruntime", "post": "python", "vit": "onnxruntime"}
    roles = optimize.ensemble_roles(["pre", "det", "post"], backends.get)
    assert roles == {"onnx": "det", "preprocessing": "pre", "postprocessing": "post"}
    assert optimize.ensemble_roles(["pre", "vit"], backends.get) == {
        "onnx": "vit",
        "preprocessing": "pre",
    }
