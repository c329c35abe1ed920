"""The benchmark end to end on the tiny model: seconds, not minutes. Speed is not asserted."""

from __future__ import annotations

import json
import subprocess

from hf_triton import bench

from helpers import run_cli


def test_stability_rule():
    assert bench._stable([10.0, 10.5, 9.8], 0.10)
    assert not bench._stable([10.0, 12.0, 9.8], 0.10)
    assert not bench._stable([10.0, 10.0], 0.10)  # needs three windows


#: Seconds, not minutes: short windows, few requests per window, at most three windows.
QUICK = ["--window-s", "0.3", "--min-requests", "3", "--warmup-s", "0.2", "--max-windows", "3"]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("bench", *QUICK, *args, timeout=300)


def test_benchmark_smoke(server, tmp_path):
    onnx = server.served_onnx
    run = run_bench(
        "--url",
        server.grpc_url,
        "--onnx",
        str(onnx),
        "--checkpoint",
        str(server.checkpoint),
        "--concurrency",
        "2",
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ensemble ÷ python_vit" in run.stdout and "Targets:" in run.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["name"], r["input_format"], r["concurrency"]) for r in data["results"]}
    for model in ("python_vit", "ensemble_model"):
        for fmt in ("fp32", "uint8", "jpeg"):
            assert (model, fmt, 2) in rows
    assert ("bare-onnxruntime", "pixel_values", 2) in rows
    assert all(r["errors"] == 0 and r["throughput"] > 0 for r in data["results"])
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    assert (tmp_path / "results.csv").read_text().startswith("name,")


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
