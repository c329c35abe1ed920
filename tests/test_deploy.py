"""Beyond one machine, checked statically: container command, Dockerfile, Kubernetes, KServe.

No container engine or cluster runs here; these tests keep the artefacts valid and
consistent with the launcher (image tag, ports, probes, tritonserver flags, pins).
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import tomllib
import yaml

from hf_triton import container
from hf_triton.serve import PROJECT_ROOT, SERVER_ENV
from hf_triton.server import ServerConfig

from helpers import run_cli

DEPLOY = PROJECT_ROOT / "deploy"
K8S_VERSION = "1.30.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in _docs(path)}


def test_dockerfile_pins_match_pyproject():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+?)\"?$",
            "\n".join(d.split("#")[0].strip() for d in project["dependencies"]),
            re.M,
        )
    )
    docker = container.dockerfile_pins()
    assert set(docker) == {"torch", "transformers", "pillow", "numpy"}
    for package, version in docker.items():
        assert pins[package] == version, package
    text = container.DOCKERFILE.read_text()
    assert f"ARG TRITON_IMAGE={container.TRITON_IMAGE}" in text
    assert "USER triton-server" in text


def _plan(tmp_path, gpus=False, engine="docker"):
    repos = [tmp_path / "python_model_repository", tmp_path / "ensemble_model_repository"]
    return container.ContainerPlan(
        engine=engine,
        repositories=repos,
        checkpoints={"/checkpoints/google--vit": tmp_path / "ckpt"},
        config=ServerConfig([], admin_key="k"),
        gpus=gpus,
    )


def test_container_run_command(tmp_path):
    argv = _plan(tmp_path, gpus=True).run_argv()
    joined = " ".join(argv)
    assert argv[:3] == ["docker", "run", "--rm"]
    assert f"--shm-size={container.SHM_SIZE}" in argv and "--gpus=all" in argv
    for port in (8000, 8001, 8002):
        assert f"127.0.0.1:{port}:{port}" in argv  # published on loopback only
    assert f"{tmp_path}/python_model_repository:/models/python_model_repository:ro" in joined
    assert f"{tmp_path}/ckpt:/checkpoints/google--vit:ro" in joined
    image = argv.index(container.IMAGE)
    server_args = argv[image + 1 :]
    assert server_args[0] == "tritonserver"
    assert "--model-repository=/models/ensemble_model_repository" in server_args
    assert "--model-control-mode=none" in server_args
    assert not any(a.startswith("--backend-directory") for a in server_args)
    assert any(a.startswith("--http-restricted-api=") for a in server_args)


def test_podman_gpu_flag(tmp_path):
    assert "--device=nvidia.com/gpu=all" in _plan(tmp_path, gpus=True, engine="podman").run_argv()


def test_container_mode_without_engine_says_so(tmp_path, tiny_checkpoint):
    run = run_cli(
        "serve",
        "--container",
        "docker",
        "--checkpoint",
        str(tiny_checkpoint),
        "--workdir",
        str(tmp_path),
        timeout=300,
        env={"PATH": "/nonexistent", "HOME": str(tmp_path)},
    )
    assert run.returncode == 1
    assert "'docker' is not installed" in run.stderr


@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler"])
def test_kubernetes_manifests_validate(kind):
    doc = _by_kind(DEPLOY / "kubernetes" / "triton.yaml")[kind]
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_consistent_with_launcher():
    docs = _by_kind(DEPLOY / "kubernetes" / "triton.yaml")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["image"].endswith("/" + container.IMAGE)
    defaults = ServerConfig([])
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {
        "http": defaults.http_port,
        "grpc": defaults.grpc_port,
        "metrics": defaults.metrics_port,
    }
    service = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert service == ports
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Liveness is a real inference (a dead stub leaves /v2/health/live green).
    probe = triton["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["python3", "/opt/hf_triton/probe.py"] and "ensemble_model" in probe
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and {"/dev/shm", "/tmp"} <= set(mounts)


def _portable_flags() -> set[str]:
    """The launcher's tritonserver flags that every deployment must carry too (addresses,
    ports, paths and the per-launch shared-memory prefix are each deployment's own)."""
    argv = ServerConfig([], admin_key="$(ADMIN_KEY)").argv(Path("tritonserver"), Path("b"))
    own = ("--model-repository=", "--backend-directory=", "--http-", "--grpc-address")
    own += ("--grpc-port", "--metrics-", "--backend-config=python,shm-region-prefix-name=")
    return {a for a in argv[1:] if not a.startswith(own) or "restricted" in a}


def _manifest_containers() -> dict[str, dict]:
    k8s = _by_kind(DEPLOY / "kubernetes" / "triton.yaml")["Deployment"]
    kserve = _by_kind(DEPLOY / "kserve" / "inferenceservice.yaml")["ServingRuntime"]
    return {
        "kubernetes": k8s["spec"]["template"]["spec"]["containers"][0],
        "kserve": kserve["spec"]["containers"][0],
    }


@pytest.mark.parametrize("where", ["kubernetes", "kserve"])
def test_deployments_carry_the_launchers_flags(where):
    container_spec = _manifest_containers()[where]
    args = container_spec["args"]
    missing = _portable_flags() - set(args)
    assert not missing, f"{where} lacks the launcher's {sorted(missing)}"
    assert "--backend-config=python,shm-region-prefix-name=hf_triton_" in args
    env = {e["name"]: e.get("value") for e in container_spec["env"]}
    assert env.keys() >= {"ADMIN_KEY", "HF_HUB_OFFLINE"}
    for name, value in SERVER_ENV.items():  # the environment the launcher gives the server
        assert env.get(name) == value, f"{where} lacks {name}={value}"
    assert "/opt/hf_triton/probe.py" in container_spec["livenessProbe"]["exec"]["command"]


@pytest.mark.parametrize("where", ["kubernetes", "kserve"])
def test_deployments_are_hardened(where):
    context = _manifest_containers()[where]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    if where == "kubernetes":
        pod = _by_kind(DEPLOY / "kubernetes" / "triton.yaml")["Deployment"]["spec"]["template"]
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        pre_stop = _manifest_containers()[where]["lifecycle"]["preStop"]["exec"]["command"]
        drain = ServerConfig([]).exit_timeout_s + int(pre_stop[-1])
        assert spec["terminationGracePeriodSeconds"] > drain
    else:
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_image_and_readme_agree_on_hub_access():
    """The image leaves hub access to the deployment (the README's `docker run` of the source
    repositories downloads the hub id); the launcher and the manifests turn it off."""
    text = container.DOCKERFILE.read_text()
    assert "HF_HUB_OFFLINE" not in text.split("USER triton-server")[1]
    for name, value in SERVER_ENV.items():
        assert f"{name}={value}" in text.split("USER triton-server")[1]
    assert "COPY hf_triton/probe.py /opt/hf_triton/probe.py" in text
    ignore = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert ignore[-2:] == ["*", "!hf_triton/probe.py"]
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "-p 127.0.0.1:8000:8000" in readme and "--http-restricted-api=" in readme


def test_dry_run_does_not_print_the_admin_key(tmp_path, tiny_checkpoint):
    run = run_cli(
        "serve",
        "--container",
        "docker",
        "--dry-run",
        "--admin-key",
        "do-not-print-me",
        "--checkpoint",
        str(tiny_checkpoint),
        "--workdir",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stderr
    assert "do-not-print-me" not in run.stdout + run.stderr
    assert "admin-key=$HF_TRITON_ADMIN_KEY" in run.stdout
    assert "--read-only" in run.stdout and "--cap-drop=ALL" in run.stdout


def test_kserve_resources_are_well_formed():
    """No KServe SDK here (it pins protobuf 6, tritonclient's stack 5): check the fields
    of serving.kserve.io v1beta1 InferenceService / v1alpha1 ServingRuntime we rely on."""
    docs = _by_kind(DEPLOY / "kserve" / "inferenceservice.yaml")
    runtime, isvc = docs["ServingRuntime"], docs["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["storageUri"].startswith(("s3://", "gs://", "pvc://"))
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "triton" in formats
    (server,) = runtime["spec"]["containers"]
    assert server["name"] == "kserve-container"
    assert server["image"].endswith("/" + container.IMAGE)
    assert "--model-repository=/mnt/models" in server["args"]
    assert "--model-control-mode=none" in server["args"]
