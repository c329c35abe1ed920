"""Keep a server honest: probe models with real inferences, restart when a stub has died.

Triton 2.51 does not restart a Python-backend stub that died (auto-restart was removed in
24.08) and ``/v2/health/ready`` keeps answering 200 while every request to that model fails
with ``Stub process '<instance>' is not healthy``. Readiness that matters is therefore a real
inference. With ``--model-control-mode=none`` (the secure default) a single model cannot be
reloaded, so recovery is a restart of the server, timed and reported, with backoff between
restarts and a cap on how many a row of failures may cost before the launcher gives up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hf_triton import probe
from hf_triton.server import ServerError, TritonServer

log = logging.getLogger(__name__)


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
    #: A model is dead and no restart revived it: a clean stop would wait out the exit timeout.
    _dead: bool = field(default=False, repr=False)

    def check(self) -> list[probe.ProbeFailed]:
        """Probe every model once with a real inference; the failures."""
        failures = []
        for model in self.models:
            try:
                probe.probe(self.server.http_url, model, self.timeout_s)
            except probe.ProbeFailed as e:
                failures.append(e)
        return failures

    def _fatal(self, failures: list[probe.ProbeFailed]) -> list[str]:
        for failure in failures:
            if not failure.fatal:  # a full queue, a slow answer: alive, a restart would not help
                self.on_event(f"warning: {failure} (the model is alive: no restart)")
        return [str(f) for f in failures if f.fatal]

    def recover(self, reason: str, stop: threading.Event | None = None) -> float | None:
        """Restart the server until every probe passes; the seconds that took (None if
        ``stop`` was set meanwhile). Gives up with :class:`ServerError` when the restarts in
        the window reach ``max_restarts``."""
        stop = stop or threading.Event()
        started = time.monotonic()
        while True:
            now = time.monotonic()
            recent = [t for t in self._restart_times if now - t < self.restart_window_s]
            if len(recent) >= self.max_restarts:
                self._dead = True
                raise ServerError(
                    f"giving up: {len(recent)} restarts in the last {self.restart_window_s:.0f} s "
                    f"did not keep the models alive (last failure: {reason}). "
                    f"The server's log is {self.server.log_path}."
                )
            wait_s = (
                min(self.backoff_s * 2 ** (len(recent) - 1), self.max_backoff_s) if recent else 0
            )
            self.on_event(
                f"unhealthy: {reason}; restarting the server"
                + (f" in {wait_s:.0f} s (restart #{len(recent) + 1} in a row)" if wait_s else "")
            )
            if stop.wait(wait_s):
                return None
            self._restart_times = [*recent, time.monotonic()]
            self.server.restart()
            if not self.server.wait_ready(stop=stop):
                return None
            fatal = self._fatal(self.check())
            if not fatal:
                break
            reason = "; ".join(fatal)
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
            self.server.stop(timeout_s=5.0 if self._dead else None)
