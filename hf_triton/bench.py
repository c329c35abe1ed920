"""Throughput benchmark: every served model next to its bare runtime, in one run, any task.

For each model a client calls (every entry model of the served repositories: the tutorial's
``python_vit`` and ``ensemble_model``, or whatever ``hf-triton build`` made), measured on the
same machine and in one process:

* its bare runtime — ONNX Runtime on the ensemble's own ``model.onnx``, or PyTorch eager on the
  Python model's checkpoint, in the model's precision — compute only, inputs prepared
  beforehand, at batch 1 and at the largest concurrency's batch;
* the model served by Triton for each input format (images: fp32, uint8, jpeg; text) at each
  concurrency, with async tritonclient (gRPC or HTTP), after one served answer per format was
  checked against the bare runtime's; a request carries one image or sentence, or
  ``items_per_request`` of them as a client that batches (the bare batches follow);
* Triton's own per-step statistics at every concurrency (queue, input, compute, output for
  every model the request passes through), so the serving tax is visible where it is paid;
* when the server runs on this host, the CPU cores each of its processes (``tritonserver``,
  every model's Python-backend stubs) and the load generator kept busy, beside the bare
  runtime's own: where the cores bare compute has to itself go when served;
* the serving tax itself — served ÷ bare throughput at the best concurrency and the p50 added
  at concurrency 1 — from rounds that alternate bare and served windows, with their spread.

A measurement repeats fixed windows until the last three throughputs agree within 10%
(perf_analyzer's stability rule) or ``max_windows`` is reached, which is reported. Images are
counted in images/s, texts in sentences/s (and tokens/s).
"""

from __future__ import annotations

import asyncio
import copy
import csv
import dataclasses
import importlib.util
import io
import json
import logging
import os
import statistics
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hf_triton.errors import HfTritonError

log = logging.getLogger(__name__)


class BenchError(HfTritonError):
    """The benchmark was asked for something it cannot measure."""


#: Image input formats -> (input tensor, Triton dtype); text models take "text".
FORMATS = {
    "fp32": ("image", "FP32"),
    "uint8": ("image_uint8", "UINT8"),
    "jpeg": ("image_bytes", "BYTES"),
}
TEXT_FORMAT = ("text", "BYTES")

#: What "no serving tax" means, in one place: (measure, comparison, bound).
TARGETS = {
    "served ÷ bare throughput, best concurrency": (">=", 0.95),
    "p50 added at concurrency 1 (ms)": ("<=", 5.0),
}
#: A served answer equals its bare runtime's when their cosine is at least this (fp32).
MIN_COSINE = 0.9999


@dataclass
class BenchSettings:
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    formats: list[str] = field(default_factory=lambda: [*FORMATS, "text"])
    models: list[str] = field(default_factory=list)  # default: every entry model
    protocol: str = "grpc"
    window_s: float = 4.0
    #: A window also waits for this many items (up to max_window_s): with a few
    #: items/s, one request more or less in a short window is already a 10% swing.
    min_requests: int = 20
    max_window_s: float = 30.0
    warmup_s: float = 2.0
    min_windows: int = 3
    max_windows: int = 8
    stability: float = 0.10
    image_size: tuple[int, int] = (640, 480)  # width, height: a VGA photo
    jpeg_quality: int = 90
    bare: bool = True
    #: Alternating bare/served rounds for the serving tax (0: skip).
    tax_rounds: int = 3
    #: Items (images or sentences) each served request carries: 1, as one client's one
    #: photo or sentence; more, as a client that batches (``client.py --batch``, several
    #: ``--text``). Bare batches are counted in items alike.
    items_per_request: int = 1


@dataclass
class Result:
    name: str  # a served model, or bare-onnxruntime / bare-pytorch
    input_format: str  # fp32/uint8/jpeg/text; "pixel_values"/"tokens" for bare runs
    concurrency: int  # outstanding requests; for bare runs, the batch size
    throughput: float  # items (images or sentences) per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    bytes_per_image: int  # per item on the wire
    windows: list[float]
    stable: bool
    precision: str = "fp32"
    unit: str = "img"  # img | sentence
    tokens_per_item: float = 0.0  # text: mean tokens per sentence (tokens/s = throughput x it)
    check: str = ""  # served: its answer against the bare runtime's
    #: served: model -> {queue, input, infer, output} ms per request of that model, and busy:
    #: the model's instances computing, instance-seconds per second (Triton's statistics)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    #: served: model -> items per execution Triton ran while this was measured
    batch_sizes: dict[str, float] = field(default_factory=dict)
    #: CPU cores this process kept busy meanwhile: served, the load generator's (on a small
    #: machine it competes with the server for the cores bare runs have to themselves); bare,
    #: the runtime's own
    client_cores: float = 0.0
    #: served, when the server runs on this host: CPU cores its processes kept busy meanwhile,
    #: "tritonserver" and each model's Python-backend stubs (its instances summed) by model name
    server_cores: dict[str, float] = field(default_factory=dict)
    items_per_request: int = 1  # served: items each request carried (concurrency counts requests)

    @property
    def served(self) -> bool:
        return not self.name.startswith("bare")


@dataclass
class Tax:
    """The serving tax of one model, from alternating bare/served rounds."""

    model: str
    bare: str  # the bare runtime it is compared with
    input_format: str
    concurrency: int  # the served concurrency of the throughput ratio
    batch: int  # the bare batch of the throughput ratio
    ratios: list[float]  # served ÷ bare throughput, per round
    added_p50_ms: list[float]  # served p50 at concurrency 1 - bare p50 at its batch, per round
    items_per_request: int = 1  # served requests' items; the bare p50 is at this batch

    def summary(self) -> str:
        ratio, added = statistics.median(self.ratios), statistics.median(self.added_p50_ms)
        k = self.items_per_request
        each = f" of requests of {k} items" if k > 1 else ""
        one = f" (vs batch {k})" if k > 1 else ""
        return (
            f"  {self.model:<24} served ÷ {self.bare} {ratio:.2f} "
            f"(rounds {min(self.ratios):.2f}-{max(self.ratios):.2f}; c={self.concurrency}{each} "
            f"vs batch {self.batch}), p50 added at c=1{one} {added:+.1f} ms "
            f"(rounds {min(self.added_p50_ms):+.1f} to {max(self.added_p50_ms):+.1f})"
        )


def _stable(windows: list[float], tolerance: float) -> bool:
    last = windows[-3:]
    return len(last) == 3 and min(last) > 0 and max(last) / min(last) - 1 <= tolerance


def _percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    if not latencies_s:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(latencies_s) * 1e3, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


class _Windows:
    """Window bookkeeping shared by the served (asyncio) and the bare (blocking) loops.

    Completions are recorded as (finish time, latency); a window closes once it has lasted
    ``window_s`` and holds ``min_requests`` items (or has lasted ``max_window_s``); the
    run ends when the last three windows agree within ``stability`` (or at ``max_windows``).
    """

    def __init__(self, settings: BenchSettings, items_per_call: int):
        self.settings, self.items_per_call = settings, items_per_call
        self.done: list[tuple[float, float]] = []
        self.windows: list[float] = []
        self.edges: list[float] = []
        self.stable = False

    def record(self, start: float, end: float) -> None:
        self.done.append((end, end - start))

    def begin(self, now: float) -> None:
        """Warm-up over: count from ``now``."""
        self.edges = [now]

    def ready(self, now: float) -> bool:
        """Whether the open window may close at ``now``."""
        elapsed, s = now - self.edges[-1], self.settings
        if elapsed < s.window_s:
            return False
        return elapsed >= s.max_window_s or self._items(now) >= s.min_requests

    def close(self, now: float) -> bool:
        """Close the open window at ``now``; True when the run is over."""
        items = self._items(now)
        self.edges.append(now)
        self.windows.append(items / (self.edges[-1] - self.edges[-2]))
        s = self.settings
        self.stable = len(self.windows) >= s.min_windows and _stable(self.windows, s.stability)
        return self.stable or len(self.windows) >= s.max_windows

    def latencies(self) -> list[float]:
        """Latencies of the counted windows (the last three)."""
        counted_from = self.edges[-4] if len(self.edges) >= 4 else self.edges[0]
        return [lat for t, lat in self.done if counted_from <= t < self.edges[-1]]

    def _items(self, now: float) -> int:
        return self.items_per_call * sum(1 for t, _ in self.done if self.edges[-1] <= t < now)


async def measure(
    call: Callable[[], Awaitable[Any]],
    concurrency: int,
    settings: BenchSettings,
    images_per_call: int = 1,
) -> tuple[list[float], list[float], int, bool]:
    """Run ``concurrency`` workers calling ``call`` back to back; window by window.

    Returns (window throughputs, latencies of the counted windows, errors, stable).
    """
    w = _Windows(settings, images_per_call)
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
                # The first failure's reason goes to the log (the count to the results).
                (log.warning if errors == 1 else log.debug)("request failed: %s", e)
                continue
            w.record(start, time.perf_counter())

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(settings.warmup_s)
        w.begin(time.perf_counter())
        while True:
            await asyncio.sleep(settings.window_s)
            while not w.ready(time.perf_counter()):
                await asyncio.sleep(0.05)
            if w.close(time.perf_counter()):
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return w.windows, w.latencies(), errors, w.stable


def measure_blocking(
    fn: Callable[[], Any], settings: BenchSettings, items_per_call: int
) -> tuple[list[float], list[float], int, bool]:
    """``measure`` for one caller computing in this thread: a bare runtime's loop.

    Bare compute runs on the calling thread, not in a worker thread: PyTorch's OpenMP keeps
    one thread team per thread that starts parallel work, and once a second team exists
    (the worker's, beside the one that loaded the model) libgomp counts more threads than
    cores and stops spinning between parallel regions; every small operator then pays a
    wake-up. Measured on the 2-core AMX kind: bf16 ViT-base batch 1, 77 ms from a worker
    thread against 51 ms here, which is what the served model's stub computes at. Nothing
    here is asynchronous, so this thread is free to compute.
    """
    w = _Windows(settings, items_per_call)
    warm_until = time.perf_counter() + settings.warmup_s
    while time.perf_counter() < warm_until:
        fn()
    w.begin(time.perf_counter())
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        w.record(start, end)
        if w.ready(end) and w.close(end):
            break
    return w.windows, w.latencies(), 0, w.stable


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


#: What text models are measured with: ordinary sentences of 10-20 tokens.
def sample_texts() -> list[str]:
    from hf_triton.precision import eval_sentences

    return eval_sentences(16)


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


# -- what is served ---------------------------------------------------------------------------


@dataclass
class Target:
    """An entry model and the bare runtime it is measured against."""

    model: str
    approach: str  # python | ensemble
    modality: str  # image | text
    precision: str
    checkpoint: Path  # local, as the server loads it
    steps: list[str]  # models a request passes through (Triton statistics)
    onnx: Path | None = None  # the ensemble's model.onnx (bare ONNX Runtime)
    tower: str | None = None  # "image" or "text": that tower of an image-text model
    device: str = "cpu"  # where the Python pipeline runs ("cuda:N" for KIND_GPU): bare runs there
    max_batch: int = 0  # the entry model's max_batch_size: the largest batch serving can form
    compiled: bool = False  # the Python pipeline's model is torch.compile'd: so is the bare one

    @property
    def bare(self) -> str:
        if self.approach == "ensemble":
            return "bare-onnxruntime"
        return "bare-pytorch-compiled" if self.compiled else "bare-pytorch"

    @property
    def unit(self) -> str:
        return "img" if self.modality == "image" else "sentence"

    def formats(self, wanted: list[str]) -> list[str]:
        own = list(FORMATS) if self.modality == "image" else ["text"]
        return [f for f in own if f in wanted]


def instance_device(config: dict[str, Any]) -> str:
    """Where a Python pipeline's first instance runs, from its served config: "cpu", or
    "cuda:N" for KIND_GPU (Triton lists the GPUs it placed the group on)."""
    group = (config.get("instance_group") or [{}])[0]
    if group.get("kind") != "KIND_GPU":
        return "cpu"
    return f"cuda:{(group.get('gpus') or [0])[0]}"


def discover(url: str, models: list[str], onnx_of: Callable[[str], Path | None]) -> list[Target]:
    """The targets of ``models`` from the server's own configs (any task, any precision).

    ``onnx_of(name)`` finds the model.onnx of an ensemble's ONNX step.
    """
    import tritonclient.http as httpclient

    from hf_triton.tasks import get_task
    from hf_triton.templates.hf_common import EMBEDDINGS

    client = httpclient.InferenceServerClient(url=url)
    try:
        targets, callers = [], []
        for model in models:
            config = client.get_model_config(model)
            steps = [s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])]
            python = client.get_model_config(steps[0]) if steps else config
            params = {k: v["string_value"] for k, v in python.get("parameters", {}).items()}
            if "image_model" in params and "text_model" in params:
                # Zero-shot: no runtime of its own, it calls two towers (measured as entries).
                callers.append(f"'{model}' ({params['image_model']}, {params['text_model']})")
                continue
            if "checkpoint" not in params or "task" not in params:
                raise BenchError(f"model '{model}' was not made by hf-triton build: no task")
            # The ONNX Runtime step: the last step, or the one before a post-processing step.
            runtime = [
                s for s in steps if client.get_model_config(s).get("backend") == "onnxruntime"
            ]
            onnx = onnx_of((runtime or steps)[-1]) if steps else None
            prec = params.get("precision", "fp32") if not steps else _onnx_precision(onnx)
            outputs = {o["name"] for o in config.get("output", [])}
            tower = next((side for side, name in EMBEDDINGS.items() if name in outputs), None)
            device = instance_device(python) if not steps else "cpu"
            targets.append(
                Target(
                    model,
                    "ensemble" if steps else "python",
                    tower or get_task(params["task"]).modality,
                    prec,
                    Path(params["checkpoint"]),
                    steps or [model],
                    onnx,
                    tower,
                    device,
                    int(config.get("max_batch_size", 0)),
                    compiled=not steps and params.get("torch_compile") == "1",
                )
            )
        if callers:
            log.info(
                "Not measured: %s: zero-shot, calling the towers in brackets (measured as "
                "models of their own)",
                ", ".join(callers),
            )
        if callers and not targets:
            raise BenchError(
                f"{', '.join(callers)}: zero-shot models run no model of their own; measure "
                "the towers they call (named in brackets)"
            )
        return targets
    finally:
        client.close()


def _onnx_precision(path: Path | None) -> str:
    """The precision build recorded in ``model.onnx``; "?" when the file is not known here
    (a running server measured without --onnx, bare runs skipped)."""
    if path is None or not path.exists():
        return "?"
    import onnx

    from hf_triton.precision import PRECISION_KEY

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta.get(PRECISION_KEY, "fp32")


def entry_models(url: str, admin_key: str | None) -> list[str]:
    """Every model of a running server that is not a step of an ensemble (the repository
    index is a restricted API: the admin key opens it; or name the models with --models)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=url)
    headers = {"admin-key": admin_key} if admin_key else None
    try:
        try:
            index = client.get_model_repository_index(headers=headers)
        except InferenceServerException as e:
            raise BenchError(
                f"cannot list the models at {url} ({e.message()}): pass --models, or set "
                "HF_TRITON_ADMIN_KEY"
            ) from e
        names = [m["name"] for m in index if m.get("state") == "READY"]
        steps = {
            s["model_name"]
            for n in names
            for s in client.get_model_config(n).get("ensemble_scheduling", {}).get("step", [])
        }
        return [n for n in names if n not in steps]
    finally:
        client.close()


# -- bare runtimes ----------------------------------------------------------------------------


class Bare:
    """A target's bare runtime: compute only, on inputs prepared as the server prepares them."""

    def __init__(self, target: Target):
        from hf_triton.spec import ModelSpec

        self.target = target
        self.name = target.bare
        self.spec = ModelSpec.resolve(target.checkpoint)
        if target.tower:
            self.spec = self.spec.for_tower(target.tower)
        if target.approach == "ensemble":
            import onnxruntime as ort

            if target.onnx is None:
                raise BenchError(
                    f"no model.onnx for the bare run of '{target.model}': pass --onnx PATH, "
                    "or --onnx STEP=PATH for its ONNX step STEP (the served model.onnx), or "
                    "--no-bare"
                )
            session = ort.InferenceSession(str(target.onnx), providers=["CPUExecutionProvider"])
            self.output = first = session.get_outputs()[0].name
            self.forward = lambda feed: session.run([first], feed)[0]
            self.forward_all = lambda feed: session.run(None, feed)
        else:
            import torch

            from hf_triton.precision import apply_torch, compile_torch, eval_examples

            module = self.spec.module
            self.output = self.spec.outputs[0].name
            if target.precision != "fp32":
                module = apply_torch(copy.deepcopy(module), target.precision)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                target.precision, torch.float32
            )
            # The served instance's device: a KIND_GPU pipeline is measured against PyTorch on
            # that GPU (inputs copied there and answers back, as model.py does).
            device = torch.device(target.device)
            module = module.to(device)

            def tensors(feed: dict[str, np.ndarray]) -> list[Any]:
                out = [torch.from_numpy(v).to(device) for v in feed.values()]
                return [t.to(dtype) if t.is_floating_point() else t for t in out]

            if target.compiled:  # as model.py compiles it, while it loads
                examples = eval_examples(self.spec)
                module = compile_torch(
                    module, lambda m, batch: m(*tensors(self.feed(examples[:batch])))
                )

            def forward_all(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                with torch.inference_mode():
                    return [o.float().cpu().numpy() for o in module(*tensors(feed))]

            self.forward_all = forward_all
            self.forward = lambda feed: forward_all(feed)[0]

    def feed(self, examples: list[Any]) -> dict[str, np.ndarray]:
        return self.spec.encode(examples)


def bare_batches(target: Target, concurrency: list[int], items_per_request: int = 1) -> list[int]:
    """The bare batch of one request (latency: its items) and the largest batch the served
    model can run at the largest concurrency measured: more than its max_batch_size (0: no
    batching) is nothing serving could match."""
    top = min(max(concurrency) * items_per_request, max(target.max_batch, 1))
    return sorted({items_per_request, top})


def check_items_per_request(targets: list[Target], items: int) -> None:
    """Refuse requests larger than a model takes, before anything is measured."""
    if items < 1:
        raise BenchError(f"--items-per-request {items}: at least 1")
    for t in targets:
        if items > max(t.max_batch, 1):
            raise BenchError(
                f"--items-per-request {items}: '{t.model}' takes at most {max(t.max_batch, 1)} "
                f"items per request (its max_batch_size is {t.max_batch}); ask for fewer, or "
                "build it with a larger --max-batch-size"
            )


def bench_bare(bare: Bare, examples: list[Any], batch: int, settings: BenchSettings) -> Result:
    feed = bare.feed((examples * batch)[:batch])
    cpu, wall = time.process_time(), time.perf_counter()
    windows, lat, errors, stable = measure_blocking(lambda: bare.forward(feed), settings, batch)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    result = _result(bare.name, _bare_format(bare), batch, windows, lat, errors, 0, stable)
    result.precision, result.unit = bare.target.precision, bare.target.unit
    result.client_cores = cpu / wall if wall > 0 else 0.0
    return result


def _bare_format(bare: Bare) -> str:
    return "pixel_values" if bare.target.modality == "image" else "tokens"


# -- served -------------------------------------------------------------------------------

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0"}


def _argv(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:  # gone, or not ours to read
        return []


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces): state, ppid, ..."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    return text[text.rindex(")") + 2 :].split()


def server_processes(url: str, protocol: str) -> dict[int, str]:
    """The Triton server behind ``url`` when it runs on this host, and its Python-backend stubs:
    pid -> "tritonserver" or the model a stub serves (its model directory). The server is the
    ``tritonserver`` whose ``--grpc-port``/``--http-port`` (Triton's defaults, 8001/8000, when
    not given) is the URL's port. Empty for a server on another host, or one this host's
    /proc does not show with that port (a container publishing it under another)."""
    host, _, port = url.split("://")[-1].rstrip("/").rpartition(":")
    if host not in _LOOPBACK or not os.path.isdir("/proc"):
        return {}
    flag, default = ("--grpc-port=", "8001") if protocol == "grpc" else ("--http-port=", "8000")
    servers, stubs = [], []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        argv = _argv(pid)
        name = os.path.basename(argv[0]) if argv else ""
        if name == "tritonserver":
            ports = [a[len(flag) :] for a in argv if a.startswith(flag)]
            if (ports[-1] if ports else default) == port:
                servers.append(int(pid))
        elif name == "triton_python_backend_stub" and len(argv) > 1:
            parts = Path(argv[1]).parts  # <repository>/<model>/<version>/model.py
            stubs.append((pid, parts[-3] if len(parts) >= 3 else "stub"))
    if not servers:
        return {}
    found = {servers[-1]: "tritonserver"}
    for pid, model in stubs:
        fields = _stat(pid)
        if len(fields) > 1 and fields[1] == str(servers[-1]):  # its parent is the server
            found[int(pid)] = model
    return found


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU seconds each process has used so far (all its threads, ended ones
    included); a process that is gone is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        fields = _stat(pid)
        if len(fields) > 12:
            seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def cores_busy(
    processes: dict[int, str], before: dict[int, float], after: dict[int, float], wall: float
) -> dict[str, float]:
    """CPU cores each kind of process kept busy between ``before`` and ``after``: the server,
    then every model's stubs by name (the measured model's and the others': all share the
    cores)."""
    cores: dict[str, float] = {}
    for pid, label in processes.items():
        if pid in before and pid in after and wall > 0:
            cores[label] = cores.get(label, 0.0) + (after[pid] - before[pid]) / wall
    return dict(sorted(cores.items(), key=lambda kv: (kv[0] != "tritonserver", kv[0])))


def _client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc.aio as grpcclient

        return grpcclient, grpcclient.InferenceServerClient(url=url)
    import tritonclient.http.aio as httpclient

    return httpclient, httpclient.InferenceServerClient(url=url, conn_limit=256)


def _request(
    target: Target, fmt: str, examples: list[Any], quality: int, items: int = 1
) -> tuple[str, str, np.ndarray]:
    """One request's input: ``items`` examples (cycled), as the bare runtime's batch takes
    them."""
    chosen = (examples * items)[:items]
    if target.modality == "text":
        return (*TEXT_FORMAT, np.array([[text.encode()] for text in chosen], dtype=object))
    return (*FORMATS[fmt], np.concatenate([request_tensor(x, fmt, quality) for x in chosen]))


async def bench_served(
    url: str, target: Target, fmt: str, conc: int, examples: list[Any], settings: BenchSettings
) -> Result:
    """``conc`` requests outstanding, each of ``settings.items_per_request`` of ``examples``."""
    module, client = _client(settings.protocol, url)
    items = settings.items_per_request
    name, dtype, data = _request(target, fmt, examples, settings.jpeg_quality, items)
    try:

        async def call() -> None:
            tensor = module.InferInput(name, list(data.shape), dtype)
            tensor.set_data_from_numpy(data)
            await client.infer(target.model, [tensor])

        processes = server_processes(url, settings.protocol)
        before = cpu_seconds(processes)
        cpu, wall = time.process_time(), time.perf_counter()
        windows, lat, errors, stable = await measure(call, conc, settings, items)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        after = cpu_seconds(processes)
    finally:
        await client.close()
    per_item = payload_bytes(data) // items
    result = _result(target.model, fmt, conc, windows, lat, errors, per_item, stable)
    result.precision, result.unit = target.precision, target.unit
    result.items_per_request = items
    result.client_cores = cpu / wall if wall > 0 else 0.0
    result.server_cores = cores_busy(processes, before, after, wall)
    return result


def served_answer(
    url: str,
    target: Target,
    fmt: str,
    example: Any,
    quality: int,
    output: str,
    parameters: dict[str, Any] | None = None,
) -> np.ndarray:
    """The served model's ``output`` for one example."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url, network_timeout=300)
    name, dtype, data = _request(target, fmt, [example], quality)
    try:
        tensor = httpclient.InferInput(name, list(data.shape), dtype)
        tensor.set_data_from_numpy(data)
        result = client.infer(target.model, [tensor], parameters=parameters)
        return result.as_numpy(output)
    finally:
        client.close()


def verify(http_url: str, target: Target, fmt: str, example: Any, quality: int, bare: Bare) -> str:
    """One served answer against the bare runtime's on the same input: "ok (...)" or
    "MISMATCH (...)" (tensors by cosine; token classification's entities token by token)."""
    if bare.spec.postprocessed and bare.spec.modality == "image":
        settings: dict[str, Any] = {"threshold": 0.0, "top_k": 0}
        served = served_answer(http_url, target, fmt, example, quality, "detections", settings)
        return check_detections(served.reshape(-1)[0], bare, _decoded(example, fmt, quality))
    if bare.spec.postprocessed:
        params = {"aggregation_strategy": "none"}
        served = served_answer(http_url, target, fmt, example, quality, "entities", params)
        return check_entities(served.reshape(-1)[0], bare, example)
    served = served_answer(http_url, target, fmt, example, quality, bare.output)
    decoded = _decoded(example, fmt, quality)
    return check_answer(served, bare.forward(bare.feed([decoded])), target.precision)


def check_detections(served: bytes, bare: Bare, image: Any) -> str:
    """Object detection: the served detections (threshold 0: every query) against the bare
    runtime's logits and boxes through the image processor's own post-processing."""
    import json

    from hf_triton.conformance import judge_detections
    from hf_triton.templates.hf_common import pipeline_detections, post_process_detections

    logits, boxes = bare.forward_all(bare.feed([image]))[:2]
    size = tuple(int(d) for d in np.asarray(image).shape[:2])
    (found,) = post_process_detections(bare.spec.preprocessor, logits, boxes, 0.0, [size])
    want = pipeline_detections(found, bare.spec.id2label)
    bound = 1e-3 if bare.target.precision == "fp32" else 0.05
    row = judge_detections([json.loads(served)], [want], bound, 1)
    return f"{'ok' if row.passed else 'MISMATCH'} ({row.note}, |score| {row.value:.1e})"


def check_entities(served: bytes, bare: Bare, text: str) -> str:
    """Token classification: the served entities (per token, aggregation "none") against the
    bare runtime's logits for the same text: same tokens, labels and offsets, scores within
    the fp32 export's bound."""
    import json

    from hf_triton.conformance import judge_entities
    from hf_triton.templates.hf_common import TokenEntities

    tok = bare.spec.preprocessor
    enc = tok(
        [text],
        truncation=True,
        max_length=bare.spec.max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="np",
    )
    logits = bare.forward({n: enc[n].astype(np.int64) for n in bare.spec.inputs})[0]
    entities = TokenEntities(tok, bare.spec.id2label, "none", ())
    want = entities(
        text, enc["input_ids"][0], enc["offset_mapping"][0], enc["special_tokens_mask"][0], logits
    )
    row = judge_entities([json.loads(served)], [want], 1e-3)
    if not row.passed:
        return f"MISMATCH ({row.note}, |score| {row.value:.1e})"
    return f"ok ({len(want)} token labels, |score| {row.value:.1e})"


def check_answer(served: np.ndarray, bare: np.ndarray, precision: str) -> str:
    """ "ok (cos ...)" when the served answer is the bare runtime's, else "MISMATCH (...)"."""
    from hf_triton.precision import MIN_COSINE as GATE

    a, b = served.reshape(-1).astype(np.float64), bare.reshape(-1).astype(np.float64)
    if a.shape != b.shape:
        return f"MISMATCH (shape {served.shape} vs {bare.shape})"
    cosine = float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
    bound = MIN_COSINE if precision == "fp32" else GATE
    return f"{'ok' if cosine >= bound else 'MISMATCH'} (cos {cosine:.6f} >= {bound})"


def _statistics(http_url: str, models: list[str]) -> dict[str, dict[str, int]]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=http_url)
    try:
        out = {}
        for model in models:
            model_stats = client.get_inference_statistics(model)["model_stats"][0]
            stats = model_stats["inference_stats"]
            out[model] = {k: int(stats[k]["ns"]) for k in _STEPS} | {
                "count": int(stats["success"]["count"]),
                "inferences": int(model_stats.get("inference_count", 0)),
                "executions": int(model_stats.get("execution_count", 0)),
                # per execution, not per request: the time the instances spent computing
                "busy_ns": sum(
                    int(b[k]["ns"])
                    for b in model_stats.get("batch_stats", [])
                    for k in ("compute_input", "compute_infer", "compute_output")
                ),
            }
        return out
    finally:
        client.close()


_STEPS = {
    "queue": "queue",
    "compute_input": "input",
    "compute_infer": "infer",
    "compute_output": "output",
}


def breakdown(before: dict, after: dict, wall_s: float) -> dict[str, dict[str, float]]:
    """Per model, from Triton's statistics over ``wall_s`` seconds: ms per request of that
    model spent in each step, and ``busy``, its instances computing (instance-seconds per
    second). A queue time well above the run time with the step far from busy is the batcher
    waiting, not the model (docs/bench/report-int8-ensemble-c16.txt)."""
    out = {}
    for model in after:
        requests = max(after[model]["count"] - before[model]["count"], 1)
        steps = {
            label: (after[model][key] - before[model][key]) / 1e6 / requests
            for key, label in _STEPS.items()
        }
        busy_s = (after[model]["busy_ns"] - before[model]["busy_ns"]) / 1e9
        out[model] = steps | {"busy": busy_s / max(wall_s, 1e-9)}
    return out


def batch_sizes(before: dict, after: dict) -> dict[str, float]:
    """Items per execution each model ran meanwhile (Triton's inference ÷ execution counts; an
    inference is one item of a batch): the batches the server formed, beside the bare batch."""
    out = {}
    for model in after:
        runs = after[model]["executions"] - before[model]["executions"]
        if runs > 0:
            out[model] = (after[model]["inferences"] - before[model]["inferences"]) / runs
    return out


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
        f"  {r.throughput:7.2f} {r.unit}/s  p50 {r.p50_ms:8.1f} ms  p99 {r.p99_ms:8.1f} ms  "
        f"errors {r.errors}{flag}"
    )


def best(results: list[Result], name: str, fmt: str | None = None) -> Result | None:
    pool = [r for r in results if r.name == name and (fmt is None or r.input_format == fmt)]
    return max(pool, key=lambda r: r.throughput) if pool else None


def report(
    results: list[Result],
    preprocessing: dict[str, float] | None,
    taxes: list[Tax] | None = None,
) -> str:
    """The table, the per-step breakdown, the serving tax against the targets, as text."""
    width = max([24] + [len(r.name) + 1 for r in results])  # a name never runs into the next
    lines = [
        f"{'name':<{width}}{'prec':<6}{'input':<13}{'conc':>5}{'items/s':>9}{'p50 ms':>9}"
        f"{'p95 ms':>9}{'p99 ms':>9}{'err':>5}{'KB/item':>9}  stable  check"
    ]
    for r in results:
        rate = f"{r.throughput:>9.2f}"
        lines.append(
            f"{r.name:<{width}}{r.precision:<6}{r.input_format:<13}{r.concurrency:>5}{rate}"
            f"{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.p99_ms:>9.1f}{r.errors:>5}"
            f"{r.bytes_per_image / 1e3:>9.1f}  {'yes' if r.stable else 'NO ':<6}  {r.check}"
        )
    batched_requests = sorted({r.items_per_request for r in results if r.items_per_request > 1})
    if batched_requests:
        lines.append(
            f"Served requests carry {', '.join(map(str, batched_requests))} items each "
            "(--items-per-request): conc counts requests, items/s items, p50 is a request's; "
            "bare conc is the batch in items."
        )
    text = [r for r in results if r.unit == "sentence" and r.tokens_per_item]
    if text:
        lines.append("")
        lines.append("Text models, tokens/s (sentences/s x mean tokens per sentence):")
        for r in text:
            lines.append(
                f"  {r.name:<24} {r.input_format:<8} c={r.concurrency:<3} "
                f"{r.throughput * r.tokens_per_item:9.0f} tokens/s"
            )
    split = [r for r in results if r.breakdown]
    if split:
        lines.append("")
        lines.append(
            "Where a request's time goes (Triton's statistics: ms per request in each step; "
            "busy: the step's instances computing, instance-seconds per second):"
        )
        for r in split:
            for model, steps in r.breakdown.items():
                parts = (
                    ", ".join(f"{k} {v:.2f}" for k, v in steps.items() if k != "busy")
                    + f"; busy {steps['busy']:.2f}"
                )
                lines.append(
                    f"  {r.name:<24} {r.input_format:<6} c={r.concurrency:<3} {model:<22} {parts}"
                )
    batched = [r for r in results if r.batch_sizes and r.concurrency > 1]
    if batched:
        lines.append("")
        lines.append("Items per batch Triton ran, per step (its statistics; bare: the batch):")
        for r in batched:
            sizes = ", ".join(f"{m} {n:.1f}" for m, n in r.batch_sizes.items())
            lines.append(f"  {r.name:<24} {r.input_format:<6} c={r.concurrency:<3} {sizes}")
    loaded = [r for r in results if r.served and r.client_cores > 0]
    if loaded:
        lines.append("")
        lines.append(
            f"Load generator (this process), CPU cores busy while serving, of "
            f"{os.cpu_count()} here (bare runs have the cores to themselves):"
        )
        for r in loaded:
            lines.append(
                f"  {r.name:<24} {r.input_format:<6} c={r.concurrency:<3} {r.client_cores:.2f}"
            )
    watched = [r for r in results if r.server_cores]
    if watched:
        lines.append("")
        lines.append(
            f"CPU cores busy, per process on this host (of {os.cpu_count()}; served: the "
            "server's processes and the load generator, bare: the runtime alone):"
        )
        for r in results:
            if r.served and not r.server_cores:
                continue
            cores = [f"{k} {v:.2f}" for k, v in r.server_cores.items()]
            cores.append(f"{'load generator' if r.served else 'bare runtime'} {r.client_cores:.2f}")
            total = sum(r.server_cores.values()) + r.client_cores
            lines.append(
                f"  {r.name:<24} {r.input_format:<12} c={r.concurrency:<3} "
                f"{', '.join(cores)}; total {total:.2f}"
            )
    variants = sorted({(r.name, r.precision) for r in results if r.precision != "fp32"})
    fp32_ort = best([r for r in results if r.precision == "fp32"], "bare-onnxruntime")
    if variants and fp32_ort:
        lines.append("")
        lines.append("Reduced precision, best throughput ÷ fp32 bare ONNX Runtime:")
        for name, prec in variants:
            b = best([r for r in results if r.precision == prec], name)
            if b:
                lines.append(
                    f"  {name:<24} {prec:<5} {b.throughput:7.2f} {b.unit}/s  "
                    f"{b.throughput / fp32_ort.throughput:.2f}x"
                )
    if preprocessing:
        lines.append(
            f"Preprocessing per image: HF processor {preprocessing['reference_ms']:.2f} ms, "
            f"vectorised {preprocessing['vectorized_ms']:.2f} ms "
            f"({preprocessing['speedup']:.1f}x, max |diff| {preprocessing['max_abs_diff']:.1e})"
        )
    if taxes:
        lines.append("")
        lines.append("Serving tax (rounds alternating bare and served windows):")
        lines += [t.summary() for t in taxes]
        lines.append("")
        lines.append("Targets:")
        for t in taxes:
            measured = {
                "served ÷ bare throughput, best concurrency": statistics.median(t.ratios),
                "p50 added at concurrency 1 (ms)": statistics.median(t.added_p50_ms),
            }
            for target, (op, bound) in TARGETS.items():
                value = measured[target]
                met = value >= bound if op == ">=" else value <= bound
                lines.append(
                    f"  {t.model:<24} {target} {op} {bound:g}: {value:.2f} "
                    f"{'met' if met else 'NOT met'}"
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
        style = "-" if name.startswith("ensemble") else "--"
        x = [r.concurrency for r in rs]
        ax_t.plot(x, [r.throughput for r in rs], style, marker="o", label=f"{name} {fmt}")
        ax_l.plot(x, [r.p50_ms for r in rs], style, marker="o", label=f"{name} {fmt} p50")
    styles = {"fp32": ":", "int8": "-.", "bf16": (0, (1, 4)), "fp16": (0, (3, 1))}
    for name, color in (
        ("bare-onnxruntime", "black"),
        ("bare-pytorch", "gray"),
        ("bare-pytorch-compiled", "silver"),
    ):
        for prec in sorted({r.precision for r in results if r.name == name}):
            b = best([r for r in results if r.precision == prec], name)
            if b:
                ax_t.axhline(
                    b.throughput,
                    color=color,
                    linestyle=styles.get(prec, ":"),
                    label=f"{name} {prec} (best batch)",
                )
    sizes = sorted({r.items_per_request for r in results if r.served})
    each = f", {'/'.join(map(str, sizes))} items each" if sizes and sizes != [1] else ""
    ax_t.set(
        xscale="log",
        xlabel=f"concurrency (requests in flight{each})",
        ylabel="items/s (images or sentences)",
        title="Throughput",
    )
    ax_l.set(
        xscale="log",
        yscale="log",
        xlabel=f"concurrency{f' (requests of {each[2:]})' if each else ''}",
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
    fields = {f.name for f in dataclasses.fields(Result)}
    rows = json.loads(path.read_text())["results"]
    return [Result(**{k: v for k, v in row.items() if k in fields}) for row in rows]


def save(
    results: list[Result],
    preprocessing: dict[str, float] | None,
    machine: dict,
    out_dir: Path,
    taxes: list[Tax] | None = None,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "png": out_dir / "throughput.png",
        "txt": out_dir / "report.txt",
    }
    rows = [asdict(r) for r in results]
    data = {
        "machine": machine,
        "results": rows,
        "preprocessing": preprocessing,
        "taxes": [asdict(t) for t in taxes or []],
    }
    paths["json"].write_text(json.dumps(data, indent=2))
    with paths["csv"].open("w", newline="") as f:
        columns = [k for k in rows[0] if k not in ("breakdown", "server_cores")]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["txt"].write_text(report(results, preprocessing, taxes) + "\n")
    plot(results, paths["png"])
    return paths


def machine_description() -> dict[str, Any]:
    import platform

    from hf_triton.hardware import detect

    machine = detect()
    return {
        "cpu": machine.cpu,
        "cores": machine.cores,
        "kind": machine.kind,  # every figure names the CPU kind it was measured on
        "gpu": machine.gpu or "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- one run ------------------------------------------------------------------------------


@dataclass
class BenchRun:
    """What to measure: the served side (a running server, or one started here on the
    repositories) and the bare side (each model's own runtime)."""

    checkpoint: str = ""  # serve every model with this checkpoint; "": each config's own
    revision: str | None = None
    allow_standin: bool = True
    repositories: list[Path] = field(default_factory=list)  # default: this project's
    workdir: Path = Path(".hf_triton/bench")
    url: str | None = None  # host:port of a running server (protocol's port)
    http_url: str | None = None  # its HTTP host:port (statistics, checks); default: guessed
    #: With url: the served model.onnx for the bare runs, by ONNX step name ("*": any step).
    onnx: dict[str, Path] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    ready_timeout_s: float = 600.0
    settings: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class BenchReport:
    results: list[Result]
    preprocessing: dict[str, float]
    machine: dict[str, Any]
    taxes: list[Tax] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)

    @property
    def mismatches(self) -> list[Result]:
        return [r for r in self.results if r.check.startswith("MISMATCH")]

    def text(self) -> str:
        return report(self.results, self.preprocessing, self.taxes)


def _check_fits_default_repositories(name: str, path: Path) -> None:
    """The default repositories are the tutorial's ViT pipeline: an image model only."""
    from hf_triton.tasks import UnsupportedModel, get_task, infer_task

    try:
        task = infer_task(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, UnsupportedModel):
        return  # the server's own load error says more than a guess here
    if get_task(task).modality != "image":
        raise BenchError(
            f"--checkpoint {name} is a {task} model, but without --model-repository the "
            "benchmark serves the tutorial's ViT repositories (an image pipeline). Build "
            f"repositories for it: `hf-triton build --model {name} --out DIR`, then pass "
            "--model-repository DIR/python_model_repository --model-repository "
            "DIR/ensemble_model_repository (and no --checkpoint)."
        )


def run(options: BenchRun, progress: Callable[[str], None] = log.info) -> BenchReport:
    """Measure every entry model next to its bare runtime, in one process."""
    from hf_triton import checkpoints
    from hf_triton.serve import DEFAULT_REPOSITORIES, SERVER_ENV, Deployment, onnx_models
    from hf_triton.server import ServerConfig, free_port

    settings = options.settings
    if options.url and any(p != "fp32" for p in options.precisions):
        raise BenchError("--precisions needs the benchmark's own server (no --url)")
    for prec in options.precisions:  # every item understood before anything is built
        _variant(prec)
    check_items_per_request([], settings.items_per_request)  # each model's bound: once known
    repositories = options.repositories or list(DEFAULT_REPOSITORIES)
    checkpoint = options.checkpoint or (
        None if options.repositories else checkpoints.DEFAULT_CHECKPOINT
    )
    server = None
    admin_key = os.environ.get("HF_TRITON_ADMIN_KEY")
    onnx_dirs: dict[str, Path] = {}
    server_env = "unknown (a server started elsewhere)"
    if options.url:
        url, http_url = options.url, options.http_url or options.url
        onnx_dirs.update(options.onnx)  # "*": every ONNX step
    else:
        sources = list(repositories)
        if checkpoint is not None:
            ckpt = checkpoints.resolve(
                checkpoint, options.revision, allow_standin=options.allow_standin
            )
            if not options.repositories:
                _check_fits_default_repositories(checkpoint, ckpt.path)
            for prec in [p for p in options.precisions if p != "fp32"]:
                built = build_variant(
                    ckpt, prec, options.workdir / "variants", progress, settings.models
                )
                if built is not None:
                    sources += built[0]
                    if settings.models:  # named models: their variants too, once each
                        settings.models = list(dict.fromkeys([*settings.models, *built[1]]))
        deployment = Deployment.prepare(
            checkpoint,
            options.revision,
            repositories=sources,
            workdir=options.workdir,
            allow_standin=options.allow_standin,
        )
        for repo in deployment.repositories:
            for model_dir in onnx_models(repo):
                onnx_dirs[model_dir.name] = model_dir / "1" / "model.onnx"
        grpc, http = free_port(), free_port()
        config = ServerConfig([], http_port=http, grpc_port=grpc, metrics_port=free_port())
        server = deployment.server(config)
        admin_key = config.admin_key
        # How the server's PyTorch threads wait moves its figures (README, Throughput).
        server_env = " ".join(f"{k}={server.extra_env.get(k, '')}" for k in SERVER_ENV)
        progress(f"starting Triton (log: {server.log_path})")
        server.start()
        http_url = f"127.0.0.1:{http}"
        url = f"127.0.0.1:{grpc}" if settings.protocol == "grpc" else http_url
    try:
        if server is not None:
            server.wait_ready(options.ready_timeout_s)
        models = settings.models or entry_models(http_url, admin_key)
        targets = discover(http_url, models, lambda name: onnx_dirs.get(name, onnx_dirs.get("*")))
        check_items_per_request(targets, settings.items_per_request)
        results, taxes = _measure_targets(url, http_url, targets, settings, progress)
    finally:
        if server is not None:
            server.stop()
    preprocessing = {}
    image = next((t for t in targets if t.modality == "image"), None)
    if image is not None:
        preprocessing = bench_preprocessing(
            DEFAULT_REPOSITORIES[0] / "python_vit" / "1" / "model.py",
            image.checkpoint,
            sample_image(settings),
        )
    weights = "; ".join(sorted({_weights(t.checkpoint) for t in targets}))
    machine = machine_description() | {"weights": weights, "server_env": server_env}
    return BenchReport(results, preprocessing, machine, taxes)


def _weights(path: Path) -> str:
    from hf_triton.checkpoints import STANDIN_MARKER

    if (path / STANDIN_MARKER).exists():
        return f"OFFLINE STAND-IN, RANDOM weights ({path})"
    return str(path)


def _measure_targets(
    url: str,
    http_url: str,
    targets: list[Target],
    settings: BenchSettings,
    progress: Callable[[str], None],
) -> tuple[list[Result], list[Tax]]:
    results: list[Result] = []
    taxes: list[Tax] = []
    image = sample_image(settings)
    texts = sample_texts()
    bares: dict[tuple[str, str, str, str | None, str], Bare] = {}
    for target in targets:
        examples: list[Any] = [image] if target.modality == "image" else texts
        tokens = 0.0
        bare = None
        if settings.bare:
            key = (
                target.bare,
                str(target.onnx or target.checkpoint),
                target.precision,
                target.tower,
                target.device,
            )
            if key not in bares:
                bares[key] = Bare(target)
                for batch in bare_batches(target, settings.concurrency, settings.items_per_request):
                    on = "" if target.device == "cpu" else f" on {target.device}"
                    progress(f"{target.bare} {target.precision} batch {batch}{on} ({target.model})")
                    results.append(bench_bare(bares[key], examples, batch, settings))
                    progress(_line(results[-1]))
            bare = bares[key]
            if target.modality == "text":  # real tokens per text, padding not counted
                tokenizer = bare.spec.preprocessor
                tokens = float(np.mean([len(tokenizer(t)["input_ids"]) for t in texts]))
        for fmt in target.formats(settings.formats):
            check = ""
            if bare is not None:
                check = verify(http_url, target, fmt, examples[0], settings.jpeg_quality, bare)
                progress(f"{target.model} {fmt}: answer {check}")
            for conc in settings.concurrency:
                progress(f"{target.model} {fmt} concurrency {conc}")
                before = _statistics(http_url, target.steps)
                start = time.perf_counter()
                result = asyncio.run(bench_served(url, target, fmt, conc, examples, settings))
                wall_s = time.perf_counter() - start
                after = _statistics(http_url, target.steps)
                result.breakdown = breakdown(before, after, wall_s)
                result.batch_sizes = batch_sizes(before, after)
                result.check, result.tokens_per_item = check, tokens
                results.append(result)
                progress(_line(results[-1]))
        if bare is not None and settings.tax_rounds > 0:
            taxes.append(_tax(url, target, bare, examples, results, settings, progress))
    return results, taxes


def _decoded(example: Any, fmt: str, quality: int) -> Any:
    """What the server sees of an example sent as ``fmt`` (a JPEG is decoded as load_image)."""
    if fmt != "jpeg":
        return example
    data = request_tensor(example, fmt, quality)[0, 0]
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _tax(
    url: str,
    target: Target,
    bare: Bare,
    examples: list[Any],
    results: list[Result],
    settings: BenchSettings,
    progress: Callable[[str], None],
) -> Tax:
    """Alternate bare and served windows: throughput at each side's best setting, p50 at 1."""
    served = [r for r in results if r.name == target.model]
    top = max(served, key=lambda r: r.throughput)
    bares = [r for r in results if r.name == target.bare and r.precision == target.precision]
    batch = max(bares, key=lambda r: r.throughput).concurrency
    quick = dataclasses.replace(settings, min_windows=1, max_windows=2)
    items = settings.items_per_request
    tax = Tax(target.model, target.bare, top.input_format, top.concurrency, batch, [], [], items)
    for round_ in range(settings.tax_rounds):
        progress(f"serving tax of {target.model}, round {round_ + 1}/{settings.tax_rounds}")
        b_top = bench_bare(bare, examples, batch, quick)
        s_top = asyncio.run(
            bench_served(url, target, top.input_format, top.concurrency, examples, quick)
        )
        b_one = bench_bare(bare, examples, items, quick)  # one request's items at once
        s_one = asyncio.run(bench_served(url, target, top.input_format, 1, examples, quick))
        tax.ratios.append(s_top.throughput / b_top.throughput)
        tax.added_p50_ms.append(s_one.p50_ms - b_one.p50_ms)
    return tax


def _variant(prec: str) -> tuple[str, bool]:
    """``--precisions`` item: (precision, compiled by torch.compile)."""
    from hf_triton.templates.hf_common import COMPILE_PRECISIONS

    base, plus, extra = prec.partition("+")
    if (plus and extra != "compile") or not base:
        raise BenchError(f"--precisions {prec!r}: a precision, or one followed by +compile")
    if plus and base not in COMPILE_PRECISIONS:
        raise BenchError(
            f"--precisions {prec!r}: +compile follows {' or '.join(COMPILE_PRECISIONS)} "
            "(as build --torch-compile)"
        )
    return base, bool(plus)


def build_variant(
    ckpt: Any,
    prec: str,
    root: Path,
    progress: Callable[[str], None],
    models: list[str] | None = None,
):
    """Build the checkpoint's variant in ``prec`` (gated) under ``root``: its repositories,
    entry models and model.onnx (if any), or None when the gate refuses it. ``prec`` is a
    precision, or one followed by ``+compile``: the Python pipeline compiled by torch.compile
    (``build --torch-compile``), measured against bare PyTorch compiled alike."""
    from hf_triton import build, precision
    from hf_triton.spec import ModelSpec

    base, compiled = _variant(prec)
    approach = "both" if base in precision.ONNX_PRECISIONS and not compiled else "python"
    if approach == "both" and models and all(m.startswith("ensemble") for m in models):
        approach = "ensemble"  # only ensembles are measured: no Python twin to load
    tag = f"{base}_compiled" if compiled else base
    options = build.BuildOptions(
        name=f"vit_{tag}",
        preprocessing_name=f"preprocessing_{tag}",
        ensemble_name=f"ensemble_model_{tag}",
        precision=base,
        torch_compile=compiled,
    )
    out = root / tag
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
