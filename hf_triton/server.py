"""Run the real Triton Inference Server bundled in the ``nvidia-pytriton`` wheel.

One job: find the server binary, its libraries and the Python-backend stub for
*this* interpreter, assemble a backend directory (python backend + the
Python-based ``onnxruntime`` backend shipped in this package), build the argv
from known flags, start the process, wait until it is ready, and stop it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hf_triton.errors import HfTritonError

log = logging.getLogger(__name__)

PACKAGE_BACKENDS = Path(__file__).parent / "backends"


class ServerError(HfTritonError):
    """The server could not be found, started or reached."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the bundled Triton server live."""

    server: Path
    libs: Path
    python_backend: Path
    stub: Path

    @classmethod
    def locate(cls) -> TritonDistribution:
        """Find the server in the installed ``nvidia-pytriton`` wheel."""
        # Found, not imported: pytriton's own client (zmq, its numpy pin) is not needed to run
        # the server binary, and importing it costs start-up time.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServerError(
                "The Triton server binary comes from the 'nvidia-pytriton' wheel, which is "
                "not installed in this environment. Run ./run_server.sh (it creates .venv) "
                "or `pip install -e .`."
            )
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            server=root / "bin" / "tritonserver",
            libs=root.parent.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for what, path in (
            ("tritonserver binary", dist.server),
            ("shared libraries", dist.libs),
            ("python backend", dist.python_backend / "libtriton_python.so"),
            (f"python backend stub for Python {version}", dist.stub),
        ):
            if not path.exists():
                raise ServerError(f"Missing {what}: {path} (reinstall nvidia-pytriton==0.7.0)")
        log.debug("Triton server: %s", dist.server)
        return dist

    def library_path(self, user: str | None = None) -> str:
        """``LD_LIBRARY_PATH`` for the server and its stubs: the wheel's libraries, the user's
        path, then this interpreter's own library directory when it holds its shared libpython
        (e.g. a uv- or pyenv-built Python outside the system's library path)."""
        user = os.environ.get("LD_LIBRARY_PATH", "") if user is None else user
        parts = [str(self.libs), user]
        own = _own_libpython()
        if own is not None and own.exists():
            parts.append(str(own.parent))
        return os.pathsep.join(p for p in parts if p)

    def check_libpython(self) -> None:
        """Fail plainly when the stub would load a different libpython than this interpreter.

        The stub links the system's shared ``libpython3.X.so.1.0``. A venv made from
        another build of the same minor version (e.g. pyenv) loads numpy but breaks
        on ``ssl`` inside the model with ``undefined symbol`` errors.
        """
        env = dict(os.environ, LD_LIBRARY_PATH=self.library_path())
        out = subprocess.run(
            ["ldd", str(self.stub)], capture_output=True, text=True, env=env, check=False
        ).stdout
        match = re.search(r"(libpython3\.\d+\S*)\s+=>\s+(\S+)", out)
        soname = (
            match.group(1) if match else f"libpython{sys.version_info[0]}.{sys.version_info[1]}"
        )
        fix = (
            f"Create the venv with the system interpreter that owns {soname}, e.g. "
            f"`rm -rf .venv && /usr/bin/python3.{sys.version_info[1]} -m venv .venv`, "
            f"or install it: `apt-get install libpython3.{sys.version_info[1]}`."
        )
        if not match or match.group(2) == "not":
            raise ServerError(f"The Python-backend stub needs {soname}, which was not found. {fix}")
        stub_lib = Path(match.group(2)).resolve()
        own = _own_libpython()
        own_lib = own.resolve() if own is not None else None
        if own_lib is None or not own_lib.exists() or own_lib != stub_lib:
            raise ServerError(
                f"libpython mismatch: this interpreter is {sys.executable} "
                f"(Python {sys.version.split()[0]}, shared library: {own_lib or 'none, static'}), "
                f"but the Triton Python-backend stub loads {stub_lib}. Models importing "
                f"transformers would fail with 'undefined symbol'. {fix}"
            )


def _own_libpython() -> Path | None:
    """Where this interpreter's shared libpython would be (LIBDIR/INSTSONAME), if it names one."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    return Path(libdir, soname) if libdir and soname else None


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def assemble_backends(workdir: Path, dist: TritonDistribution) -> Path:
    """Build ``workdir/backends``: the python backend and the Python-based onnxruntime one."""
    backends = workdir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    # Copies, not symlinks: Triton refuses backend files whose real path escapes the
    # backend directory.
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy(dist.python_backend / name, python_dir / name)
    _copy(dist.stub, python_dir / "triton_python_backend_stub")
    for backend in PACKAGE_BACKENDS.iterdir():
        if (backend / "model.py").exists():
            (backends / backend.name).mkdir(exist_ok=True)
            _copy(backend / "model.py", backends / backend.name / "model.py")
    return backends


def _copy(src: Path, dst: Path) -> None:
    if dst.is_symlink():
        dst.unlink()
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return
    shutil.copy2(src, dst)


#: APIs that change what the server runs or reads/writes files or memory: locked by default.
#: (Loading models from the repository runs their code; trace settings choose a file path.)
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "admin-key"


@dataclass
class ServerConfig:
    """The flags we pass to ``tritonserver``; everything else keeps Triton's default."""

    model_repositories: list[Path]
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    default_max_batch_size: int = 8
    exit_timeout_s: int = 30
    log_verbose: int = 0
    #: Header value required by the restricted APIs (header name ``admin-key``); a random
    #: one by default. None leaves every API open.
    admin_key: str | None = field(default_factory=lambda: secrets.token_urlsafe(24))
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS
    #: Names this server's shared-memory regions in /dev/shm, so what a killed server leaves
    #: behind can be found and removed (Triton's default names carry no owner).
    shm_prefix: str = field(default_factory=lambda: f"hf_triton_{secrets.token_hex(4)}_")
    #: "none" serves what the repositories hold, fixed. "explicit" (``hf-triton optimize``)
    #: loads them all at start and lets the admin key reload a model with another config.
    model_control: str = "none"

    def check(self) -> None:
        """Refuse settings Triton 2.51 would accept and then not honour."""
        if self.exit_timeout_s < 0:
            raise ServerError(f"--exit-timeout-s {self.exit_timeout_s}: 0 or more seconds")
        if self.model_control not in ("none", "explicit"):
            raise ServerError(f"model_control is 'none' or 'explicit', not {self.model_control!r}")
        if ":" in self.host:
            raise ServerError(
                f"--host {self.host}: Triton 2.51 serves HTTP and metrics on IPv4 only (given an "
                "IPv6 address it binds nothing reachable); use 127.0.0.1 (loopback, the default) "
                "or 0.0.0.0 (every interface)"
            )

    @property
    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    def argv(self, server: Path, backends: Path) -> list[str]:
        args = [str(server)]
        args += [f"--model-repository={p}" for p in self.model_repositories]
        args += [
            f"--backend-directory={backends}",
            # The Python-based onnxruntime backend reads this flag back, as the native one does.
            f"--backend-config=default-max-batch-size={self.default_max_batch_size}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            *(["--load-model=*"] if self.model_control == "explicit" else []),
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.admin_key and self.restricted_apis:
            rule = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
            args += [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
        return args


SHM_DIR = Path("/dev/shm")


def process_running(pid: int) -> bool:
    """Whether process ``pid`` is there and not a zombie (one that has ended, not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _prepare_child() -> None:
    """Run in the forked child before tritonserver starts."""
    # tritonserver installs its SIGINT/SIGTERM handlers only once its models have loaded; until
    # then the inherited disposition decides. A launcher started in the background by a
    # non-interactive shell inherits SIGINT *ignored*, so a stop during loading was lost and
    # the stop waited out its whole grace period. The default ends the server at once instead.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    # PR_SET_PDEATHSIG: the server gets SIGTERM if the launcher dies, so no orphan keeps the ports.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class TritonServer:
    """A ``tritonserver`` child process: start, wait until ready, stop.

    Usable as a context manager; the process is always stopped on exit.
    """

    def __init__(
        self,
        config: ServerConfig,
        workdir: Path,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.config = config
        self.workdir = Path(workdir)
        self.extra_env = dict(env or {})
        self.log_path = log_path or self.workdir / "tritonserver.log"
        self.dist = TritonDistribution.locate()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.config.http_port}"

    def start(self) -> None:
        self.config.check()
        self.dist.check_libpython()
        for name in ("http", "grpc", "metrics"):
            port = getattr(self.config, f"{name}_port")
            if port_in_use(self.config.host, port):
                raise ServerError(
                    f"Port {port} ({name}) on {self.config.host} is already in use - is another "
                    f"server running? Stop it or choose another port (--{name}-port)."
                )
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = assemble_backends(self.workdir, self.dist)
        env = {**os.environ, **self.extra_env}
        env["LD_LIBRARY_PATH"] = self.dist.library_path(env.get("LD_LIBRARY_PATH", ""))
        # The stub runs `python` models with this venv's packages: its bin/ goes first.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        argv = self.config.argv(self.dist.server, backends)
        key = self.config.admin_key
        log.debug("Starting %s", " ".join(argv).replace(key, "<admin key>") if key else argv)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        log_file.write(f"==== hf-triton: starting tritonserver at {time.ctime()}\n".encode())
        log_file.flush()
        self._proc = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            preexec_fn=_prepare_child,
        )
        log_file.close()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def logs(self) -> str:
        """The log of the current (latest) start."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[text.rfind("==== hf-triton: starting") :]

    def wait_ready(self, timeout_s: float = 600.0, stop: threading.Event | None = None) -> bool:
        """Poll ``/v2/health/ready`` until 200 (True), ``stop`` is set (False), the process
        dies or the deadline passes (:class:`ServerError` naming each model that failed)."""
        deadline = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            if not self.is_alive():
                raise ServerError(self._failure_report("exited during start-up"))
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerError(self._failure_report(f"was not ready after {timeout_s:.0f} s"))

    def _failure_report(self, what: str) -> str:
        text = self.logs()
        failures = model_load_failures(text)
        lines = [f"tritonserver {what} (log: {self.log_path})."]
        if failures:
            lines.append("Models that failed to load:")
            lines += [f"  {name}: {reason}" for name, reason in failures.items()]
        else:
            tail = "\n".join(text.strip().splitlines()[-25:])
            lines.append(f"Last log lines:\n{tail}")
        return "\n".join(lines)

    def model_states(self) -> dict[str, str]:
        """Model name -> state, from the repository index (needs the model-repository API)."""
        req = urllib.request.Request(
            f"{self.http_url}/v2/repository/index", data=b"{}", method="POST"
        )
        for key, value in self.config.admin_headers.items():
            req.add_header(key, value)
        with urllib.request.urlopen(req, timeout=5) as r:
            return {m["name"]: m.get("state", "") for m in json.load(r)}

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT, wait for the drain (``--exit-timeout-secs`` + margin), then SIGKILL; then
        remove any shared-memory region of this server that is left (a dead stub's, say)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            grace = timeout_s if timeout_s is not None else self.config.exit_timeout_s + 10
            if not self._interrupt(time.monotonic() + grace):
                log.info("tritonserver still stopping after the grace period: killing it")
                self._proc.kill()
                self._proc.wait()
        self.remove_shm_regions()
        return self._proc.returncode

    def _interrupt(self, deadline: float, resend_after_s: float = 2.0) -> bool:
        """SIGINT, and wait until ``deadline`` for the process to end (True if it did).

        tritonserver prints ``Signal (2) received.`` when its handler takes the signal. A
        SIGINT that lands about when it installs that handler, right after its models have
        loaded, was seen to vanish: no line, no exit, the whole grace period waited (the
        start-up stop test, 2 of 4 full suite runs on one machine). So the signal is sent again
        every ``resend_after_s`` while that line has not appeared, and never after it has."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        while True:
            left = deadline - time.monotonic()
            try:
                self._proc.wait(max(0.0, min(left, resend_after_s)))
                return True
            except subprocess.TimeoutExpired:
                if left <= resend_after_s:
                    return False
            if "Signal (2) received." not in self.logs() and self._proc.poll() is None:
                log.info("tritonserver has not taken the stop signal yet: sending it again")
                self._proc.send_signal(signal.SIGINT)

    def stop_note(self) -> str | None:
        """Why the last stop was not clean, where Triton's log tells: open HTTP connections
        (idle keep-alive ones too) held its drain until the exit timeout, so it stopped
        without unloading the models (exit code 1). None after a clean stop."""
        text = self.logs()
        if "Exit timeout expired" not in text:
            return None
        held = [int(n) for n in re.findall(r"Found (\d+) HTTP service connections", text)]
        if not held:
            return (
                f"tritonserver stopped at its exit timeout ({self.config.exit_timeout_s} s) "
                f"before its models finished (log: {self.log_path})."
            )
        return (
            f"tritonserver waited its whole exit timeout ({self.config.exit_timeout_s} s) for "
            f"{max(held)} open HTTP connection(s) to close, then stopped without unloading the "
            "models: Triton lets open HTTP connections finish before it stops, idle keep-alive "
            "ones too. Clients should close theirs when done (client.close(), or "
            "`with InferenceServerClient(...) as client:`)."
        )

    def shm_regions(self) -> list[Path]:
        """This server's shared-memory regions in /dev/shm."""
        return sorted(SHM_DIR.glob(f"{self.config.shm_prefix}*"))

    def remove_shm_regions(self, grace_s: float = 5.0) -> list[Path]:
        """Remove the regions the stopped server left; stubs of a killed server remove their
        own within seconds, so give them ``grace_s`` first, then kill the ones still there.

        A stub whose server exits while the stub is still loading its model can hang for good:
        its health thread sees the parent gone and tears the stub down, which waits for the
        GIL that the main thread holds while it waits for the dead parent's answer (seen with
        the pip wheel's stub: orphans asleep for 17 minutes, each with its model in memory).
        The removed paths."""
        deadline = time.monotonic() + grace_s
        while self.shm_regions() and time.monotonic() < deadline:
            if not any(process_running(p) for p in self._stub_pids()):
                break
            time.sleep(0.2)
        self.kill_orphaned_stubs()
        removed = self.shm_regions()
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("removed %d shared-memory region(s) left in %s", len(removed), SHM_DIR)
        return removed

    def kill_orphaned_stubs(self, wait_s: float = 5.0) -> list[int]:
        """SIGKILL this server's stubs that are still alive after it stopped; their pids."""
        if self._proc is not None and self._proc.poll() is None:
            return []  # the server runs: its stubs are its own business
        stubs = [pid for pid in self._stub_pids() if process_running(pid)]
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while any(process_running(pid) for pid in stubs) and time.monotonic() < deadline:
            time.sleep(0.05)
        if stubs:
            log.info("killed %d Python-backend stub(s) that outlived tritonserver", len(stubs))
        return stubs

    def _stub_pids(self) -> list[int]:
        """Python-backend stubs started by this server that are still around."""
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"triton_python_backend_stub") and any(
                a.startswith(self.config.shm_prefix.encode()) for a in argv
            ):
                pids.append(int(cmdline.parent.name))
        return pids

    def restart(self) -> None:
        """Stop briefly (a dead stub makes a graceful stop wait out the whole exit timeout),
        remove the shared memory the old process left behind, start again."""
        self.stop(timeout_s=5.0)
        self.start()

    def write_admin_key(self) -> Path:
        """Save the admin key where only this user can read it; the file's path."""
        key_file = self.workdir / "admin-key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.chmod(0o600)
        key_file.write_text(self.config.admin_key or "")
        return key_file

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Triton's log lines that name a model that did not load, and why.
_LOAD_FAILURES = (
    # model.py or the backend raised while loading; the table at the end repeats it.
    re.compile(r"failed to load '([^']+)'[^:]*:\s*(.*)"),
    re.compile(r"^\|\s*(\S+)\s*\|\s*\S+\s*\|\s*UNAVAILABLE:\s*(.*?)\s*\|?$"),
    # an ensemble whose steps do not fit together (never reaches the table)
    re.compile(r"Invalid argument: in ensemble ([^,\s]+), (.*)"),
    # a config.pbtxt that does not parse (the parser's complaint is on the line before)
    re.compile(r"Poll failed for model directory '([^']+)': (.*)"),
)
_PARSE_ERROR = re.compile(r"Error parsing text-format inference\.ModelConfig: (.*)")


def model_load_failures(log_text: str) -> dict[str, str]:
    """Model name -> reason, from Triton's start-up log (first reason per model)."""
    failures: dict[str, str] = {}
    parse_error = ""
    for line in log_text.splitlines():
        if m := _PARSE_ERROR.search(line):
            parse_error = m.group(1).strip()
            continue
        for pattern in _LOAD_FAILURES:
            m = pattern.search(line.strip())
            if m and m.group(1) not in failures:
                reason = m.group(2).strip().rstrip('"').replace("\\n", "\n").strip()
                if parse_error and "failed to read text proto" in reason:
                    reason = f"{reason}: {parse_error}"
                failures[m.group(1)] = reason.split("\n\nAt:")[0]
                break
    return failures
