"""Command line: ``hf-triton serve|build|export|bench|soak|inspect``; the shell scripts call it.

Each command parses its arguments, makes one library call and prints what it returned.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hf_triton import checkpoints
from hf_triton.errors import HfTritonError
from hf_triton.server import ServerConfig


def _server_config(args: argparse.Namespace) -> ServerConfig:
    """The tritonserver flags from the serve options (embedded and container alike)."""
    return ServerConfig(
        model_repositories=[],
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        exit_timeout_s=args.exit_timeout_s,
        admin_key=args.admin_key
        or os.environ.get("HF_TRITON_ADMIN_KEY")
        or secrets.token_urlsafe(24),
    )


def _serve(args: argparse.Namespace) -> int:
    from hf_triton.serve import Deployment, entry_models
    from hf_triton.supervise import Supervisor

    checkpoint = args.checkpoint
    if checkpoint is None and not args.model_repository:
        checkpoint = checkpoints.DEFAULT_CHECKPOINT
    if args.container:
        return _serve_container(args, checkpoint)
    deployment = Deployment.prepare(
        checkpoint,
        args.revision,
        repositories=args.model_repository or None,
        workdir=args.workdir,
        allow_standin=not args.no_standin,
    )
    config = _server_config(args)
    server = deployment.server(config)
    key_file = server.write_admin_key()
    models = entry_models(deployment.repositories)
    supervisor = Supervisor(
        server,
        models,
        interval_s=args.probe_interval_s,
        max_restarts=args.max_restarts,
        on_event=_say,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()

    def ready() -> None:
        _say(
            f"Ready in {time.monotonic() - started:.1f} s on {server.http_url} "
            f"(gRPC {config.host}:{config.grpc_port}, metrics {config.host}:{config.metrics_port})"
        )
        for name, state in sorted(server.model_states().items()):
            _say(f"  {name:<16} {state}")
        _say(
            f"Restricted APIs ({', '.join(config.restricted_apis)}) need the header "
            f"'admin-key: <key in {key_file}>' (gRPC: 'triton-grpc-protocol-admin-key')"
        )
        _say(f"Try: python client.py --model_name {models[0]}   (Ctrl-C stops the server)")
        if supervisor.interval_s > 0:
            _say(
                f"Probing {', '.join(models)} with a real inference every "
                f"{supervisor.interval_s:g} s; a dead model restarts the server."
            )

    _say(f"Starting Triton (log: {server.log_path}) ...")
    supervisor.run(stop, args.ready_timeout_s, on_ready=ready)
    if stop.is_set():
        _say(f"Stopped (exit code {server.returncode}).")
        note = server.stop_note()
        if note:
            _say(note)
    return 0


def _export(args: argparse.Namespace) -> int:
    from hf_triton import export

    ckpt = checkpoints.resolve(args.checkpoint, args.revision, allow_standin=not args.no_standin)
    print(f"Weights: {ckpt.describe()}")
    report = export.export_onnx(ckpt.path, args.output, atol=args.atol)
    for name, diff in report.max_abs_diff.items():
        print(f"  {name}: max |onnx - torch| = {diff:.2e} (atol {report.atol:g})")
    print(f"Exported and validated: {args.output}")
    return 0


def _progress():
    """Progress lines stamped with the seconds since the command started."""
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    return progress


def _bench(args: argparse.Namespace) -> int:
    from hf_triton import bench

    options = bench.BenchRun(
        checkpoint=args.checkpoint,
        revision=args.revision,
        allow_standin=not args.no_standin,
        repositories=args.model_repository or [],
        workdir=args.workdir or Path(".hf_triton/bench"),
        url=args.url,
        http_url=args.http_url,
        onnx=dict(args.onnx),
        precisions=args.precisions,
        ready_timeout_s=args.ready_timeout_s,
        settings=bench.BenchSettings(
            concurrency=args.concurrency,
            formats=args.formats,
            models=args.models,
            protocol=args.protocol,
            window_s=args.window_s,
            min_requests=args.min_requests,
            warmup_s=args.warmup_s,
            max_windows=args.max_windows,
            bare=not args.no_bare,
            tax_rounds=args.tax_rounds,
            items_per_request=args.items_per_request,
        ),
    )
    result = bench.run(options, _progress())
    machine = result.machine
    print(
        f"\nMachine: {machine['cpu']}, {machine['cores']} cores, {machine['kind']}; "
        f"weights: {machine['weights']}; server environment: {machine['server_env']}"
    )
    print(result.text())
    paths = bench.save(result.results, result.preprocessing, machine, args.out, result.taxes)
    print("\nWrote " + ", ".join(str(p) for p in paths.values()))
    if result.errors or result.mismatches:
        print(
            f"error: {result.errors} requests failed, {len(result.mismatches)} served answers "
            "differ from the bare runtime's",
            file=sys.stderr,
        )
        return 1
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from hf_triton import build, optimize

    options = optimize.OptimizeRun(
        checkpoint=args.model,
        out=args.out,
        task=args.task,
        revision=args.revision,
        allow_standin=not args.no_standin,
        candidates=args.candidates,
        concurrency=args.concurrency,
        rounds=args.rounds,
        tune=[] if args.no_tune else args.tune,
        finalists=args.finalists,
        workdir=args.workdir,
        options=build.BuildOptions(
            name=args.name,
            preprocessing_name=args.preprocessing_name,
            ensemble_name=args.ensemble_name,
            max_batch_size=args.max_batch_size,
            revision=args.revision or "",
        ),
    )
    options.settings.window_s = args.window_s
    options.settings.items_per_request = args.items_per_request
    options.settings.warmup_s = min(options.settings.warmup_s, args.window_s)
    report = optimize.run(options, _progress())
    print("\n" + report.text())
    print(f"\nReport: {args.out / 'optimize_report.md'} (json, png beside it)")
    return 0


def _soak(args: argparse.Namespace) -> int:
    from hf_triton import soak

    if args.overload:
        load = soak.overload(
            args.url, args.model, args.overload, args.duration_s, args.server_pid, _say
        )
        print(load.summary())
        for error in load.other_errors[:5]:
            print(f"  {error}")
        return 1 if load.other_errors or load.wrong else 0
    report = soak.run(
        args.url,
        args.model,
        args.requests,
        args.concurrency,
        args.warmup,
        args.server_pid,
        progress=_say,
    )
    print(report.summary())
    print(f"Triton shared-memory regions in /dev/shm now: {len(soak.shm_regions())}")
    for error in report.errors[:5]:
        print(f"  {error}")
    bad = report.errors or report.wrong or report.not_exactly_once
    return 1 if bad else 0


def _inspect(args: argparse.Namespace) -> int:
    from hf_triton.describe import describe

    print(describe(args.target, args.url).text())
    return 0


def _onnx_arg(value: str) -> tuple[str, Path]:
    """``PATH`` (every ONNX step) or ``STEP=PATH`` (the ONNX step named STEP)."""
    step, sep, path = value.partition("=")
    if not sep:
        return "*", Path(value)
    if not step or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: PATH or STEP=PATH")
    return step, Path(path)


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _serve_container(args: argparse.Namespace, checkpoint: str | None) -> int:
    from hf_triton import container
    from hf_triton.serve import Deployment

    workdir = (args.workdir or Path(".hf_triton")) / "container"
    deployment = Deployment.prepare(
        checkpoint,
        args.revision,
        repositories=args.model_repository or None,
        workdir=workdir,
        allow_standin=not args.no_standin,
        path_of=lambda c: container.container_checkpoint_path(c.name),
    )
    plan = container.ContainerPlan(
        engine=args.container,
        repositories=deployment.repositories,
        checkpoints={
            container.container_checkpoint_path(c.name): c.path for c in deployment.weights
        },
        config=_server_config(args),
        gpus=args.gpus,
    )
    print("Build: " + " ".join(plan.build_argv()))
    print("Run:   " + " ".join(plan.run_argv(redact=True)))
    if args.dry_run:
        return 0
    plan.check_engine()
    subprocess.run(plan.build_argv(), check=True)
    return subprocess.run(plan.run_argv(), check=False).returncode


def _build(args: argparse.Namespace) -> int:
    from hf_triton import build
    from hf_triton.spec import ModelSpec

    ckpt = checkpoints.resolve(args.model, args.revision, allow_standin=not args.no_standin)
    print(f"Weights: {ckpt.describe()}")
    spec = ModelSpec.resolve(
        ckpt.path, args.task, checkpoint=args.model, max_length=args.max_length
    )
    options = build.BuildOptions(
        name=args.name,
        max_batch_size=args.max_batch_size,
        revision=args.revision or "",
        preprocessing_name=args.preprocessing_name,
        postprocessing_name=args.postprocessing_name,
        ensemble_name=args.ensemble_name,
        precision=args.precision,
        aggregation_strategy=args.aggregation_strategy,
        ignore_labels=tuple(x for x in args.ignore_labels.split(",") if x),
        threshold=args.threshold,
        top_k=args.top_k,
        max_queue_size=args.max_queue_size,
        queue_timeout_ms=args.queue_timeout_ms,
        max_queue_delay_us=args.max_queue_delay_us,
        onnx_spin=args.onnx_spin,
        torch_compile=args.torch_compile,
        preferred_batch_size=args.preferred_batch_size,
        instance_kind=args.instance_kind,
        instances=args.instances,
    )
    result = build.build(spec, args.out, args.approach, options, export_onnx=not args.no_export)
    print(f"Task: {result.task.name} ({result.task.description})")
    for repo in result.repositories:
        print(f"Wrote {repo}")
    print(f"Models: {', '.join(result.models)}")
    if result.validation:
        for name, diff in result.validation.max_abs_diff.items():
            print(
                f"  validated {name}: max |onnx - torch| = {diff:.2e} "
                f"(atol {result.validation.atol:g})"
            )
    if result.int8 is not None:
        print(f"  int8 model.onnx: {result.int8.describe()}")
    for report in result.gates:
        print(f"  accuracy gate: {report.summary()}")
    if args.serve:
        serve_args = argparse.Namespace(**vars(args))
        serve_args.checkpoint = None
        serve_args.model_repository = result.repositories
        return _serve(serve_args)
    serve_cmd = " ".join(f"--model-repository {r}" for r in result.repositories)
    print(f"Serve them: ./run_server.sh {serve_cmd}")
    return 0


def _conformance(args: argparse.Namespace) -> int:
    from hf_triton import conformance

    report = conformance.run(args.out, args.families or None, progress=_say, quick=args.quick)
    paths = report.save(args.out)
    print(report.summary_markdown())
    print(
        f"\n{len(report.rows)} rows in {report.seconds:.0f} s; wrote {paths['md']}, {paths['json']}"
    )
    if report.failures:
        print(f"error: {len(report.failures)} rows failed", file=sys.stderr)
        return 1
    return 0


def _say(message: str) -> None:
    """A progress line on stdout. Once stdout's reader has gone, nowhere: the command goes on (a
    server serves on), as with _Progress's lines."""
    try:
        print(message, flush=True)
    except BrokenPipeError:
        _stdout_to_devnull()


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=checkpoints.DEFAULT_CHECKPOINT,
        help="Hugging Face hub id or local directory (default: %(default)s)",
    )
    p.add_argument("--revision", default=None, help="pin a hub revision (commit sha or tag)")
    p.add_argument(
        "--no-standin",
        action="store_true",
        help="fail instead of using random-weight stand-in when the hub is unreachable",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="staged repositories, backends, logs, stand-in weights (default: .hf_triton)",
    )


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-repository",
        type=Path,
        action="append",
        help="repository to serve (repeatable; default: both of this project)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s; 0.0.0.0 exposes the server)",
    )
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument(
        "--probe-interval-s",
        type=float,
        default=30.0,
        help="real probe inference to each model this often; a dead model "
        "restarts the server (0 disables; default: %(default)s)",
    )
    p.add_argument(
        "--exit-timeout-s",
        type=int,
        default=30,
        help="on Ctrl-C or SIGTERM, how long Triton lets in-flight requests and open HTTP "
        "connections finish before it stops anyway (default: %(default)s)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts within 10 minutes after which the launcher gives up (default: %(default)s)",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        help="value of the 'admin-key' header that unlocks the model-repository, "
        "shared-memory, trace and logging APIs (default: $HF_TRITON_ADMIN_KEY, "
        "else a random key, printed)",
    )
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument(
        "--container",
        choices=["docker", "podman"],
        default=None,
        help="run NVIDIA's Triton container (deploy/Dockerfile) instead of the embedded server",
    )
    p.add_argument("--gpus", action="store_true", help="with --container: pass the GPUs in")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --container: print the build and run commands only",
    )


def build_parser() -> argparse.ArgumentParser:
    from hf_triton.build import ONNX_SPIN_MODES  # numpy, no torch: ~50 ms
    from hf_triton.optimize import KNOBS

    parser = argparse.ArgumentParser(prog="hf-triton", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model repositories on a real Triton server")
    _add_checkpoint_args(serve)
    serve.set_defaults(checkpoint=None)
    for action in serve._actions:
        if action.dest == "checkpoint":
            action.help = (
                "serve every model with this hub id or directory, exporting the ONNX models "
                f"from it (default: {checkpoints.DEFAULT_CHECKPOINT} for this project's "
                "repositories; each config's own checkpoint for --model-repository)"
            )
    _add_serve_args(serve)
    serve.set_defaults(func=_serve)

    bu = sub.add_parser("build", help="generate both repositories for a Hugging Face checkpoint")
    bu.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    bu.add_argument(
        "--task",
        default=None,
        help="default: from the checkpoint's architectures; one of "
        "image-feature-extraction, image-classification, text-feature-extraction, "
        "text-classification, token-classification, object-detection",
    )
    bu.add_argument("--approach", choices=["python", "ensemble", "both"], default="both")
    bu.add_argument(
        "--name",
        default="vit",
        help="model name: python_NAME and NAME (the ONNX model); default: vit",
    )
    bu.add_argument("--preprocessing-name", default="preprocessing")
    bu.add_argument(
        "--postprocessing-name",
        default="postprocessing",
        help="token classification: the ensemble's logits -> entities step",
    )
    bu.add_argument("--ensemble-name", default="ensemble_model")
    bu.add_argument(
        "--aggregation-strategy",
        choices=["none", "simple", "first", "average", "max"],
        default="simple",
        help="token classification: how tokens become entities, as transformers' pipeline "
        "(default: %(default)s; a request may pass its own as a parameter)",
    )
    bu.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="object detection: the score a detection needs (default: %(default)s, the "
        "pipeline's; a request may pass its own as a parameter)",
    )
    bu.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="object detection: keep the k best detections (default 0: all above threshold)",
    )
    bu.add_argument(
        "--ignore-labels",
        default="O",
        help="token classification: comma-separated labels never reported (default: O)",
    )
    bu.add_argument("--out", type=Path, default=Path("."), help="where the repositories go")
    bu.add_argument("--max-batch-size", type=int, default=8)
    bu.add_argument(
        "--max-queue-size",
        type=int,
        default=None,
        help="requests that may wait per model before more are refused with 503 "
        "(default: 2 x --max-batch-size; 0: unbounded and no queue timeout, which lets Triton "
        "prefetch the next batch: no 0.5 s late batches at saturation, README Throughput)",
    )
    bu.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="how long the batcher waits for more requests (default 0: CPU; try 1000-5000 "
        "on a GPU, where larger batches are nearly free)",
    )
    bu.add_argument(
        "--preferred-batch-size",
        type=int,
        default=0,
        help="with a delay: a batch of this size goes at once (e.g. the number of requests "
        "your clients keep in flight; default 0: none)",
    )
    bu.add_argument(
        "--onnx-spin",
        choices=ONNX_SPIN_MODES,
        default="auto",
        help="ONNX steps: what ONNX Runtime's threads do while they wait for work: spin "
        "between the operators of a request and sleep after it (within-run), or always sleep "
        "(never); default auto: the serving machine's backend chooses within-run where its "
        "CPU has AMX (faster for every model measured there) and never elsewhere; "
        "hf-triton optimize measures both",
    )
    bu.add_argument(
        "--onnx-spin-within-run",
        dest="onnx_spin",
        action="store_const",
        const="within-run",
        help="the same as --onnx-spin within-run",
    )
    bu.add_argument(
        "--torch-compile",
        action="store_true",
        help="Python pipelines (fp32, bf16; CPU): compile the PyTorch model with torch.compile "
        "while it loads (weights frozen; needs g++; loading takes ~30 s longer for a "
        "ViT-base); gated against eager fp32 like a precision",
    )
    bu.add_argument(
        "--queue-timeout-ms",
        type=int,
        default=10_000,
        help="a request that waited this long is refused (default: %(default)s)",
    )
    bu.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="text: tokens per text (default: the checkpoint's max_seq_length or positions)",
    )
    bu.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8", "fp16"],
        default="fp32",
        help="fp32 (reference); bf16: python approach; int8: both approaches; "
        "fp16: GPU, python approach. Non-fp32 variants must pass the accuracy gate",
    )
    bu.add_argument(
        "--instance-kind",
        choices=["KIND_CPU", "KIND_GPU"],
        default="KIND_CPU",
        help="where the Python pipeline runs (default: %(default)s); KIND_GPU moves the model "
        "to the instance's GPU (fp16 needs it). The ensemble's ONNX step stays KIND_CPU",
    )
    bu.add_argument(
        "--instances",
        type=int,
        default=1,
        help="instances of the model that computes (the Python pipeline or the ONNX step; "
        "Triton's instance_group count; default: %(default)s). On a CPU more instances share "
        "its cores (hf-triton optimize measures how many pay); on a GPU they overlap one "
        "request's CPU work with another's GPU work",
    )
    bu.add_argument("--no-export", action="store_true", help="skip model.onnx")
    bu.add_argument("--serve", action="store_true", help="serve the result right away")
    bu.add_argument("--revision", default=None)
    bu.add_argument("--no-standin", action="store_true")
    bu.add_argument("--workdir", type=Path, default=None)
    _add_serve_args(bu)
    bu.set_defaults(func=_build, checkpoint=None)

    exp = sub.add_parser("export", help="export a checkpoint to ONNX and validate it")
    _add_checkpoint_args(exp)
    exp.add_argument(
        "--output", type=Path, default=Path("ensemble_model_repository/vit/1/model.onnx")
    )
    exp.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="max abs difference allowed per output (default: %(default)s)",
    )
    exp.set_defaults(func=_export)
    b = sub.add_parser("bench", help="measure every served model next to its bare runtime")
    _add_checkpoint_args(b)
    b.set_defaults(checkpoint=None)  # the tutorial's, unless --model-repository names others
    b.add_argument(
        "--concurrency",
        type=_csv(int),
        default=[1, 4, 16],
        help="comma-separated (default: 1,4,16)",
    )
    b.add_argument(
        "--formats",
        type=_csv(str),
        default=["fp32", "uint8", "jpeg", "text"],
        help="image formats fp32,uint8,jpeg and/or text (each model takes what it can)",
    )
    b.add_argument(
        "--models",
        type=_csv(str),
        default=[],
        help="entry models to measure (default: every model that is not an ensemble step)",
    )
    b.add_argument(
        "--tax-rounds",
        type=int,
        default=3,
        help="rounds alternating bare and served windows for the serving tax (0: skip)",
    )
    b.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    b.add_argument("--window-s", type=float, default=4.0, help="measurement window")
    b.add_argument(
        "--min-requests",
        type=int,
        default=20,
        help="a window lasts until this many requests completed (max 30 s)",
    )
    b.add_argument("--warmup-s", type=float, default=2.0)
    b.add_argument(
        "--max-windows",
        type=int,
        default=8,
        help="give up on stability (3 windows within 10%%) after this many",
    )
    b.add_argument(
        "--items-per-request",
        type=int,
        default=1,
        help="images or sentences each request carries, as a client that batches sends "
        "them (at most the model's max_batch_size; default: %(default)s)",
    )
    b.add_argument("--no-bare", action="store_true", help="skip bare ONNX Runtime / PyTorch")
    b.add_argument(
        "--precisions",
        type=_csv(str),
        default=["fp32"],
        help="e.g. fp32,bf16,int8,bf16+compile: build (gated) and measure these variants, "
        "served and bare, next to fp32 (+compile: the Python pipeline compiled by "
        "torch.compile, as build --torch-compile, against bare PyTorch compiled alike)",
    )
    b.add_argument(
        "--url",
        default=None,
        help="benchmark a running server (host:port of --protocol) instead of "
        "starting one; needs --onnx for the bare runs",
    )
    b.add_argument(
        "--onnx",
        type=_onnx_arg,
        action="append",
        default=[],
        metavar="[STEP=]PATH",
        help="with --url: model.onnx for the bare runs, of every ensemble's ONNX step, or of the "
        "step named STEP (repeat for several ensembles)",
    )
    b.add_argument(
        "--http-url",
        default=None,
        help="with --url over gRPC: the server's HTTP host:port (statistics, answer checks)",
    )
    b.add_argument(
        "--model-repository",
        type=Path,
        action="append",
        help="python and ensemble repositories to serve (default: this project's; "
        "the ensemble one last)",
    )
    b.add_argument("--out", type=Path, default=Path("bench_results"))
    b.add_argument("--ready-timeout-s", type=float, default=600.0)
    b.set_defaults(func=_bench)
    op = sub.add_parser(
        "optimize",
        help="build every variant this machine can run, gate and measure them served, tune the "
        "fastest, write its repository",
    )
    op.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    op.add_argument("--task", default=None, help="default: from the checkpoint")
    op.add_argument("--out", type=Path, default=Path("optimized"), help="the winner's repository")
    op.add_argument(
        "--candidates",
        type=_csv(str),
        default=[],
        help="comma-separated subset of fp32-onnxruntime, fused-onnxruntime, int8-onnxruntime, "
        "fp32-pytorch, fp32-pytorch-compiled, int8-pytorch, bf16-pytorch, "
        "bf16-pytorch-compiled, fp16-pytorch (default: all this machine can run)",
    )
    op.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="loaded setting: served concurrency and bare batch (default: %(default)s)",
    )
    op.add_argument(
        "--items-per-request",
        type=int,
        default=1,
        help="images or sentences each request carries, as clients that batch send them; the "
        "bare batch is every request in flight's items, up to --max-batch-size "
        "(default: %(default)s)",
    )
    op.add_argument("--rounds", type=int, default=2, help="alternating rounds (medians)")
    op.add_argument("--window-s", type=float, default=3.0, help="seconds per measurement")
    op.add_argument(
        "--tune",
        type=_csv(str),
        default=list(KNOBS),
        help="knobs to search for the winner, in this order: instances (ONNX Runtime or "
        "PyTorch threads split between them), spin (ONNX Runtime's threads spin within a "
        "request), delay (the batcher's), batch (a preferred batch size: what each instance "
        "gets when every client has a request in flight), preprocessing (the ensemble's "
        "instances), queue (no queue bound, so Triton forms the next batch while one runs; "
        "overload then waits instead of getting 503); default: all",
    )
    op.add_argument("--no-tune", action="store_true", help="keep the built Triton config")
    op.add_argument(
        "--finalists",
        type=int,
        default=2,
        help="tune the best this many candidates served and the best this many bare, then "
        "choose among them tuned (default: %(default)s)",
    )
    op.add_argument("--name", default="model", help="model name in the written repository")
    op.add_argument("--preprocessing-name", default="preprocessing")
    op.add_argument("--ensemble-name", default="ensemble_model")
    op.add_argument("--max-batch-size", type=int, default=8)
    op.add_argument("--revision", default=None)
    op.add_argument("--no-standin", action="store_true")
    op.add_argument("--workdir", type=Path, default=Path(".hf_triton/optimize"))
    op.set_defaults(func=_optimize)
    co = sub.add_parser(
        "conformance",
        help="build, serve and check every model family both ways against independent references",
    )
    co.add_argument("--out", type=Path, default=Path(".hf_triton/conformance"))
    co.add_argument(
        "--families",
        type=_csv(str),
        default=[],
        help="comma-separated subset (default: all; 'minilm' for the real all-MiniLM-L6-v2)",
    )
    co.add_argument(
        "--quick",
        action="store_true",
        help="what the tests run: classification for one family per kind of head, most "
        "families' features through the ensemble only, no detection, no real MiniLM (the "
        "tests' own text server judges those two)",
    )
    co.set_defaults(func=_conformance)
    ins = sub.add_parser("inspect", help="inputs/outputs of model.onnx or of a served model")
    ins.add_argument("target", help="path to a .onnx file, or a model name on --url")
    ins.add_argument("--url", default="127.0.0.1:8000", help="Triton HTTP host:port")
    ins.set_defaults(func=_inspect)

    sk = sub.add_parser("soak", help="bounded soak of a running server (exactly-once, memory)")
    sk.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port")
    sk.add_argument("--model", default="ensemble_model")
    sk.add_argument("--output", default="pooler_output")
    sk.add_argument("-n", "--requests", type=int, default=1000)
    sk.add_argument("-c", "--concurrency", type=int, default=8)
    sk.add_argument("--warmup", type=int, default=50)
    sk.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="tritonserver pid: report resident memory of it and its stubs",
    )
    sk.add_argument(
        "--overload",
        type=float,
        default=0.0,
        metavar="FACTOR",
        help="instead: measure capacity, then offer FACTOR x it open-loop for --duration-s "
        "(refusals must be fast 503s; accepted answers checked)",
    )
    sk.add_argument("--duration-s", type=float, default=60.0)
    sk.set_defaults(func=_soak)
    return parser


def _quiet_transformers() -> None:
    # Progress bars and advisory warnings (e.g. the PIL fallback of image processors)
    # drown what the launcher says; --verbose brings them back.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _Progress(logging.StreamHandler):
    """Progress lines on stdout. Once stdout's reader has gone (`hf-triton serve | head`, a log
    shipper that stopped), stdout becomes /dev/null and the command goes on: a server serves on,
    and the `finally` blocks that stop servers are never interrupted by a line they log. Not
    logging's traceback for every line that follows. (A print that meets the closed pipe first
    stops the command instead: main, SIGPIPE's status.)"""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _stdout_to_devnull()
            return
        super().handleError(record)


def _stdout_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _configure_logging(verbose: bool) -> None:
    """The package's INFO messages are the launcher's progress: plain lines on stdout."""
    console = _Progress(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("hf_triton")
    package.addHandler(console)
    package.setLevel(logging.DEBUG if verbose else logging.INFO)
    package.propagate = False
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as Ctrl-C raises KeyboardInterrupt."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    if not args.verbose:
        _quiet_transformers()
    # Commands that start a server (conformance, bench, optimize) stop it in `finally`
    # blocks, which also remove its /dev/shm regions; SIGTERM (a cancelled CI job, `timeout`,
    # `kill`) must run them as Ctrl-C does, not end the process where it stands. `serve`
    # replaces this with its own handlers (stop and unload, then exit 0).
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that left shows here, not as a traceback at exit
        return code
    except HfTritonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("Stopped by SIGTERM.", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        return _reader_left()


def _reader_left() -> int:
    """stdout's reader went away (`hf-triton inspect ... | head`): stop quietly, as Unix tools
    do; the command's `finally` blocks (servers it started) have run."""
    _stdout_to_devnull()  # what is left to flush at exit goes nowhere
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
