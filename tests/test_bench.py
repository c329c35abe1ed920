"""The benchmark end to end on the tiny model: seconds, not minutes. Speed is not asserted."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hf_triton import bench

from helpers import run_cli


def test_stability_rule():
    assert bench._stable([10.0, 10.5, 9.8], 0.10)
    assert not bench._stable([10.0, 12.0, 9.8], 0.10)
    assert not bench._stable([10.0, 10.0], 0.10)  # needs three windows


def test_bare_compute_runs_on_the_calling_thread_and_counts_items_per_call():
    """Bare runs compute where the model was loaded (a worker thread's second OpenMP team
    made bf16 ViT-base batch 1 1.5x slower on the AMX kind), and count a batch as its items."""
    import threading

    settings = bench.BenchSettings(
        window_s=0.15, warmup_s=0.05, min_requests=1, min_windows=3, max_windows=4
    )
    callers: set[int] = set()

    def forward() -> None:
        callers.add(threading.get_ident())
        time.sleep(0.01)

    windows, latencies, errors, _ = bench.measure_blocking(forward, settings, items_per_call=4)
    assert callers == {threading.get_ident()}
    assert 3 <= len(windows) <= 4 and errors == 0
    # Each call is >= 10 ms (sleep never returns early) and counts 4 items: a window holds
    # back-to-back calls, so its rate is 4 per call's latency -- whatever the machine's load.
    assert latencies and all(lat >= 0.01 for lat in latencies)
    lo, hi = min(latencies), max(latencies)
    assert all(0.5 * 4 / hi < w <= 1.05 * 4 / lo for w in windows[-3:]), (windows, lo, hi)


def test_bare_batch_is_capped_at_what_serving_can_form():
    target = bench.Target("m", "python", "image", "fp32", Path("."), ["m"], max_batch=8)
    assert bench.bare_batches(target, [1, 8, 16]) == [1, 8]
    assert bench.bare_batches(target, [4]) == [1, 4]
    unbatched = bench.Target("m", "python", "image", "fp32", Path("."), ["m"], max_batch=0)
    assert bench.bare_batches(unbatched, [1, 16]) == [1]  # max_batch_size 0: no batching


#: Seconds, not minutes: short windows, few requests per window, at most three windows.
QUICK = ["--window-s", "0.3", "--min-requests", "3", "--warmup-s", "0.2", "--max-windows", "3"]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    from conftest import ADMIN_KEY

    env = {**os.environ, "HF_TRITON_ADMIN_KEY": ADMIN_KEY}  # lists the models it measures
    return run_cli("bench", *QUICK, "--tax-rounds", "1", *args, timeout=300, env=env)


def bench_served_models(server, *args: str) -> subprocess.CompletedProcess[str]:
    """The benchmark on the suite's running server over gRPC, its bare runs on the served
    model.onnx."""
    url = ["--url", server.grpc_url, "--http-url", server.url]
    return run_bench(*url, "--onnx", str(server.served_onnx), *args)


def test_items_per_request_sets_the_bare_batches_and_is_bounded_by_max_batch_size():
    """Requests of k items: bare runs at batch k (one request's latency) and at the largest
    batch serving can form; a model is never sent more than its max_batch_size takes."""
    target = bench.Target("m", "ensemble", "text", "fp32", Path("."), ["p", "m"], max_batch=8)
    assert bench.bare_batches(target, [1, 2], 4) == [4, 8]
    assert bench.bare_batches(target, [1], 3) == [3]
    assert bench.bare_batches(target, [1, 16], 1) == [1, 8]
    bench.check_items_per_request([target], 8)
    with pytest.raises(bench.BenchError, match="'m' takes at most 8 items per request"):
        bench.check_items_per_request([target], 9)
    unbatched = dataclasses.replace(target, max_batch=0)
    with pytest.raises(bench.BenchError, match="takes at most 1 items per request"):
        bench.check_items_per_request([unbatched], 2)
    with pytest.raises(bench.BenchError, match="at least 1"):
        bench.check_items_per_request([target], 0)
    # A request carries k examples, cycled, as the bare batch takes them.
    name, dtype, data = bench._request(target, "text", ["a", "bb"], 90, items=3)
    assert (name, dtype) == ("text", "BYTES") and data.tolist() == [[b"a"], [b"bb"], [b"a"]]
    image = dataclasses.replace(target, modality="image")
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    _, _, data = bench._request(image, "uint8", [pixels], 90, items=2)
    assert data.shape == (2, 2, 3, 3) and (data == pixels).all()
    _, _, data = bench._request(image, "jpeg", [pixels], 90, items=2)
    assert data.shape == (2, 1) and data[0, 0] == data[1, 0] and data[0, 0][:2] == b"\xff\xd8"


def test_benchmark_with_several_images_per_request(server, tmp_path):
    """`--items-per-request 2`: every request carries two images, Triton's statistics show
    executions of two items, the bare side runs at batch 2 (one request) and 4 (the largest
    batch two such requests make), and the tax's p50 compares a request with batch 2."""
    run = bench_served_models(
        server,
        "--models",
        "ensemble_model",
        "--formats",
        "uint8",
        "--concurrency",
        "1,2",
        "--items-per-request",
        "2",
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["name"], r["concurrency"]): r for r in data["results"]}
    assert set(rows) == {
        ("bare-onnxruntime", 2),
        ("bare-onnxruntime", 4),
        ("ensemble_model", 1),
        ("ensemble_model", 2),
    }, set(rows)
    one = rows[("ensemble_model", 1)]
    assert one["items_per_request"] == 2 and one["errors"] == 0 and one["check"].startswith("ok")
    assert one["bytes_per_image"] == 640 * 480 * 3  # per item, not per request
    # One request at a time: each execution of each step is that request's two images. The
    # supervisor's probes (one image to the ensemble and one to each step, every 30 s) may
    # run alone, lowering the mean, or join a request's execution: at most two images more.
    assert set(one["batch_sizes"]) == {"preprocessing", "vit"}, one
    probed = 2 / one["requests"]
    assert all(1.5 < n <= 2.0 + probed for n in one["batch_sizes"].values()), one
    (tax,) = data["taxes"]
    assert tax["items_per_request"] == 2 and tax["batch"] in (2, 4), tax
    assert "Served requests carry 2 items each" in run.stdout
    assert "p50 added at c=1 (vs batch 2)" in run.stdout
    # More than the model takes is refused before anything is measured.
    refused = run_bench(
        "--url", server.url, "--protocol", "http", "--no-bare", "--models", "ensemble_model",
        "--items-per-request", "99", "--out", str(tmp_path / "refused"),
    )  # fmt: skip
    assert refused.returncode != 0
    assert "'ensemble_model' takes at most 8 items per request" in refused.stdout + refused.stderr
    assert not (tmp_path / "refused").exists()


def test_bare_runs_where_the_served_instance_runs():
    """A KIND_GPU pipeline is measured against PyTorch on the GPU Triton placed it on (Triton's
    served config lists it), everything else on the CPU."""
    assert bench.instance_device({"instance_group": [{"kind": "KIND_CPU", "count": 1}]}) == "cpu"
    assert bench.instance_device({}) == "cpu"
    gpu = {"instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [1]}]}
    assert bench.instance_device(gpu) == "cuda:1"
    assert bench.instance_device({"instance_group": [{"kind": "KIND_GPU"}]}) == "cuda:0"


def test_benchmark_smoke(server, tmp_path):
    """Every entry model of a running server, each format, next to its bare runtime; served
    answers checked against the bare runtime's; Triton's per-step breakdown; the serving tax."""
    run = bench_served_models(
        server,
        "--concurrency",
        "1,2",
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for words in ("Where a request's time goes", "Serving tax", "Targets:", "p50 added at c=1"):
        assert words in run.stdout, words
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["name"], r["input_format"], r["concurrency"]): r for r in data["results"]}
    for model in ("python_vit", "ensemble_model"):
        for fmt in ("fp32", "uint8", "jpeg"):
            assert (model, fmt, 2) in rows
            assert rows[(model, fmt, 1)]["check"].startswith("ok (cos"), rows[(model, fmt, 1)]
        expected = {"python_vit"} if model == "python_vit" else {"preprocessing", "vit"}
        for conc in (1, 2):  # every concurrency; busy: one instance each, so at most ~1
            steps = rows[(model, "uint8", conc)]["breakdown"]
            assert set(steps) == expected, steps
            assert all(s["infer"] > 0 and s["queue"] >= 0 for s in steps.values()), steps
            assert all(0 < s["busy"] <= 1.05 for s in steps.values()), steps
        sizes = rows[(model, "uint8", 2)]["batch_sizes"]  # requests per execution, 1..2
        assert set(sizes) == expected and all(1 <= n <= 2 for n in sizes.values()), sizes
    assert ("bare-onnxruntime", "pixel_values", 2) in rows
    assert ("bare-pytorch", "pixel_values", 1) in rows
    assert all(r["errors"] == 0 and r["throughput"] > 0 for r in data["results"])
    served = [r for r in data["results"] if not r["name"].startswith("bare")]
    assert all(0 < r["client_cores"] <= os.cpu_count() for r in served)  # the client's CPU
    assert "Load generator (this process), CPU cores busy while serving" in run.stdout
    # The server runs here: its processes' CPU while serving, found by the port it listens on
    # (the suite's other servers run beside it), each Python-backend stub by its model.
    for r in served:
        assert {"tritonserver", "python_vit", "preprocessing", "vit"} <= set(r["server_cores"])
        assert "ensemble_model" not in r["server_cores"], r  # an ensemble has no process
        assert all(0 <= c <= os.cpu_count() for c in r["server_cores"].values()), r
        assert sum(r["server_cores"].values()) > 0, r
        # the model measured computes in its stub; the other approach's stub sits idle
        busy, idle = ("python_vit", "vit") if r["name"] == "python_vit" else ("vit", "python_vit")
        assert r["server_cores"][busy] > r["server_cores"][idle], r
    bare_rows = [r for r in data["results"] if r["name"].startswith("bare")]
    assert all(0 < r["client_cores"] <= os.cpu_count() + 0.1 for r in bare_rows)
    assert "CPU cores busy, per process on this host" in run.stdout
    line = r"ensemble_model +uint8 +c=2 +tritonserver [0-9.]+, .*vit [0-9.]+, load generator"
    assert re.search(line, run.stdout), run.stdout
    assert "Items per batch Triton ran, per step" in run.stdout
    assert {t["model"] for t in data["taxes"]} == {"python_vit", "ensemble_model"}
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    assert (tmp_path / "results.csv").read_text().startswith("name,")


@pytest.fixture(scope="module")
def text_bench(text_server, tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict]:
    """One benchmark of the text server's models of every other kind: a text classifier
    (ensemble), NER (Python pipeline), a detector (ensemble, JPEG) and SigLIP's text tower
    (Python pipeline) with the zero-shot model that calls the towers. The two ensembles' bare
    runs get their served model.onnx by ONNX step name."""
    out = tmp_path_factory.mktemp("text-bench")
    served = text_server.launched.workdir / "repositories"
    run = run_bench(
        "--url",
        text_server.url,
        "--protocol",
        "http",
        "--models",
        "ensemble_bertcls,python_bertner,ensemble_det,python_siglip_text,python_siglip",
        "--onnx",
        f"bertcls={served / 'bertcls_ensemble_model_repository' / 'bertcls' / '1' / 'model.onnx'}",
        "--onnx",
        f"det={served / 'det_ensemble_model_repository' / 'det' / '1' / 'model.onnx'}",
        "--formats",
        "jpeg,text",
        "--concurrency",
        "1",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    return run, {r["name"]: r for r in rows if not r["name"].startswith("bare")}


def test_benchmark_text_model(text_bench):
    """A built text model: sentences/s and tokens/s, its answer checked against ONNX Runtime."""
    run, served = text_bench
    assert "tokens/s" in run.stdout and "sentence/s" in run.stdout
    row = served["ensemble_bertcls"]
    assert row["check"].startswith("ok") and row["tokens_per_item"] > 5, row


def test_benchmark_token_classification(text_bench):
    """Entities served by the Python pipeline, checked against the bare PyTorch model's logits
    turned into per-token entities (labels, offsets, scores)."""
    _, served = text_bench
    check = served["python_bertner"]["check"]
    assert check.startswith("ok (") and "token labels" in check, check


def test_benchmark_object_detection(text_bench):
    """Detections served by the ensemble, checked against the bare ONNX Runtime session's
    logits and boxes through the image processor's own post-processing."""
    _, served = text_bench
    row = served["ensemble_det"]
    assert row["input_format"] == "jpeg" and row["check"].startswith("ok (20 detections"), row


def test_benchmark_image_text_towers(text_bench):
    """An image-text model's text tower (SigLIP, Python pipeline): measured, its answer checked
    against the bare PyTorch tower; the zero-shot model that calls the towers is named as not
    measured rather than failing."""
    run, served = text_bench
    assert "'python_siglip' (python_siglip_image, python_siglip_text)" in run.stdout + run.stderr
    assert served["python_siglip_text"]["check"].startswith("ok (cos"), served
    assert [n for n in served if n.startswith("python_siglip")] == ["python_siglip_text"]


def test_onnx_of_each_ensemble_is_named_by_its_step(capsys):
    """`--onnx PATH` serves every ensemble's bare run, `--onnx STEP=PATH` the one whose ONNX
    step is STEP (repeatable); anything else is refused by the argument parser."""
    from hf_triton.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "--onnx", "bertcls=a/model.onnx", "--onnx", "b.onnx", "--onnx", "det=c=d.onnx"]
    )
    assert dict(args.onnx) == {
        "bertcls": Path("a/model.onnx"),
        "*": Path("b.onnx"),
        "det": Path("c=d.onnx"),
    }
    for bad in ("=x.onnx", "det="):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "--onnx", bad])
        assert f"{bad!r}: PATH or STEP=PATH" in capsys.readouterr().err


def test_benchmark_over_http(server, tmp_path):
    """The async HTTP load generator, on one model and format."""
    run = run_bench(
        "--url",
        server.url,
        "--protocol",
        "http",
        "--no-bare",
        "--checkpoint",
        str(server.checkpoint),
        "--models",
        "python_vit",
        "--formats",
        "uint8",
        "--concurrency",
        "2",
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["name"], r["errors"]) for r in rows] == [("python_vit", 0)]


def test_text_checkpoint_for_the_default_vit_repositories_is_refused_upfront(tmp_path):
    """`bench --checkpoint <text model>` without repositories: a plain message naming the
    build step, before any server starts (it used to fail at load with the image processor's
    error)."""
    import pytest

    from hf_triton.families import FAMILIES

    ckpt = FAMILIES["bert"].make(tmp_path / "bert", "text-feature-extraction")
    workdir = tmp_path / "work"
    with pytest.raises(bench.BenchError) as err:
        bench.run(bench.BenchRun(checkpoint=str(ckpt), workdir=workdir))
    assert "is a text-feature-extraction model" in str(err.value)
    assert f"hf-triton build --model {ckpt} --out DIR" in str(err.value)
    assert not workdir.exists()  # nothing staged, no server


def test_unknown_precisions_item_is_refused_before_anything_is_built(tmp_path):
    workdir = tmp_path / "work"
    for item in ("bf16+fast", "+compile"):
        with pytest.raises(bench.BenchError, match="a precision, or one followed by \\+compile"):
            bench.run(bench.BenchRun(precisions=["fp32", item], workdir=workdir))
    with pytest.raises(bench.BenchError, match="'int8\\+compile': \\+compile follows fp32 or bf16"):
        bench.run(bench.BenchRun(precisions=["int8+compile"], workdir=workdir))
    assert not workdir.exists()
    with pytest.raises(bench.BenchError, match="--items-per-request 0: at least 1"):
        settings = bench.BenchSettings(items_per_request=0)
        bench.run(bench.BenchRun(workdir=workdir, settings=settings))
    assert not workdir.exists()


def test_report_table_keeps_long_model_names_apart_from_their_precision():
    """A built variant's name may be longer than the name column (python_vit_bf16_compiled)."""
    rows = [
        bench.Result(name, "uint8", 1, 10.0, 1.0, 2.0, 3.0, 10, 0, 0, [10.0], True, "bf16")
        for name in ("python_vit", "python_vit_bf16_compiled_longer")
    ]
    table = bench.report(rows, None).splitlines()
    assert table[0].startswith("name ") and "prec" in table[0]
    for line, row in zip(table[1:3], rows, strict=True):
        assert line.split()[:2] == [row.name, "bf16"], line
        assert line[table[0].index("prec") :].startswith("bf16 "), line  # columns aligned


def test_server_processes_only_for_a_server_on_this_host(server):
    """The server's processes are found by the port it listens on, on this host only: another
    port, or a host elsewhere, finds none (nothing is attributed to the wrong server)."""
    port = server.grpc_url.rpartition(":")[2]
    found = bench.server_processes(f"127.0.0.1:{port}", "grpc")
    assert sorted(found.values()).count("tritonserver") == 1, found
    assert {"python_vit", "preprocessing", "vit"} <= set(found.values()), found
    http_port = server.url.rpartition(":")[2]
    assert bench.server_processes(f"localhost:{http_port}", "http") == found
    assert bench.server_processes(f"127.0.0.1:{http_port}", "grpc") == {}  # not its gRPC port
    assert bench.server_processes(f"203.0.113.7:{port}", "grpc") == {}  # not this host
    before = bench.cpu_seconds(found)
    assert set(before) == set(found) and all(s > 0 for s in before.values()), before
    cores = bench.cores_busy(found, before, {pid: s + 0.5 for pid, s in before.items()}, 1.0)
    assert next(iter(cores)) == "tritonserver" and cores["tritonserver"] == pytest.approx(0.5)
