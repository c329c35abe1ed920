"""Keep a server honest: probe models with real inferences, restart when a stub has died.

Triton 2.51 does not restart a Python-backend stub that died (auto-restart was removed in
24.08) and ``/v2/health/ready`` keeps answering 200 while every request to that model fails
with ``Stub process '<instance>' is not healthy``. Readiness that matters is therefore a real
inference. With ``--model-control-mode=none`` (the secure default) a single model cannot be
reloaded, so recovery is a restart of the server, timed and reported.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hf_triton.server import ServerError, TritonServer

log = logging.getLogger(__name__)

#: Errors that mean "this model will not answer again until reloaded"; anything else
#: (a timeout under load, say) is reported but not acted on.
FATAL_MARKERS = ("is not healthy", "Stub process")


class ProbeFailed(ServerError):
    """A probe inference failed."""


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
            from PIL import Image  # noqa: PLC0415

            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
            array = np.full(dims, buf.getvalue(), dtype=object)
        else:
            from tritonclient.utils import triton_to_np_dtype  # noqa: PLC0415

            array = np.zeros(dims, dtype=triton_to_np_dtype(spec["datatype"]))
        probes.append((spec["name"], spec["datatype"], array))
    return probes


@dataclass
class Supervisor:
    """Probe ``models`` every ``interval_s``; restart ``server`` when one is dead."""

    server: TritonServer
    models: list[str]
    interval_s: float = 30.0
    timeout_s: float = 60.0
    on_event: Callable[[str], None] = print
    restarts: list[float] = field(default_factory=list)  # seconds to recover, per restart

    def probe(self, model: str) -> None:
        import tritonclient.http as httpclient  # noqa: PLC0415
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

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

    def recover(self, reason: str) -> float:
        """Restart the server; seconds until every probe passes again."""
        self.on_event(f"unhealthy: {reason}; restarting the server")
        started = time.monotonic()
        # A dead stub makes a graceful stop wait out --exit-timeout-secs: be brief.
        self.server.stop(timeout_s=5.0)
        self.server.start()
        self.server.wait_ready()
        failures = self.check()
        if failures:
            raise ServerError("restart did not recover: " + "; ".join(failures))
        took = time.monotonic() - started
        self.restarts.append(took)
        self.on_event(f"recovered in {took:.1f} s (restart #{len(self.restarts)})")
        return took

    def step(self) -> bool:
        """One supervision round; True if a restart was needed."""
        if not self.server.is_alive():
            self.recover("tritonserver exited")
            return True
        failures = self.check()
        fatal = [f for f in failures if any(m in f for m in FATAL_MARKERS)]
        for failure in failures:
            if failure not in fatal:
                self.on_event(f"warning: {failure}")
        if fatal:
            self.recover("; ".join(fatal))
            return True
        return False
