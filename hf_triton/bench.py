"""Throughput benchmark: bare ONNX Runtime and PyTorch next to both served approaches, one run.

Measures, on the same machine and in one process:

* bare ONNX Runtime on the exported ``model.onnx`` and bare PyTorch eager (compute only,
  pixel values prepared beforehand), at batch 1 and at the largest concurrency's batch;
* ``python_vit`` and ``ensemble_model`` served by Triton, for each input format
  (fp32, uint8, jpeg), at each concurrency, with async tritonclient (gRPC or HTTP);
* the Hugging Face image processor against the vectorised path.

A measurement repeats fixed windows until the last three throughputs agree within
10% (perf_analyzer's stability rule) or ``max_windows`` is reached, which is reported.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import importlib.util
import io
import json
import logging
import statistics
import sys
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hf_triton.errors import HfTritonError

log = logging.getLogger(__name__)


class BenchError(HfTritonError):
    """The benchmark was asked for something it cannot measure."""


FORMATS = {
    "fp32": ("image", "FP32"),
    "uint8": ("image_uint8", "UINT8"),
    "jpeg": ("image_bytes", "BYTES"),
}
MODELS = ("python_vit", "ensemble_model")
#: What the tutorial's client asks for.
REQUESTED_OUTPUT = "last_hidden_state"


@dataclass
class BenchSettings:
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    models: list[str] = field(default_factory=lambda: list(MODELS))
    protocol: str = "grpc"
    window_s: float = 4.0
    #: A window also waits for this many images (up to max_window_s): with a few
    #: images/s, one request more or less in a short window is already a 10% swing.
    min_requests: int = 20
    max_window_s: float = 30.0
    warmup_s: float = 2.0
    min_windows: int = 3
    max_windows: int = 8
    stability: float = 0.10
    image_size: tuple[int, int] = (640, 480)  # width, height: a VGA photo
    jpeg_quality: int = 90
    bare: bool = True


@dataclass
class Result:
    name: str  # python_vit, ensemble_model, bare-onnxruntime, bare-pytorch
    input_format: str  # fp32/uint8/jpeg; "pixel_values" for bare runs
    concurrency: int  # outstanding requests; for bare runs, the batch size
    throughput: float  # images/s
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    bytes_per_image: int
    windows: list[float]
    stable: bool
    precision: str = "fp32"

    @property
    def served(self) -> bool:
        return not self.name.startswith("bare")


def _stable(windows: list[float], tolerance: float) -> bool:
    last = windows[-3:]
    return len(last) == 3 and min(last) > 0 and max(last) / min(last) - 1 <= tolerance


def _percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    if not latencies_s:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(latencies_s) * 1e3, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


async def measure(
    call: Callable[[], Awaitable[Any]],
    concurrency: int,
    settings: BenchSettings,
    images_per_call: int = 1,
) -> tuple[list[float], list[float], int, bool]:
    """Run ``concurrency`` workers calling ``call`` back to back; window by window.

    Returns (window throughputs, latencies of the counted windows, errors, stable).
    """
    done: list[tuple[float, float]] = []  # (finish time, latency)
    errors = 0
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal errors
        while not stop.is_set():
            start = time.perf_counter()
            try:
                await call()
            except Exception as e:  # counted and reported, never hidden
                errors += 1
                log.debug("request failed: %s", e)
                continue
            end = time.perf_counter()
            done.append((end, end - start))

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(settings.warmup_s)
        windows: list[float] = []
        edges = [time.perf_counter()]
        while True:
            await asyncio.sleep(settings.window_s)
            while True:
                now = time.perf_counter()
                count = sum(1 for t, _ in done if edges[-1] <= t < now)
                enough = count * images_per_call >= settings.min_requests
                if enough or now - edges[-1] >= settings.max_window_s:
                    break
                await asyncio.sleep(0.05)
            edges.append(now)
            windows.append(count * images_per_call / (edges[-1] - edges[-2]))
            stable = len(windows) >= settings.min_windows and _stable(windows, settings.stability)
            if stable or len(windows) >= settings.max_windows:
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    counted_from = edges[-4] if len(edges) >= 4 else edges[0]
    latencies = [lat for t, lat in done if counted_from <= t < edges[-1]]
    return windows, latencies, errors, stable


def _result(name, fmt, conc, windows, latencies, errors, nbytes, stable) -> Result:
    p50, p95, p99 = _percentiles(latencies)
    return Result(
        name=name,
        input_format=fmt,
        concurrency=conc,
        throughput=statistics.fmean(windows[-3:]),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        requests=len(latencies),
        errors=errors,
        bytes_per_image=nbytes,
        windows=[round(w, 2) for w in windows],
        stable=stable,
    )


def sample_image(settings: BenchSettings) -> np.ndarray:
    """The offline photo resized to the benchmark's size, uint8 H x W x 3."""
    import matplotlib

    path = Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize(settings.image_size, Image.Resampling.BILINEAR))


def request_tensor(image: np.ndarray, fmt: str, quality: int = 90) -> np.ndarray:
    if fmt == "fp32":
        return image.astype(np.float32)[None]
    if fmt == "uint8":
        return image[None]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.array([[buf.getvalue()]], dtype=object)


def payload_bytes(tensor: np.ndarray) -> int:
    if tensor.dtype == object:
        return sum(len(b) for b in tensor.reshape(-1))
    return int(tensor.nbytes)


# -- bare compute -------------------------------------------------------------------------


def _pixel_values(checkpoint: Path, image: np.ndarray, batch: int) -> np.ndarray:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    pixels = processor(images=[image], input_data_format="channels_last", return_tensors="np")[
        "pixel_values"
    ]
    return np.repeat(pixels, batch, axis=0)


async def _in_thread_loop(fn: Callable[[], Any], batch: int, settings: BenchSettings):
    # One caller at a time: bare compute is measured at a batch size, not a concurrency.
    async def call() -> None:
        await asyncio.to_thread(fn)

    return await measure(call, 1, settings, images_per_call=batch)


def bench_bare(
    onnx_paths: dict[str, Path],
    checkpoint: Path,
    image: np.ndarray,
    settings: BenchSettings,
    progress,
    torch_precisions: tuple[str, ...] = ("fp32",),
) -> list[Result]:
    """Compute only: ONNX Runtime per precision in ``onnx_paths``, PyTorch per precision."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from hf_triton.precision import apply_torch

    results = []
    batches = sorted({1, max(settings.concurrency)})
    sessions = {
        p: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for p, path in onnx_paths.items()
    }
    base = AutoModel.from_pretrained(checkpoint).eval()
    models = {
        p: apply_torch(base if p == "fp32" else copy.deepcopy(base), p) for p in torch_precisions
    }
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for batch in batches:
        pixels = _pixel_values(checkpoint, image, batch)
        runs: list[tuple[str, str, Callable[[], Any]]] = []
        for prec, session in sessions.items():

            def run_ort(s=session, p=pixels) -> None:
                s.run(None, {"pixel_values": p})

            runs.append(("bare-onnxruntime", prec, run_ort))
        for prec, model in models.items():
            tensor = torch.from_numpy(pixels).to(dtypes.get(prec, torch.float32))

            def run_torch(m=model, t=tensor) -> None:
                with torch.inference_mode():
                    m(pixel_values=t)

            runs.append(("bare-pytorch", prec, run_torch))
        for name, prec, fn in runs:
            progress(f"{name} {prec} batch {batch}")
            windows, lat, errors, stable = asyncio.run(_in_thread_loop(fn, batch, settings))
            result = _result(name, "pixel_values", batch, windows, lat, errors, 0, stable)
            result.precision = prec
            results.append(result)
            progress(_line(results[-1]))
    return results


# -- served -------------------------------------------------------------------------------


def _client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc.aio as grpcclient

        return grpcclient, grpcclient.InferenceServerClient(url=url)
    import tritonclient.http.aio as httpclient

    return httpclient, httpclient.InferenceServerClient(url=url, conn_limit=256)


async def _bench_served_one(
    url: str, model: str, fmt: str, conc: int, image: np.ndarray, settings: BenchSettings
) -> Result:
    module, client = _client(settings.protocol, url)
    tensor_data = request_tensor(image, fmt, settings.jpeg_quality)
    name, dtype = FORMATS[fmt]
    try:

        async def call() -> None:
            tensor = module.InferInput(name, list(tensor_data.shape), dtype)
            tensor.set_data_from_numpy(tensor_data)
            outputs = [module.InferRequestedOutput(REQUESTED_OUTPUT)]
            await client.infer(model, [tensor], outputs=outputs)

        windows, lat, errors, stable = await measure(call, conc, settings)
    finally:
        await client.close()
    return _result(model, fmt, conc, windows, lat, errors, payload_bytes(tensor_data), stable)


def bench_served(
    url: str,
    image: np.ndarray,
    settings: BenchSettings,
    progress,
    precisions: dict[str, str] | None = None,
) -> list[Result]:
    """Every model x format x concurrency; ``precisions`` maps model name -> precision."""
    results = []
    for model in settings.models:
        for fmt in settings.formats:
            for conc in settings.concurrency:
                progress(f"{model} {fmt} concurrency {conc}")
                result = asyncio.run(_bench_served_one(url, model, fmt, conc, image, settings))
                result.precision = (precisions or {}).get(model, "fp32")
                results.append(result)
                progress(_line(results[-1]))
    return results


# -- preprocessing ------------------------------------------------------------------------


def load_model_py(path: Path) -> types.ModuleType:
    """Import a generated model.py outside Triton (with the hf_common.py beside it).

    model.py imports Triton's utilities, which only exist inside the server; the
    preprocessing classes used from here never touch them.
    """
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("pb_utils_unused"))
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"model_{abs(hash(path))}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def bench_preprocessing(
    model_py: Path, checkpoint: Path, image: np.ndarray, batch: int = 8, repeats: int = 5
) -> dict[str, float]:
    """Milliseconds per image: Hugging Face processor vs the vectorised path, same batch."""
    from transformers import AutoImageProcessor

    module = load_model_py(model_py)
    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    fast = module.VectorizedImageProcessor(processor)
    images = [image] * batch

    def pending() -> list[Any]:
        return [module.Pending(image.size // 3, lambda: image) for _ in range(batch)]

    def reference():
        return module.process(processor, images)

    def timed(fn):
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best * 1e3 / batch

    diff = float(np.max(np.abs(reference() - fast(pending()))))
    ref_ms, fast_ms = timed(reference), timed(lambda: fast(pending()))
    return {
        "reference_ms": ref_ms,
        "vectorized_ms": fast_ms,
        "speedup": ref_ms / fast_ms,
        "max_abs_diff": diff,
    }


# -- report -------------------------------------------------------------------------------


def _line(r: Result) -> str:
    flag = "" if r.stable else "  (unstable: windows " + ", ".join(map(str, r.windows)) + ")"
    return (
        f"  {r.throughput:7.2f} img/s  p50 {r.p50_ms:8.1f} ms  p99 {r.p99_ms:8.1f} ms  "
        f"errors {r.errors}{flag}"
    )


def best(results: list[Result], name: str, fmt: str | None = None) -> Result | None:
    pool = [r for r in results if r.name == name and (fmt is None or r.input_format == fmt)]
    return max(pool, key=lambda r: r.throughput) if pool else None


def report(results: list[Result], preprocessing: dict[str, float] | None) -> str:
    """The table with ratios, and the targets, as text."""
    fp32 = [r for r in results if r.precision == "fp32"]
    ort_best = best(fp32, "bare-onnxruntime")
    ort_b1 = next((r for r in fp32 if r.name == "bare-onnxruntime" and r.concurrency == 1), None)
    lines = [
        f"{'name':<22}{'prec':<6}{'input':<13}{'conc':>5}{'img/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'err':>5}{'KB/img':>9}{'÷ORT':>7}  stable"
    ]
    for r in results:
        ratio = r.throughput / ort_best.throughput if ort_best else float("nan")
        lines.append(
            f"{r.name:<22}{r.precision:<6}{r.input_format:<13}{r.concurrency:>5}{r.throughput:>9.2f}"
            f"{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.p99_ms:>9.1f}{r.errors:>5}"
            f"{r.bytes_per_image / 1e3:>9.1f}{ratio:>7.2f}  {'yes' if r.stable else 'NO'}"
        )
    variants = sorted({(r.name, r.precision) for r in results if r.precision != "fp32"})
    if variants:
        lines.append("")
        lines.append("Reduced precision, best throughput ÷ fp32 bare ONNX Runtime:")
        for name, prec in variants:
            b = best([r for r in results if r.precision == prec], name)
            if b and ort_best:
                lines.append(
                    f"  {name:<22} {prec:<5} {b.throughput:7.2f} img/s  "
                    f"{b.throughput / ort_best.throughput:.2f}x"
                )
    results = fp32
    lines.append("")
    lines.append("Ratios at each approach's best concurrency (fp32):")
    formats = sorted({r.input_format for r in results if r.served})
    for fmt in formats:
        ens, py = best(results, "ensemble_model", fmt), best(results, "python_vit", fmt)
        parts = []
        if ens and ort_best:
            parts.append(f"ensemble ÷ bare ORT {ens.throughput / ort_best.throughput:.2f}")
        if py and ort_best:
            parts.append(f"python_vit ÷ bare ORT {py.throughput / ort_best.throughput:.2f}")
        if ens and py:
            parts.append(f"ensemble ÷ python_vit {ens.throughput / py.throughput:.2f}")
        lines.append(f"  {fmt:<6} " + ", ".join(parts))
    torch_best = best(results, "bare-pytorch")
    if torch_best and ort_best:
        lines.append(f"  bare PyTorch ÷ bare ORT {torch_best.throughput / ort_best.throughput:.2f}")
    if preprocessing:
        lines.append(
            f"Preprocessing per image: HF processor {preprocessing['reference_ms']:.2f} ms, "
            f"vectorised {preprocessing['vectorized_ms']:.2f} ms "
            f"({preprocessing['speedup']:.1f}x, max |diff| {preprocessing['max_abs_diff']:.1e})"
        )

    lines.append("")
    lines.append("Targets:")
    ens_best = best(results, "ensemble_model")
    py_best = best(results, "python_vit")
    ens_c1 = [r for r in results if r.name == "ensemble_model" and r.concurrency == 1]
    jpeg = [r for r in results if r.input_format == "jpeg"]
    checks = []
    if ens_best and ort_best:
        checks.append(
            (
                "ensemble_model >= 0.95 x bare ORT throughput",
                ens_best.throughput / ort_best.throughput,
                0.95,
            )
        )
    if ens_best and py_best:
        checks.append(
            ("ensemble_model >= 1.3 x python_vit", ens_best.throughput / py_best.throughput, 1.3)
        )
    for target, value, bound in checks:
        lines.append(f"  {target}: {value:.2f} {'met' if value >= bound else 'NOT met'}")
    if ens_c1 and ort_b1:
        over = min(r.p50_ms for r in ens_c1) - ort_b1.p50_ms
        lines.append(
            f"  server overhead at concurrency 1 <= 5 ms p50 over bare ORT: "
            f"{over:.1f} ms {'met' if over <= 5 else 'NOT met'}"
        )
    if jpeg:
        kb = jpeg[0].bytes_per_image / 1e6
        lines.append(
            f"  JPEG <= 0.1 MB per 640x480 image: {kb:.3f} MB {'met' if kb <= 0.1 else 'NOT met'}"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    served = sorted({(r.name, r.input_format) for r in results if r.served})
    for name, fmt in served:
        rs = sorted(
            (r for r in results if (r.name, r.input_format) == (name, fmt)),
            key=lambda r: r.concurrency,
        )
        style = "-" if name == "ensemble_model" else "--"
        x = [r.concurrency for r in rs]
        ax_t.plot(x, [r.throughput for r in rs], style, marker="o", label=f"{name} {fmt}")
        ax_l.plot(x, [r.p50_ms for r in rs], style, marker="o", label=f"{name} {fmt} p50")
    styles = {"fp32": ":", "int8": "-.", "bf16": (0, (1, 4)), "fp16": (0, (3, 1))}
    for name, color in (("bare-onnxruntime", "black"), ("bare-pytorch", "gray")):
        for prec in sorted({r.precision for r in results if r.name == name}):
            b = best([r for r in results if r.precision == prec], name)
            if b:
                ax_t.axhline(
                    b.throughput,
                    color=color,
                    linestyle=styles.get(prec, ":"),
                    label=f"{name} {prec} (best batch)",
                )
    ax_t.set(
        xscale="log",
        xlabel="concurrency (requests in flight)",
        ylabel="images/s",
        title="Throughput",
    )
    ax_l.set(
        xscale="log",
        yscale="log",
        xlabel="concurrency",
        ylabel="ms",
        title="Latency p50 per request",
    )
    concurrencies = sorted({r.concurrency for r in results if r.served})
    for ax in (ax_t, ax_l):
        if concurrencies:
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.minorticks_off()
    for ax in (ax_t, ax_l):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(path: Path) -> list[Result]:
    """Results saved by :func:`save` (results.json), e.g. to redraw a plot."""
    return [Result(**row) for row in json.loads(path.read_text())["results"]]


def save(results: list[Result], preprocessing, machine: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "png": out_dir / "throughput.png",
        "txt": out_dir / "report.txt",
    }
    rows = [asdict(r) for r in results]
    paths["json"].write_text(
        json.dumps({"machine": machine, "results": rows, "preprocessing": preprocessing}, indent=2)
    )
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["txt"].write_text(report(results, preprocessing) + "\n")
    plot(results, paths["png"])
    return paths


def machine_description() -> dict[str, Any]:
    import os
    import platform

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- one run ------------------------------------------------------------------------------


@dataclass
class BenchRun:
    """What to measure: the served side (a running server, or one started here on the
    repositories) and the bare side (the exported model.onnx and the checkpoint)."""

    checkpoint: str = ""  # hub id or directory; default: the tutorial's checkpoint
    revision: str | None = None
    allow_standin: bool = True
    repositories: list[Path] = field(default_factory=list)  # default: this project's
    workdir: Path = Path(".hf_triton/bench")
    url: str | None = None  # host:port of a running server (protocol's port)
    onnx: Path | None = None  # the served model.onnx, for the bare runs
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    ready_timeout_s: float = 600.0
    settings: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class BenchReport:
    results: list[Result]
    preprocessing: dict[str, float]
    machine: dict[str, Any]

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)

    def text(self) -> str:
        return report(self.results, self.preprocessing)


def run(options: BenchRun, progress: Callable[[str], None] = log.info) -> BenchReport:
    """Measure bare compute and the served models for ``options``, in one process."""
    from hf_triton import checkpoints
    from hf_triton.serve import DEFAULT_REPOSITORIES, Deployment
    from hf_triton.server import ServerConfig, free_port

    settings = options.settings
    name = options.checkpoint or checkpoints.DEFAULT_CHECKPOINT
    if options.url and any(p != "fp32" for p in options.precisions):
        raise BenchError("--precisions needs the benchmark's own server (no --url)")
    if options.url and settings.bare and options.onnx is None:
        raise BenchError(
            "with --url the bare runs need --onnx PATH (the served model.onnx), or pass --no-bare"
        )
    ckpt = checkpoints.resolve(
        name, options.revision, allow_standin=options.allow_standin and not options.url
    )
    progress(f"weights: {ckpt.describe()}")
    image = sample_image(settings)
    variant_models: dict[str, str] = {}
    deployment = None
    onnx_paths: dict[str, Path] = {}
    if options.url:
        if options.onnx is not None:
            onnx_paths["fp32"] = options.onnx
    else:
        repositories = options.repositories or list(DEFAULT_REPOSITORIES)
        sources = list(repositories)
        for prec in [p for p in options.precisions if p != "fp32"]:
            built = build_variant(
                ckpt, prec, options.workdir / "variants", progress, settings.models
            )
            if built is None:
                continue
            repos, models, variant_onnx = built
            sources += repos
            variant_models |= dict.fromkeys(models, prec)
            if variant_onnx:
                onnx_paths[prec] = variant_onnx
        # Stages the repositories; exports fp32 model.onnx into the staged copy when stale.
        deployment = Deployment.prepare(
            name,
            options.revision,
            repositories=sources,
            workdir=options.workdir,
            allow_standin=options.allow_standin,
        )
        staged = deployment.repositories[len(repositories) - 1]
        onnx_paths["fp32"] = options.onnx or staged / "vit" / "1" / "model.onnx"
        settings.models = [*settings.models, *variant_models]
    results: list[Result] = []
    if settings.bare:
        results += bench_bare(
            onnx_paths,
            ckpt.path,
            image,
            settings,
            progress,
            torch_precisions=tuple(options.precisions),
        )
    preprocessing = bench_preprocessing(
        DEFAULT_REPOSITORIES[0] / "python_vit" / "1" / "model.py", ckpt.path, image
    )
    server = None
    url = options.url
    try:
        if deployment is not None:
            port = free_port()
            config = ServerConfig(
                [], http_port=free_port(), grpc_port=port, metrics_port=free_port()
            )
            server = deployment.server(config)
            progress(f"starting Triton (log: {server.log_path})")
            server.start()
            server.wait_ready(options.ready_timeout_s)
            url = f"127.0.0.1:{port}" if settings.protocol == "grpc" else server.http_url[7:]
        assert url is not None
        results += bench_served(url, image, settings, progress, variant_models)
    finally:
        if server is not None:
            server.stop()
    machine = machine_description() | {"weights": ckpt.describe()}
    return BenchReport(results, preprocessing, machine)


def build_variant(
    ckpt: Any,
    prec: str,
    root: Path,
    progress: Callable[[str], None],
    models: list[str] | None = None,
):
    """Build the checkpoint's variant in ``prec`` (gated) under ``root``: its repositories,
    entry models and model.onnx (if any), or None when the gate refuses it."""
    from hf_triton import build, precision
    from hf_triton.spec import ModelSpec

    approach = "both" if prec in precision.ONNX_PRECISIONS else "python"
    if approach == "both" and models and all(m.startswith("ensemble") for m in models):
        approach = "ensemble"  # only ensembles are measured: no Python twin to load
    options = build.BuildOptions(
        name=f"vit_{prec}",
        preprocessing_name=f"preprocessing_{prec}",
        ensemble_name=f"ensemble_model_{prec}",
        precision=prec,
    )
    out = root / prec
    progress(f"building the {prec} variant ({approach}) and its accuracy gate")
    spec = ModelSpec.resolve(ckpt.path, checkpoint=ckpt.name)
    try:
        result = build.build(spec, out, approach=approach, options=options)
    except precision.GateFailed as e:
        progress(f"{prec} variant refused by the accuracy gate: {e}")
        return None
    for gate_report in result.gates:
        progress(f"accuracy gate: {gate_report.summary()}")
    onnx = out / "ensemble_model_repository" / options.name / "1" / "model.onnx"
    return result.repositories, result.entry_models, onnx if onnx.exists() else None
