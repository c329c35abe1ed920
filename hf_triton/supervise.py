"""Keep a server honest: probe models with real inferences, restart when a stub has died.

Triton 2.51 does not restart a Python-backend stub that died (auto-restart was removed in
24.08) and ``/v2/health/ready`` keeps answering 200 while every request to that model fails
with ``Stub process '<instance>' is not healthy``. Readiness that matters is therefore a real
inference. With ``--model-control-mode=none`` (the secure default) a single model cannot be
reloaded, so recovery is a restart of the server, timed and reported, with backoff between
restarts and a cap on how many a row of failures may cost before the launcher gives up.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hf_triton.server import ServerError, TritonServer
from hf_triton.tasks import IMAGE_INPUTS, TEXT_INPUTS

log = logging.getLogger(__name__)

#: Errors that mean "this model will not answer again until reloaded"; anything else
#: (a timeout under load, a 4xx) is reported but not acted on.
FATAL_MARKERS = ("is not healthy", "Stub process")


class ProbeFailed(ServerError):
    """A probe inference failed."""


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


#: Probe values for the BYTES inputs this project's models take; other BYTES get plain text.
_PROBE_BYTES: dict[str, Callable[[], bytes]] = {
    TEXT_INPUTS[0].name: lambda: b"A probe sentence.",
    IMAGE_INPUTS[2].name: _png,
}


def probe_inputs(metadata: dict, config: dict) -> list[tuple[str, str, np.ndarray]]:
    """Smallest valid inputs for a model, from its metadata: (name, datatype, array).

    Models whose inputs are all optional get only their first input.
    """
    optional = {i["name"] for i in config.get("input", []) if i.get("optional")}
    batching = int(config.get("max_batch_size", 0)) > 0
    inputs = metadata["inputs"]
    if inputs and all(i["name"] in optional for i in inputs):
        inputs = inputs[:1]
    probes = []
    for spec in inputs:
        dims = [int(d) for d in spec["shape"]]
        if batching:
            dims = [1, *dims[1:]]
        dims = [8 if d < 0 else d for d in dims]
        if spec["datatype"] == "BYTES":
            value = _PROBE_BYTES.get(spec["name"], lambda: b"probe")()
            array = np.full(dims, value, dtype=object)
        else:
            from tritonclient.utils import triton_to_np_dtype

            array = np.zeros(dims, dtype=triton_to_np_dtype(spec["datatype"]))
        probes.append((spec["name"], spec["datatype"], array))
    return probes


@dataclass
class Supervisor:
    """Run ``server``, probe ``models`` every ``interval_s``, restart it when one is dead.

    Restarts wait ``backoff_s``, doubling after each restart that comes within
    ``restart_window_s`` of the previous one (up to ``max_backoff_s``); more than
    ``max_restarts`` inside that window and :meth:`run` gives up with one plain error.
    """

    server: TritonServer
    models: list[str]
    interval_s: float = 30.0
    timeout_s: float = 60.0
    max_restarts: int = 5
    restart_window_s: float = 600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    on_event: Callable[[str], None] = log.info
    restarts: list[float] = field(default_factory=list)  # seconds to recover, per restart
    _restart_times: list[float] = field(default_factory=list, repr=False)

    def probe(self, model: str) -> None:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(
            url=self.server.http_url.removeprefix("http://"), network_timeout=self.timeout_s
        )
        try:
            metadata = client.get_model_metadata(model)
            config = client.get_model_config(model)
            tensors = []
            for name, datatype, array in probe_inputs(metadata, config):
                tensor = httpclient.InferInput(name, list(array.shape), datatype)
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            client.infer(model, tensors)
        except (InferenceServerException, OSError) as e:
            message = e.message() if isinstance(e, InferenceServerException) else str(e)
            raise ProbeFailed(f"probe of '{model}' failed: {message}") from e
        finally:
            client.close()

    def check(self) -> list[str]:
        """Probe every model once; the failures' messages."""
        failures = []
        for model in self.models:
            try:
                self.probe(model)
            except ProbeFailed as e:
                failures.append(str(e))
        return failures

    def _fatal(self, failures: list[str]) -> list[str]:
        fatal = [f for f in failures if any(m in f for m in FATAL_MARKERS)]
        for failure in failures:
            if failure not in fatal:
                self.on_event(f"warning: {failure}")
        return fatal

    def recover(self, reason: str, stop: threading.Event | None = None) -> float | None:
        """Restart the server; seconds until every probe passes again (None if stopped)."""
        stop = stop or threading.Event()
        now = time.monotonic()
        recent = [t for t in self._restart_times if now - t < self.restart_window_s]
        if len(recent) >= self.max_restarts:
            raise ServerError(
                f"giving up: {len(recent)} restarts in the last {self.restart_window_s:.0f} s "
                f"did not keep the models alive (last failure: {reason}). "
                f"The log is {self.server.log_path}."
            )
        wait_s = min(self.backoff_s * 2 ** len(recent), self.max_backoff_s) if recent else 0.0
        self.on_event(
            f"unhealthy: {reason}; restarting the server"
            + (f" in {wait_s:.0f} s (restart #{len(recent) + 1} in a row)" if wait_s else "")
        )
        if stop.wait(wait_s):
            return None
        self._restart_times = [*recent, now]
        started = time.monotonic()
        self.server.restart()
        if not self.server.wait_ready(stop=stop):
            return None
        fatal = self._fatal(self.check())
        if fatal:
            raise ServerError("restart did not recover: " + "; ".join(fatal))
        took = time.monotonic() - started
        self.restarts.append(took)
        self.on_event(f"recovered in {took:.1f} s (restart #{len(self.restarts)})")
        return took

    def step(self, stop: threading.Event | None = None) -> bool:
        """One supervision round; True if a restart was needed."""
        if not self.server.is_alive():
            self.recover("tritonserver exited", stop)
            return True
        fatal = self._fatal(self.check())
        if fatal:
            self.recover("; ".join(fatal), stop)
            return True
        return False

    def run(
        self,
        stop: threading.Event,
        ready_timeout_s: float = 600.0,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Start the server and keep it serving until ``stop`` is set; always stop it.

        ``stop`` is honoured at every moment: during start-up, between probes, during a
        restart's backoff and while a restarted server loads its models.
        Raises :class:`ServerError` when the server cannot be kept alive.
        """
        self.server.start()
        try:
            if not self.server.wait_ready(ready_timeout_s, stop=stop):
                return
            if on_ready is not None:
                on_ready()
            next_probe = time.monotonic() + self.interval_s
            while not stop.wait(0.5):
                if self.interval_s > 0 and time.monotonic() >= next_probe:
                    self.step(stop)
                    next_probe = time.monotonic() + self.interval_s
                elif not self.server.is_alive():
                    if self.interval_s <= 0:
                        raise ServerError(
                            "tritonserver exited unexpectedly:\n" + self.server.logs()[-3000:]
                        )
                    self.step(stop)
        finally:
            self.server.stop()
