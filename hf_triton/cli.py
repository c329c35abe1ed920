"""Command line: ``hf-triton serve|export|bench|soak`` (the shell scripts call these)."""

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


def _server_config(args: argparse.Namespace):
    """The tritonserver flags from the serve options (embedded and container alike)."""
    from hf_triton.server import ServerConfig  # noqa: PLC0415

    return ServerConfig(
        model_repositories=[],
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        admin_key=args.admin_key
        or os.environ.get("HF_TRITON_ADMIN_KEY")
        or secrets.token_urlsafe(24),
    )


def _serve(args: argparse.Namespace) -> int:
    from hf_triton.serve import Deployment, entry_models  # noqa: PLC0415
    from hf_triton.supervise import Supervisor  # noqa: PLC0415

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
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    key_file = server.workdir / "admin-key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.chmod(0o600)
    key_file.write_text(config.admin_key or "")
    print(f"Starting Triton (log: {server.log_path}) ...", flush=True)
    started = time.monotonic()
    server.start()
    try:
        server.wait_ready(args.ready_timeout_s)
        states = server.model_states()
        print(
            f"Ready in {time.monotonic() - started:.1f} s on {server.http_url} "
            f"(gRPC {config.host}:{config.grpc_port}, metrics {config.host}:{config.metrics_port})"
        )
        for name, state in sorted(states.items()):
            print(f"  {name:<16} {state}")
        print(
            f"Restricted APIs ({', '.join(config.restricted_apis)}) need the header "
            f"'admin-key: {config.admin_key}' (gRPC: 'triton-grpc-protocol-admin-key'; "
            f"saved in {key_file})"
        )
        print(
            "Try: python client.py --model_name ensemble_model   (Ctrl-C stops the server)",
            flush=True,
        )
        supervisor = Supervisor(
            server, entry_models(deployment.repositories), interval_s=args.probe_interval_s
        )
        if supervisor.interval_s > 0:
            print(
                f"Probing {', '.join(supervisor.models)} with a real inference every "
                f"{supervisor.interval_s:g} s; a dead model restarts the server.",
                flush=True,
            )
        next_probe = time.monotonic() + supervisor.interval_s
        while not stopping:
            time.sleep(0.5)
            if supervisor.interval_s > 0 and time.monotonic() >= next_probe:
                supervisor.step()
                next_probe = time.monotonic() + supervisor.interval_s
            elif not server.is_alive():
                if supervisor.interval_s <= 0:
                    print(server.logs()[-3000:], file=sys.stderr)
                    print("tritonserver exited unexpectedly (log above).", file=sys.stderr)
                    return 1
                supervisor.step()
        print("Stopping ...", flush=True)
        return 0
    finally:
        code = server.stop()
        if stopping:
            print(f"Stopped (exit code {code}).")


def _export(args: argparse.Namespace) -> int:
    from hf_triton import export  # noqa: PLC0415

    ckpt = checkpoints.resolve(args.checkpoint, args.revision, allow_standin=not args.no_standin)
    print(f"Weights: {ckpt.describe()}")
    report = export.export_onnx(ckpt.path, args.output, atol=args.atol)
    for name, diff in report.max_abs_diff.items():
        print(f"  {name}: max |onnx - torch| = {diff:.2e} (atol {report.atol:g})")
    print(f"Exported and validated: {args.output}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from hf_triton import bench  # noqa: PLC0415
    from hf_triton.serve import DEFAULT_REPOSITORIES, Deployment  # noqa: PLC0415
    from hf_triton.server import ServerConfig, free_port  # noqa: PLC0415

    settings = bench.BenchSettings(
        concurrency=args.concurrency,
        formats=args.formats,
        models=args.models,
        protocol=args.protocol,
        window_s=args.window_s,
        min_requests=args.min_requests,
        warmup_s=args.warmup_s,
        max_windows=args.max_windows,
        bare=not args.no_bare,
    )
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    image = bench.sample_image(settings)
    server = None
    variant_models: dict[str, str] = {}
    if args.url:
        ckpt = checkpoints.resolve(args.checkpoint, args.revision, allow_standin=False)
        onnx_path = args.onnx
        onnx_paths = {"fp32": onnx_path} if onnx_path else {}
        if any(p != "fp32" for p in args.precisions):
            print(
                "error: --precisions needs the benchmark's own server (no --url)", file=sys.stderr
            )
            return 2
    else:
        workdir = args.workdir or Path(".hf_triton/bench")
        ckpt = checkpoints.resolve(
            args.checkpoint, args.revision, allow_standin=not args.no_standin
        )
        repositories = args.model_repository or list(DEFAULT_REPOSITORIES)
        onnx_path = args.onnx or repositories[-1] / "vit" / "1" / "model.onnx"
        onnx_paths = {"fp32": onnx_path}
        # Reduced-precision variants: built (and gated) next to fp32, served by one server.
        sources = list(repositories)
        for prec in [p for p in args.precisions if p != "fp32"]:
            built = _build_variant(ckpt, prec, workdir / "variants", progress)
            if built is None:
                continue
            repos, models, variant_onnx = built
            sources += repos
            variant_models |= dict.fromkeys(models, prec)
            if variant_onnx:
                onnx_paths[prec] = variant_onnx
        deployment = Deployment.prepare(
            args.checkpoint,
            args.revision,
            repositories=sources,
            workdir=workdir,
            allow_standin=not args.no_standin,
        )
        settings.models = [*settings.models, *variant_models]
    results = []
    if settings.bare:
        if onnx_path is None:
            print(
                "error: with --url the bare runs need --onnx PATH (the served model.onnx), "
                "or pass --no-bare",
                file=sys.stderr,
            )
            return 2
        results += bench.bench_bare(
            onnx_paths,
            ckpt.path,
            image,
            settings,
            progress,
            torch_precisions=tuple(args.precisions),
        )
    preprocessing = bench.bench_preprocessing(
        DEFAULT_REPOSITORIES[0] / "python_vit" / "1" / "model.py", ckpt.path, image
    )
    url = args.url
    try:
        if not url:
            port = free_port()
            config = ServerConfig(
                [], http_port=free_port(), grpc_port=port, metrics_port=free_port()
            )
            server = deployment.server(config)
            progress(f"starting Triton (log: {server.log_path})")
            server.start()
            server.wait_ready(args.ready_timeout_s)
            url = f"127.0.0.1:{port}" if settings.protocol == "grpc" else server.http_url[7:]
        results += bench.bench_served(url, image, settings, progress, variant_models)
    finally:
        if server is not None:
            server.stop()
    machine = bench.machine_description()
    print(f"\nMachine: {machine['cpu']}, {machine['cores']} cores; weights: {ckpt.describe()}")
    print(bench.report(results, preprocessing))
    paths = bench.save(results, preprocessing, machine | {"weights": ckpt.describe()}, args.out)
    print("\nWrote " + ", ".join(str(p) for p in paths.values()))
    errors = sum(r.errors for r in results)
    if errors:
        print(f"error: {errors} requests failed", file=sys.stderr)
        return 1
    return 0


def _build_variant(ckpt, prec: str, root: Path, progress):
    """Build the ViT variant in ``prec`` (gated); None when the gate refuses it."""
    from hf_triton import build, precision  # noqa: PLC0415

    approach = "both" if prec in precision.ONNX_PRECISIONS else "python"
    options = build.BuildOptions(
        name=f"vit_{prec}",
        preprocessing_name=f"preprocessing_{prec}",
        ensemble_name=f"ensemble_model_{prec}",
        precision=prec,
    )
    out = root / prec
    progress(f"building the {prec} variant ({approach}) and its accuracy gate")
    try:
        result = build.build(ckpt.name, ckpt.path, out, approach=approach, options=options)
    except precision.GateFailed as e:
        progress(f"{prec} variant refused by the accuracy gate: {e}")
        return None
    for report in result.gates:
        progress(f"accuracy gate: {report.summary()}")
    models = result.entry_models
    onnx = out / "ensemble_model_repository" / options.name / "1" / "model.onnx"
    return result.repositories, models, onnx if onnx.exists() else None


def _soak(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415
    import tritonclient.http as httpclient  # noqa: PLC0415

    from hf_triton.soak import run_soak, shm_regions  # noqa: PLC0415

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48 + i, 64, 3), dtype=np.uint8) for i in range(16)]
    first: dict[int, np.ndarray] = {}
    local = threading.local()

    def send(i: int) -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(url=args.url, network_timeout=120)
        image = images[i % len(images)][None]
        tensor = httpclient.InferInput("image_uint8", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        return local.client.infer(args.model, [tensor]).as_numpy(args.output)

    def check(i: int, out: np.ndarray) -> bool:
        # Each image's first answer is its reference; any mix-up between requests shows.
        ref = first.setdefault(i % len(images), out)
        return out.shape[0] == 1 and bool(np.allclose(out, ref, atol=1e-4))

    def progress(message: str) -> None:
        print(message, flush=True)

    report = run_soak(
        send,
        check,
        args.requests,
        args.concurrency,
        args.server_pid,
        warmup=args.warmup,
        progress=progress,
    )
    print(report.summary())
    print(f"Triton shared-memory regions in /dev/shm now: {len(shm_regions())}")
    for error in report.errors[:5]:
        print(f"  {error}")
    bad = report.errors or report.wrong or report.not_exactly_once
    return 1 if bad else 0


def _inspect(args: argparse.Namespace) -> int:
    """Inputs and outputs of an ONNX file or of a served model (what Netron shows)."""
    rows: list[tuple[str, str, str, str]] = []
    if args.target.endswith(".onnx") or Path(args.target).is_file():
        import onnx  # noqa: PLC0415

        proto = onnx.load(args.target, load_external_data=False)
        graph = proto.graph
        initializers = {i.name for i in graph.initializer}

        def shape(vi) -> str:
            dims = vi.type.tensor_type.shape.dim
            return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"

        def dtype(vi) -> str:
            return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)

        rows += [
            ("input", i.name, dtype(i), shape(i)) for i in graph.input if i.name not in initializers
        ]
        rows += [("output", o.name, dtype(o), shape(o)) for o in graph.output]
        opsets = ", ".join(
            str(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")
        )
        meta = {p.key: p.value for p in proto.metadata_props}
        print(f"{args.target}: opset {opsets}; " + "; ".join(f"{k}={v}" for k, v in meta.items()))
    else:
        import tritonclient.http as httpclient  # noqa: PLC0415
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        client = httpclient.InferenceServerClient(url=args.url)
        try:
            meta = client.get_model_metadata(args.target)
            config = client.get_model_config(args.target)
        except (InferenceServerException, OSError) as e:
            print(f"error: cannot read model '{args.target}' at {args.url}: {e}", file=sys.stderr)
            return 1
        batch = int(config.get("max_batch_size", 0))
        optional = {i["name"] for i in config.get("input", []) if i.get("optional")}
        rows += [
            (
                "input" + (" (optional)" if i["name"] in optional else ""),
                i["name"],
                i["datatype"],
                str(i["shape"]),
            )
            for i in meta["inputs"]
        ]
        rows += [("output", o["name"], o["datatype"], str(o["shape"])) for o in meta["outputs"]]
        print(
            f"{args.target} at {args.url}: platform {meta.get('platform')}, "
            f"max_batch_size {batch} (-1 in shapes: variable; the first is the batch)"
        )
    for kind, name, dtype_, shape_ in rows:
        print(f"  {kind:<18} {name:<22} {dtype_:<8} {shape_}")
    return 0


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _serve_container(args: argparse.Namespace, checkpoint: str | None) -> int:
    from hf_triton import container  # noqa: PLC0415
    from hf_triton.serve import Deployment  # noqa: PLC0415

    workdir = (args.workdir or Path(".hf_triton")) / "container"
    deployment = Deployment.prepare(
        checkpoint,
        args.revision,
        repositories=args.model_repository or None,
        workdir=workdir,
        allow_standin=not args.no_standin,
        path_of=lambda c: container.container_checkpoint_path(c.name),
    )
    config = _server_config(args)
    plan = container.ContainerPlan(
        engine=args.container,
        repositories=deployment.repositories,
        checkpoints={
            container.container_checkpoint_path(c.name): c.path for c in deployment.weights
        },
        config=config,
        gpus=args.gpus,
    )
    print("Build: " + " ".join(plan.build_argv()))
    print("Run:   " + " ".join(plan.run_argv()))
    if args.dry_run:
        return 0
    plan.check_engine()
    subprocess.run(plan.build_argv(), check=True)
    return subprocess.run(plan.run_argv(), check=False).returncode


def _build(args: argparse.Namespace) -> int:
    from hf_triton import build  # noqa: PLC0415

    ckpt = checkpoints.resolve(args.model, args.revision, allow_standin=not args.no_standin)
    print(f"Weights: {ckpt.describe()}")
    options = build.BuildOptions(
        name=args.name,
        max_batch_size=args.max_batch_size,
        revision=args.revision or "",
        preprocessing_name=args.preprocessing_name,
        ensemble_name=args.ensemble_name,
        precision=args.precision,
    )
    result = build.build(
        args.model,
        ckpt.path,
        args.out,
        args.task,
        args.approach,
        options,
        export_onnx=not args.no_export,
    )
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
    for report in result.gates:
        print(f"  accuracy gate: {report.summary()}")
    if args.serve:
        args.checkpoint = None
        args.model_repository = result.repositories
        return _serve(args)
    serve_cmd = " ".join(f"--model-repository {r}" for r in result.repositories)
    print(f"Serve them: ./run_server.sh {serve_cmd}")
    return 0


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
        "text-classification",
    )
    bu.add_argument("--approach", choices=["python", "ensemble", "both"], default="both")
    bu.add_argument(
        "--name",
        default="vit",
        help="model name: python_NAME and NAME (the ONNX model); default: vit",
    )
    bu.add_argument("--preprocessing-name", default="preprocessing")
    bu.add_argument("--ensemble-name", default="ensemble_model")
    bu.add_argument("--out", type=Path, default=Path("."), help="where the repositories go")
    bu.add_argument("--max-batch-size", type=int, default=8)
    bu.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8", "fp16"],
        default="fp32",
        help="fp32 (reference); bf16: python approach; int8: both approaches; "
        "fp16: GPU, python approach. Non-fp32 variants must pass the accuracy gate",
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
    b = sub.add_parser("bench", help="measure bare compute and both served approaches")
    _add_checkpoint_args(b)
    b.add_argument(
        "--concurrency",
        type=_csv(int),
        default=[1, 4, 16],
        help="comma-separated (default: 1,4,16)",
    )
    b.add_argument("--formats", type=_csv(str), default=["fp32", "uint8", "jpeg"])
    b.add_argument("--models", type=_csv(str), default=["python_vit", "ensemble_model"])
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
    b.add_argument("--no-bare", action="store_true", help="skip bare ONNX Runtime / PyTorch")
    b.add_argument(
        "--precisions",
        type=_csv(str),
        default=["fp32"],
        help="e.g. fp32,bf16,int8: build (gated) and measure these variants, served "
        "and bare, next to fp32",
    )
    b.add_argument(
        "--url",
        default=None,
        help="benchmark a running server (host:port of --protocol) instead of "
        "starting one; needs --onnx for the bare runs",
    )
    b.add_argument("--onnx", type=Path, default=None, help="model.onnx for the bare run")
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
    sk.set_defaults(func=_soak)
    return parser


def _quiet_transformers() -> None:
    # Progress bars and advisory warnings (e.g. the PIL fallback of image processors)
    # drown what the launcher says; --verbose brings them back.
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_transformers()
    try:
        return int(args.func(args))
    except HfTritonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
