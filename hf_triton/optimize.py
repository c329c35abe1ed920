"""Choose the fastest served variant that passes the accuracy gate, on this machine.

One run: detect the machine's kind (:mod:`hf_triton.hardware`), build every candidate
variant the machine can run (fp32, fused and int8 ONNX Runtime; fp32, int8 and bf16 PyTorch,
fp32 and bf16 compiled by torch.compile; fp16 with a GPU), gate each against fp32, serve them
all from one Triton server, measure each served next to its bare runtime in alternating rounds,
tune the winner's Triton config by measuring each change against the current best (reloading
the model with the new config, as Model Analyzer does), and write the winner's repository with
a report saying why.

Nothing here decides from tables of what should be fast: every choice is a measurement.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_triton import bench, build, checkpoints, export, hardware, precision
from hf_triton.errors import HfTritonError
from hf_triton.spec import ModelSpec

log = logging.getLogger(__name__)


class OptimizeError(HfTritonError):
    """No candidate could be built, served or measured."""


@dataclass
class Candidate:
    key: str  # e.g. "int8-onnxruntime"
    precision: str
    approach: str  # python (PyTorch) | ensemble (ONNX Runtime)
    fused: bool = False  # ONNX Runtime's offline transformer fusions
    compiled: bool = False  # PyTorch's model compiled by torch.compile while it loads
    instance_kind: str = "KIND_CPU"  # KIND_GPU for PyTorch on a GPU machine
    skipped: str = ""  # why it was not tried on this machine
    refused: str = ""  # the gate's (or the build's) verdict when it failed
    gate: str = ""  # the gate's summary when it passed ("" for the fp32 references)
    entry_model: str = ""
    check: str = ""  # one served answer against the bare runtime's
    served: list[float] = field(default_factory=list)  # items/s at the top concurrency
    bare: list[float] = field(default_factory=list)  # items/s at the same batch
    served_p50_ms: list[float] = field(default_factory=list)  # at concurrency 1
    bare_p50_ms: list[float] = field(default_factory=list)  # at one request's batch
    #: Finalists only: served items/s in the tuned config, in rounds alternating with the
    #: other finalists (what the final choice compares).
    tuned_served: list[float] = field(default_factory=list)
    tuned_config: str = ""  # the finalist's kept changes, for the report

    @property
    def runtime(self) -> str:
        return "ONNX Runtime" if self.approach == "ensemble" else "PyTorch"

    @property
    def tag(self) -> str:
        return self.key.replace("-", "_")

    @property
    def measured(self) -> bool:
        return bool(self.served) and not self.check.startswith("MISMATCH")

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else 0.0


#: Every candidate, in the order they are built and reported: key, precision, approach, ONNX
#: Runtime's fusions, torch.compile.
CANDIDATES = (
    ("fp32-onnxruntime", "fp32", "ensemble", False, False),
    ("fused-onnxruntime", "fp32", "ensemble", True, False),
    ("int8-onnxruntime", "int8", "ensemble", False, False),
    ("fp32-pytorch", "fp32", "python", False, False),
    ("fp32-pytorch-compiled", "fp32", "python", False, True),
    ("int8-pytorch", "int8", "python", False, False),
    ("bf16-pytorch", "bf16", "python", False, False),
    ("bf16-pytorch-compiled", "bf16", "python", False, True),
    ("fp16-pytorch", "fp16", "python", False, False),
)
YARDSTICK = "fp32-onnxruntime"

#: What tuning searches, in this order: instances (with ONNX Runtime's or PyTorch's threads
#: split), ONNX Runtime's threads spinning within a run (the ONNX step), the batcher's delay,
#: a preferred batch size (the requests each instance gets when every client has one in
#: flight: it goes at once instead of waiting out the delay), the ensemble's preprocessing
#: instances, and no queue policy (Triton then forms the next batch while one runs).
KNOBS = ("instances", "spin", "delay", "batch", "preprocessing", "queue")


def candidates(machine: hardware.Machine, wanted: list[str] | None = None) -> list[Candidate]:
    """The candidates, each with the reason it is skipped on ``machine`` (if it is)."""
    known = [key for key, *_ in CANDIDATES]
    unknown = sorted(set(wanted or []) - set(known))
    if unknown:
        raise OptimizeError(f"unknown candidates {unknown}; choose from {', '.join(known)}")
    out = []
    for key, prec, approach, fused, compiled in CANDIDATES:
        c = Candidate(key, prec, approach, fused, compiled)
        if wanted and key not in wanted:
            c.skipped = "not asked for (--candidates)"
        elif compiled and machine.gpu:
            c.skipped = "torch.compile is offered for CPU instances (not measured on GPUs)"
        elif compiled and not shutil.which(os.environ.get("CXX") or "g++"):
            c.skipped = "torch.compile's Inductor needs a C++ compiler (g++), none on the PATH"
        elif prec == "bf16" and not (machine.bf16 or machine.gpu):
            c.skipped = (
                f"no native bf16 on this CPU ({machine.kind}): PyTorch emulates it, ~8x slower "
                "than fp32 (measured on AVX2); needs AVX512-BF16, AMX or a GPU"
            )
        elif prec == "fp16" and not machine.gpu:
            c.skipped = "fp16 needs a GPU"
        elif machine.gpu and approach == "ensemble":
            c.skipped = "the ONNX Runtime installed here is its CPU build (onnxruntime-gpu: CUDA)"
        elif machine.gpu and prec == "int8":
            c.skipped = "PyTorch's dynamic int8 runs on the CPU only (the GPU runs fp16/bf16)"
        out.append(c)
    return out


# -- building ---------------------------------------------------------------------------------


def _options(c: Candidate, gpu: bool = False) -> build.BuildOptions:
    return build.BuildOptions(
        name=f"m_{c.tag}",
        preprocessing_name=f"pre_{c.tag}",
        ensemble_name=f"ens_{c.tag}",
        precision=c.precision,
        instance_kind="KIND_GPU" if gpu and c.approach == "python" else "KIND_CPU",
        torch_compile=c.compiled,
    )


def _onnx_of(out: Path, c: Candidate) -> Path:
    return out / "ensemble_model_repository" / _options(c).name / "1" / "model.onnx"


def fuse_onnx(spec: ModelSpec, src: Path, dst: Path) -> dict[str, int]:
    """ONNX Runtime's offline transformer fusions (attention, layer norm, GELU) of ``src``;
    the fused operators and their counts. Raises when the graph's inputs would change."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    config = spec.config.get("vision_config") or spec.config.get("text_config") or spec.config
    heads = int(config.get("num_attention_heads") or 0)
    hidden = int(config.get("hidden_size") or 0)
    model_type = "vit" if spec.modality == "image" else "bert"
    fused = optimize_model(
        str(src), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=1
    )
    names = [i.name for i in fused.model.graph.input]
    original = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    if sorted(names) != sorted(original):
        raise OptimizeError(f"fusion changed the inputs ({original} -> {names})")
    meta = fused.model.metadata_props.add()
    meta.key, meta.value = "hf_triton.fusions", "onnxruntime.transformers.optimizer"
    fused.save_model_to_file(str(dst))
    return {k: v for k, v in fused.get_fused_operator_statistics().items() if v}


def build_candidate(
    spec: ModelSpec, c: Candidate, root: Path, fp32_onnx: Path | None, gpu: bool = False
) -> tuple[list[Path], Path | None]:
    """Build ``c`` under ``root``; its repositories and its model.onnx (ensemble). Sets
    ``c.refused`` (and returns nothing) when the gate or the build refuses it."""
    out = root / c.key
    shutil.rmtree(out, ignore_errors=True)
    options = _options(c, gpu)
    c.instance_kind = options.instance_kind
    try:
        if c.fused:
            result = build.build(spec, out, "ensemble", options, export_onnx=False)
            target = _onnx_of(out, c)
            fp32 = fp32_onnx
            if fp32 is None or not fp32.exists():
                fp32 = out / "model.fp32.onnx"
                export.export_onnx(spec, fp32)
            operators = fuse_onnx(spec, fp32, target)
            report = precision.gate_onnx(spec, "fp32+fusions", fp32, target)
            ops = ", ".join(f"{k} x{v}" for k, v in operators.items()) or "nothing fused"
            c.gate = f"{report.summary()}; fused: {ops}"
        else:
            result = build.build(spec, out, c.approach, options)
            c.gate = "; ".join(g.summary() for g in result.gates)
    except (precision.GateFailed, HfTritonError) as e:
        c.refused = str(e)
        return [], None
    c.entry_model = result.entry_models[0]
    onnx = _onnx_of(out, c)
    return result.repositories, onnx if onnx.exists() else None


# -- measuring --------------------------------------------------------------------------------


@dataclass
class OptimizeRun:
    checkpoint: str
    out: Path
    task: str | None = None
    revision: str | None = None
    allow_standin: bool = True
    candidates: list[str] = field(default_factory=list)  # default: all the machine can run
    #: The loaded setting: requests in flight; the bare batch is as many requests' items.
    concurrency: int = 8
    rounds: int = 2  # alternating measurement rounds per candidate (medians reported)
    #: Knobs to search for the winner (empty: keep the built config); see :data:`KNOBS`.
    tune: list[str] = field(default_factory=lambda: list(KNOBS))
    #: The best this many untuned candidates served, and the best this many bare, are tuned
    #: before the choice: where a request's path through the server, not the model, caps one
    #: instance (small text models on fast CPUs), untuned candidates rank within the noise and
    #: tuning changes the order (:func:`select_finalists`).
    finalists: int = 2
    workdir: Path = Path(".hf_triton/optimize")
    #: The winner's repository: its model names, batch and queue settings.
    options: build.BuildOptions = field(default_factory=build.BuildOptions)
    settings: bench.BenchSettings = field(
        default_factory=lambda: bench.BenchSettings(
            window_s=3.0, min_requests=10, warmup_s=1.0, min_windows=1, max_windows=2
        )
    )

    @property
    def items(self) -> int:
        """Images or sentences each request carries (``settings.items_per_request``)."""
        return self.settings.items_per_request

    def bare_batch(self) -> int:
        """The bare batch the loaded setting is compared with: every request in flight with all
        its items, at most what the served model can form (its max_batch_size)."""
        return min(self.concurrency * self.items, self.options.max_batch_size)

    def load(self) -> str:
        """The loaded setting, in words, for the report."""
        each = f" of {self.items} items each" if self.items > 1 else ", one item each"
        return (
            f"{self.concurrency} requests in flight{each}, against bare batch "
            f"{self.bare_batch()}; p50 of one request against bare batch {self.items}"
        )


@dataclass
class Trial:
    change: str  # what this trial changed, e.g. "2 instances of m_int8_onnxruntime"
    values: dict[str, int]
    ratios: list[float] = field(default_factory=list)  # trial ÷ current best, per pair
    served: list[float] = field(default_factory=list)  # the trial's items/s, per pair
    kept: bool = False


@dataclass
class OptimizeReport:
    machine: hardware.Machine
    weights: str
    candidates: list[Candidate]
    winner: Candidate | None
    tuned: dict[str, int]
    trials: list[Trial]
    out: Path
    repositories: list[Path] = field(default_factory=list)
    unit: str = "img"
    load: str = ""  # the loaded setting measured (OptimizeRun.load)

    def yardstick(self) -> float:
        fp32 = next((c for c in self.candidates if c.key == YARDSTICK and c.bare), None)
        return fp32.median(fp32.bare) if fp32 else 0.0

    def tuned_served(self) -> float:
        """The tuned winner's served throughput: measured against the other finalists, else
        what its last kept change measured (0.0 when tuning kept nothing: the table's figure
        stands)."""
        if self.winner is not None and self.winner.tuned_served:
            return statistics.median(self.winner.tuned_served)
        kept = [t for t in self.trials if t.kept and t.served]
        return statistics.median(kept[-1].served) if kept else 0.0

    def text(self) -> str:
        base = self.yardstick()
        lines = [
            f"Machine: {self.machine.describe()}",
            f"Weights: {self.weights}",
            *([f"Load: {self.load}"] if self.load else []),
            "",
            f"| candidate | runtime | served {self.unit}/s | bare {self.unit}/s | "
            "served ÷ bare | ÷ fp32 bare ONNX Runtime | p50 c=1 ms (bare) | gate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in self.candidates:
            if c.skipped or c.refused:
                verdict = f"skipped: {c.skipped}" if c.skipped else f"REFUSED: {c.refused}"
                lines.append(f"| {c.key} | {c.runtime} | – | – | – | – | – | {verdict} |")
                continue
            served, bare = c.median(c.served), c.median(c.bare)
            mark = " **chosen**" if c is self.winner else ""
            lines.append(
                f"| {c.key}{mark} | {c.runtime} | {served:.2f} | {bare:.2f} | "
                f"{served / bare if bare else 0:.2f} | {served / base if base else 0:.2f} | "
                f"{c.median(c.served_p50_ms):.1f} ({c.median(c.bare_p50_ms):.1f}) | "
                f"{c.gate or 'reference'}; served answer {c.check} |"
            )
        lines.append("")
        if self.winner is None:
            lines.append("No candidate was measured; nothing was written.")
            return "\n".join(lines)
        finalists = [c for c in self.candidates if c.tuned_served]
        if finalists:
            lines.append(
                f"Chosen: {self.winner.key}, the highest served throughput of the "
                f"{len(finalists)} finalists (the best served and the best bare of the "
                "candidates that passed the gate), each tuned and then "
                f"measured in its tuned config ({len(self.winner.tuned_served)} alternating "
                "rounds, medians): "
                + ", ".join(
                    f"{c.key} {c.median(c.tuned_served):.2f}/s "
                    f"({c.median(c.tuned_served) / base if base else 0:.2f}x fp32 bare ONNX "
                    f"Runtime; {c.tuned_config})"
                    for c in finalists
                )
                + "."
            )
        else:
            lines.append(
                f"Chosen: {self.winner.key}, the highest served throughput of the candidates "
                f"that passed the gate ({len(self.winner.served)} alternating rounds, medians)."
            )
        if self.trials:
            lines += ["", "Tuning (each change measured against the current best, alternating):"]
            for t in self.trials:
                spread = f"{min(t.ratios):.2f}-{max(t.ratios):.2f}" if t.ratios else "–"
                ratio = statistics.median(t.ratios) if t.ratios else 0.0
                verdict = "kept" if t.kept else "dropped"
                lines.append(f"  {t.change}: {ratio:.2f}x (pairs {spread}) -> {verdict}")
            served = self.tuned_served()
            if served:
                how = "against the other finalists" if finalists else "the last kept change"
                lines.append(
                    f"Tuned {self.winner.key}: {served:.2f} {self.unit}/s served (median, "
                    f"{how}), {served / base if base else 0:.2f}x fp32 bare ONNX Runtime."
                )
        tuned = ", ".join(f"{k}={v}" for k, v in self.tuned.items())
        lines += ["", f"Config: {tuned}", f"Wrote {', '.join(str(r) for r in self.repositories)}"]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": dataclasses.asdict(self.machine)
            | {"flags": sorted(self.machine.flags), "kind": self.machine.kind},
            "weights": self.weights,
            "candidates": [dataclasses.asdict(c) | {"runtime": c.runtime} for c in self.candidates],
            "winner": self.winner.key if self.winner else None,
            "tuned": self.tuned,
            "trials": [dataclasses.asdict(t) for t in self.trials],
            "tuned_served": self.tuned_served(),
            "repositories": [str(r) for r in self.repositories],
        }


def _format(target: bench.Target) -> str:
    """What optimize sends: uint8 pixels (no decode, a quarter of fp32) or text."""
    return "uint8" if target.modality == "image" else "text"


def _served(url: str, target: bench.Target, conc: int, examples: list[Any], s: bench.BenchSettings):
    return asyncio.run(bench.bench_served(url, target, _format(target), conc, examples, s))


def _measure_round(
    url: str,
    c: Candidate,
    target: bench.Target,
    bare: bench.Bare,
    examples: list[Any],
    options: OptimizeRun,
) -> None:
    settings = options.settings
    b_top = bench.bench_bare(bare, examples, options.bare_batch(), settings)
    s_top = _served(url, target, options.concurrency, examples, settings)
    b_one = bench.bench_bare(bare, examples, options.items, settings)  # one request's items
    s_one = _served(url, target, 1, examples, settings)
    if s_top.errors or s_one.errors:
        raise OptimizeError(f"{target.model}: {s_top.errors + s_one.errors} requests failed")
    c.bare.append(b_top.throughput)
    c.served.append(s_top.throughput)
    c.bare_p50_ms.append(b_one.p50_ms)
    c.served_p50_ms.append(s_one.p50_ms)


# -- tuning -----------------------------------------------------------------------------------


class _Reloader:
    """Reload a served model with a changed config (explicit model control, admin key)."""

    def __init__(self, http_url: str, admin_key: str | None):
        import tritonclient.http as httpclient

        self.client = httpclient.InferenceServerClient(url=http_url, network_timeout=600)
        self.headers = {"admin-key": admin_key} if admin_key else None
        self.original: dict[str, dict] = {}
        self.loaded: dict[str, dict] = {}  # what each model runs now (as built: absent)

    def config(self, model: str) -> dict:
        if model not in self.original:
            self.original[model] = self.client.get_model_config(model)
        return copy.deepcopy(self.original[model])

    def apply(self, values: dict[str, int], models: dict[str, str]) -> None:
        """``values``: instances / preprocessing_instances / intra_op_threads / torch_threads /
        onnx_spin_within_run / max_queue_delay_us / preferred_batch_size / max_queue_size
        (0: no queue policy; otherwise the one built); ``models``: role (onnx, preprocessing,
        postprocessing, python) -> served model name. A post-processing step gets the batcher's
        settings, as build writes them for every step, and keeps its instances."""
        for role, model in models.items():
            config = self.config(model)
            if role != "postprocessing":  # it keeps the instances it was built with
                key = "preprocessing_instances" if role == "preprocessing" else "instances"
                for group in config.get("instance_group", []):
                    group["count"] = values[key]
            if "dynamic_batching" in config:
                batching = config["dynamic_batching"]
                batching["max_queue_delay_microseconds"] = values["max_queue_delay_us"]
                preferred = values["preferred_batch_size"]
                if preferred or batching.get("preferred_batch_size"):
                    batching["preferred_batch_size"] = [preferred] if preferred else []
                if not values["max_queue_size"]:
                    batching.pop("default_queue_policy", None)
            if role == "onnx":
                threads = values["intra_op_threads"]
                params = config.setdefault("parameters", {})
                params["intra_op_thread_count"] = {"string_value": str(threads)}
                for key in (build.ONNX_NO_SPINNING, build.ONNX_SPIN_STOP, build.ONNX_SPINNING):
                    params.pop(key, None)
                spin = "within-run" if values["onnx_spin_within_run"] else "never"
                key, value, _ = build.onnx_spin_parameter(spin)
                params[key] = {"string_value": value}
            if role == "python":
                params = config.setdefault("parameters", {})
                params["torch_threads"] = {"string_value": str(values["torch_threads"])}
            if config != self.loaded.get(model, self.original[model]):  # reload what changed
                self.client.load_model(model, headers=self.headers, config=json.dumps(config))
                self.loaded[model] = config

    def close(self) -> None:
        self.client.close()


def spins_within_run(mode: str) -> bool:
    """Whether ONNX Runtime's threads spin within a run under ``--onnx-spin MODE`` on this
    machine's CPU (``auto``: where it has AMX, as the Python-based backend chooses for a
    KIND_CPU instance, which every candidate's ONNX step is)."""
    if mode == "auto":
        return hardware.detect().amx
    return mode == "within-run"


def ensemble_roles(steps: list[str], backend: Callable[[str], str | None]) -> dict[str, str]:
    """An ensemble's steps by role: the ONNX Runtime step (the last, or the one before a
    post-processing step), the preprocessing step, and a post-processing step if there is one
    (build writes it with the same batcher settings, so tuning measures it with them too)."""
    onnx = [s for s in steps if backend(s) == "onnxruntime"]
    roles = {"onnx": (onnx or steps)[-1], "preprocessing": steps[0]}
    after = steps[steps.index(roles["onnx"]) + 1 :]
    if after:
        roles["postprocessing"] = after[0]
    return roles


def check_knobs(knobs: list[str]) -> None:
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise OptimizeError(f"unknown tuning knobs {unknown}; choose from {', '.join(KNOBS)}")


def _trial(
    knob: str,
    c: Candidate,
    cores: int,
    best: dict[str, int],
    in_flight: int,
    max_batch: int,
    items: int = 1,
) -> tuple[str, dict[str, int]] | None:
    """One change to try on top of the current best (None: it would change nothing).
    ``in_flight``: the items of every request in flight, ``items`` of each request."""
    split = max(1, cores // 2)
    if knob == "instances":
        threads = "torch_threads" if c.approach == "python" else "intra_op_threads"
        kind = "torch threads" if c.approach == "python" else "threads"
        return f"2 instances x {split} {kind}", {"instances": 2, threads: split}
    if knob == "spin" and c.approach == "ensemble":  # the other of the two
        if best["onnx_spin_within_run"]:
            return "ONNX Runtime's threads never spin", {"onnx_spin_within_run": 0}
        return "ONNX Runtime's threads spin within a request", {"onnx_spin_within_run": 1}
    if knob == "delay":
        if items >= max_batch:  # every request fills a batch: nothing is waited for
            return None
        return "batcher waits 2 ms for more requests", {"max_queue_delay_us": 2000}
    if knob == "batch":
        # The batcher already sends a full batch at once: a preferred size only matters
        # below max_batch_size.
        size = min(in_flight, max_batch) // best["instances"]
        size -= size % items  # whole requests: Triton never splits one between batches
        if not items <= size < max_batch:
            return None
        delay = best["max_queue_delay_us"] or 2000
        return (
            f"preferred batch of {size}, waiting up to {delay / 1000:g} ms for it",
            {"preferred_batch_size": size, "max_queue_delay_us": delay},
        )
    if knob == "preprocessing" and c.approach == "ensemble":
        return "2 preprocessing instances", {"preprocessing_instances": 2}
    if knob == "queue" and best["max_queue_size"]:
        # Triton 2.51 forms the next batch while an instance runs only for a queue without a
        # policy; with one, the batcher waits for a free instance first (README, Throughput).
        return (
            "unbounded queue: Triton forms the next batch while one runs (overload then "
            "waits instead of a 503)",
            {"max_queue_size": 0},
        )
    return None


def tune(
    url: str,
    http_url: str,
    admin_key: str | None,
    c: Candidate,
    target: bench.Target,
    examples: list[Any],
    options: OptimizeRun,
    cores: int,
    progress: Callable[[str], None],
) -> tuple[dict[str, int], list[Trial]]:
    """Greedy search from the built config: each change is measured in alternating pairs
    against the current best and kept when every pair gains and the median gain is at least
    3% (on a shared machine one pair alone swings by 10%)."""
    best = {
        "instances": 1,
        "preprocessing_instances": 1,
        "intra_op_threads": 0,
        "torch_threads": 0,
        # As built; "auto" is what the backend chooses on this machine.
        "onnx_spin_within_run": int(spins_within_run(options.options.onnx_spin)),
        "max_queue_delay_us": options.options.max_queue_delay_us,
        "preferred_batch_size": options.options.preferred_batch_size,
        "max_queue_size": options.options.queue_size(),
    }
    reloader = _Reloader(http_url, admin_key)
    models = {"python": target.model}
    if c.approach != "python":
        models = ensemble_roles(target.steps, lambda step: reloader.config(step).get("backend"))
    trials = []
    in_flight = options.concurrency * options.items
    max_batch = options.options.max_batch_size
    try:
        for knob in [k for k in KNOBS if k in options.tune]:
            step = _trial(knob, c, cores, best, in_flight, max_batch, options.items)
            if step is None:
                progress(f"tuning {c.key}: {knob}: nothing to try with {best}")
                continue
            change, delta = step
            trial = Trial(change, best | delta)
            for pair in range(options.rounds):
                progress(f"tuning {c.key}: {change}, pair {pair + 1}/{options.rounds}")
                measured = {}
                sides = [("new", trial.values), ("old", best)]
                if pair % 2:  # which side goes first alternates: neither always runs warm
                    sides.reverse()
                for side, values in sides:
                    reloader.apply(values, models)
                    measured[side] = _served(
                        url, target, options.concurrency, examples, options.settings
                    )
                if measured["new"].errors or measured["old"].errors:
                    raise OptimizeError(f"{target.model}: requests failed while tuning")
                trial.ratios.append(measured["new"].throughput / measured["old"].throughput)
                trial.served.append(measured["new"].throughput)
            trial.kept = min(trial.ratios) > 1.0 and statistics.median(trial.ratios) >= 1.03
            if trial.kept:
                best = trial.values
            trials.append(trial)
        reloader.apply(best, models)
    finally:
        reloader.close()
    return best, trials


def select_finalists(measured: list[Candidate], n: int) -> list[Candidate]:
    """The best ``n`` untuned candidates served, then the best ``n`` bare not among them.

    Served untuned, one instance, a small model's candidates rank within the noise (the
    request's path caps them all: all-MiniLM-L6-v2 on the AMX kind served 294-477 sentences/s
    for int8 ONNX Runtime in two rounds of one run), while bare throughput ranks what tuning
    (a second instance) can unlock: the variant that won tuned in one run was not among the
    best two untuned in the next."""

    def by(side: str) -> list[Candidate]:
        return sorted(measured, key=lambda c: c.median(getattr(c, side)), reverse=True)[:n]

    finalists = by("served")
    return finalists + [c for c in by("bare") if c not in finalists]


def _rotated(candidates: list[Candidate], round_: int) -> list[Candidate]:
    """``candidates`` starting at a different one each round: none always runs first."""
    shift = round_ % len(candidates)
    return candidates[shift:] + candidates[:shift]


def final_round(
    url: str,
    finalists: list[Candidate],
    by_key: dict[str, bench.Target],
    examples: list[Any],
    options: OptimizeRun,
    progress: Callable[[str], None],
) -> None:
    """Measure the tuned finalists served, in rounds that alternate them (the order rotates),
    into ``c.tuned_served``."""
    for round_ in range(options.rounds):
        for c in _rotated(finalists, round_):
            result = _served(url, by_key[c.key], options.concurrency, examples, options.settings)
            if result.errors:
                raise OptimizeError(f"{c.entry_model}: requests failed in the final round")
            c.tuned_served.append(result.throughput)
            progress(
                f"final round {round_ + 1}/{options.rounds}: {c.key} tuned, served "
                f"{result.throughput:.2f}/s"
            )


# -- the run ----------------------------------------------------------------------------------


def run(options: OptimizeRun, progress: Callable[[str], None] = log.info) -> OptimizeReport:
    from hf_triton.serve import Deployment, onnx_models
    from hf_triton.server import ServerConfig, free_port

    check_knobs(options.tune)  # before minutes of building, not after
    if not 1 <= options.items <= options.options.max_batch_size:
        raise OptimizeError(
            f"--items-per-request {options.items}: 1 to the built models' max_batch_size "
            f"({options.options.max_batch_size}; --max-batch-size raises it)"
        )
    if options.finalists < 1:
        raise OptimizeError(f"--finalists {options.finalists}: 1 or more candidates to tune")
    machine = hardware.detect()
    progress(f"machine: {machine.describe()}")
    ckpt = checkpoints.resolve(
        options.checkpoint, options.revision, allow_standin=options.allow_standin
    )
    progress(f"weights: {ckpt.describe()}")
    spec = ModelSpec.resolve(ckpt.path, task=options.task)
    if spec.image_text:
        raise OptimizeError(
            f"{options.checkpoint}: {spec.task.name}: optimize measures one model per "
            "variant, and an image-text model serves two towers and a zero-shot model; build "
            "the variants (hf-triton build --precision ..., gated) and measure their towers "
            "with hf-triton bench"
        )
    spec.check()
    plan = candidates(machine, options.candidates or None)
    root = options.workdir / "candidates"
    repositories: list[Path] = []
    fp32_onnx: Path | None = None
    for c in plan:
        if c.skipped:
            progress(f"{c.key}: skipped ({c.skipped})")
            continue
        progress(f"{c.key}: building and gating")
        repos, onnx = build_candidate(spec, c, root, fp32_onnx, gpu=bool(machine.gpu))
        if c.key == YARDSTICK:
            fp32_onnx = onnx
        progress(f"{c.key}: " + (f"REFUSED: {c.refused}" if c.refused else c.gate or "built"))
        repositories += repos
    built = [c for c in plan if c.entry_model]
    if not built:
        asked = [c for c in plan if not c.skipped.startswith("not asked")]
        reasons = "; ".join(f"{c.key}: {c.refused or c.skipped}" for c in asked)
        raise OptimizeError(f"no candidate was built ({reasons}); pass --candidates to choose")

    deployment = Deployment.prepare(
        None, repositories=repositories, workdir=options.workdir / "serve"
    )
    onnx_dirs = {
        d.name: d / "1" / "model.onnx"
        for repo in deployment.repositories
        for d in onnx_models(repo)
    }
    config = ServerConfig(
        [],
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        model_control="explicit",
    )
    server = deployment.server(config)
    progress(f"starting Triton with {len(built)} candidates (log: {server.log_path})")
    server.start()
    http_url = f"127.0.0.1:{config.http_port}"
    settings = options.settings
    url = f"127.0.0.1:{config.grpc_port}" if settings.protocol == "grpc" else http_url
    tuned: dict[str, int] = {}
    trials: list[Trial] = []
    winner = None
    try:
        server.wait_ready(600)
        targets = bench.discover(http_url, [c.entry_model for c in built], onnx_dirs.get)
        by_key = dict(zip([c.key for c in built], targets, strict=True))
        examples: list[Any] = (
            [bench.sample_image(settings)] if spec.modality == "image" else bench.sample_texts()
        )
        first = examples[0]
        bares = {}
        for c in built:
            target = by_key[c.key]
            bares[c.key] = bare = bench.Bare(target)
            c.check = bench.verify(
                http_url, target, _format(target), first, settings.jpeg_quality, bare
            )
            progress(f"{c.key}: served answer {c.check}")
        for round_ in range(options.rounds):
            for c in _rotated(built, round_):
                progress(f"round {round_ + 1}/{options.rounds}: {c.key}")
                _measure_round(url, c, by_key[c.key], bares[c.key], examples, options)
                progress(
                    f"  served {c.served[-1]:.2f}/s, bare {c.bare[-1]:.2f}/s; p50 at 1: "
                    f"{c.served_p50_ms[-1]:.1f} ms (bare {c.bare_p50_ms[-1]:.1f})"
                )
        measured = [c for c in built if c.measured]
        if not measured:
            raise OptimizeError("no candidate's served answer matched its bare runtime")
        winner = max(measured, key=lambda c: c.median(c.served))
        if options.tune:
            finalists = select_finalists(measured, options.finalists)
            progress(
                f"tuning {len(finalists)} finalists (the best {options.finalists} served and "
                f"the best {options.finalists} bare): {', '.join(c.key for c in finalists)}"
            )
            results = {}
            for c in finalists:  # each stays loaded in its tuned config
                results[c.key] = tune(
                    url,
                    http_url,
                    config.admin_key,
                    c,
                    by_key[c.key],
                    examples,
                    options,
                    machine.cores,
                    progress,
                )
                kept = [t.change for t in results[c.key][1] if t.kept]
                c.tuned_config = ", ".join(kept) or "as built"
            if len(finalists) > 1:
                final_round(url, finalists, by_key, examples, options, progress)
                winner = max(finalists, key=lambda c: c.median(c.tuned_served))
            tuned, trials = results[winner.key]
        progress(f"chosen: {winner.key}")
    finally:
        server.stop()
    out_repos = write_winner(spec, ckpt.name, winner, tuned, options, root)
    report = OptimizeReport(
        machine,
        ckpt.describe(),
        plan,
        winner,
        tuned,
        trials,
        options.out,
        out_repos,
        "img" if spec.modality == "image" else "sentence",
        options.load(),
    )
    save(report, options.out)
    return report


def write_winner(
    spec: ModelSpec,
    checkpoint: str,
    winner: Candidate,
    tuned: dict[str, int],
    options: OptimizeRun,
    root: Path,
) -> list[Path]:
    """The winner's repository under ``options.out``, with the user's names and the tuned
    config; its model.onnx is the gated one that was measured."""
    fields = {f.name for f in dataclasses.fields(options.options)}
    changes: dict[str, Any] = {k: v for k, v in tuned.items() if k in fields}
    if "onnx_spin_within_run" in tuned:  # measured here: written as chosen, not "auto"
        changes["onnx_spin"] = "within-run" if tuned["onnx_spin_within_run"] else "never"
    chosen = dataclasses.replace(
        options.options,
        precision=winner.precision,
        instance_kind=winner.instance_kind,
        torch_compile=winner.compiled,
        **changes,
    )
    spec = dataclasses.replace(spec, checkpoint=checkpoint)
    out = options.out
    for repo in ("python_model_repository", "ensemble_model_repository"):
        shutil.rmtree(out / repo, ignore_errors=True)
    try:
        result = build.build(spec, out, winner.approach, chosen, export_onnx=False)
    except precision.GateFailed as e:  # measured as passed; a second gate run cannot differ
        raise OptimizeError(str(e)) from e
    if winner.approach == "ensemble":
        target = out / "ensemble_model_repository" / chosen.name / "1" / "model.onnx"
        shutil.copy2(_onnx_of(root / winner.key, winner), target)
    return result.repositories


def save(report: OptimizeReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "optimize_report.md", "json": out / "optimize_report.json"}
    paths["md"].write_text(report.text() + "\n")
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    plotted = plot(report, out / "optimize_report.png")
    if plotted:
        paths["png"] = plotted
    return paths


def plot(report: OptimizeReport, path: Path) -> Path | None:
    """Served and bare throughput per candidate, relative to fp32 bare ONNX Runtime."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    measured = [c for c in report.candidates if c.served]
    base = report.yardstick() or 1.0
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(measured))
    sides = [("bare", "bare"), ("served", "served"), ("tuned_served", "served, tuned")]
    if not any(c.tuned_served for c in measured):
        sides.pop()
    width = 0.8 / len(sides)
    for i, (side, label) in enumerate(sides):
        heights = [c.median(getattr(c, side)) / base for c in measured]  # 0: not tuned
        offset = (i - (len(sides) - 1) / 2) * width
        ax.bar([x + offset for x in xs], heights, width, label=label)
    ax.set_xticks(list(xs), [c.key for c in measured], rotation=20)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("÷ fp32 bare ONNX Runtime")
    ax.set_title(f"{report.machine.kind}: chosen {report.winner.key if report.winner else '-'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
