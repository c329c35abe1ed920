"""Bounded soak: N requests at concurrency C, every answer checked against its own request.

Reports errors, requests answered not exactly once, resident memory of the server's
process tree (tritonserver + Python-backend stubs) after warm-up and at the end, and
the ``/dev/shm`` regions the server holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid``'s whole process tree."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def shm_regions() -> set[str]:
    """Triton's shared-memory regions in /dev/shm: this project's servers' (``hf_triton_*``,
    see ``ServerConfig.shm_prefix``) and any other Triton's (``*shm_region*``)."""
    try:
        return {
            p.name
            for p in SHM_DIR.iterdir()
            if p.name.startswith("hf_triton_") or "shm_region" in p.name
        }
    except OSError:
        return set()


@dataclass
class SoakReport:
    requests: int
    concurrency: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: int = 0  # answered, but not with this request's result
    answered: Counter[int] = field(default_factory=Counter)
    rss_after_warmup: int = 0
    rss_end: int = 0
    seconds: float = 0.0

    @property
    def not_exactly_once(self) -> list[int]:
        return [i for i in range(self.requests) if self.answered[i] != 1]

    @property
    def rss_growth(self) -> int:
        return self.rss_end - self.rss_after_warmup

    def summary(self) -> str:
        return (
            f"{self.requests} requests at concurrency {self.concurrency} in {self.seconds:.1f} s: "
            f"{self.ok} ok, {len(self.errors)} errors, {self.wrong} wrong answers, "
            f"{len(self.not_exactly_once)} not answered exactly once; server RSS "
            f"{self.rss_after_warmup / 2**20:.0f} MiB after warm-up, "
            f"{self.rss_end / 2**20:.0f} MiB at the end "
            f"({self.rss_growth / 2**20:+.1f} MiB)"
        )


def run_soak(
    send: Callable[[int], Any],
    check: Callable[[int, Any], bool],
    requests: int,
    concurrency: int,
    server_pid: int | None = None,
    warmup: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """Call ``send(i)`` for i in range(requests) from ``concurrency`` threads.

    ``check(i, result)`` says whether the result is request i's. Warm-up requests
    (the first ``warmup``) run before the memory baseline is taken and are not counted.
    """
    report = SoakReport(requests, concurrency)
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            result = send(i)
        except Exception as e:  # every failure is recorded with its message
            with lock:
                report.errors.append(f"request {i}: {e}")
            return
        good = check(i, result)
        with lock:
            report.answered[i] += 1
            report.ok += good
            report.wrong += not good

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: send(i % max(1, requests)), range(warmup)))
        if server_pid:
            report.rss_after_warmup = rss_bytes(server_pid)
        start = time.monotonic()
        futures = [pool.submit(one, i) for i in range(requests)]
        for n, future in enumerate(futures, 1):
            future.result()
            if progress and n % max(1, requests // 10) == 0:
                progress(f"{n}/{requests} done")
        report.seconds = time.monotonic() - start
    if server_pid:
        report.rss_end = rss_bytes(server_pid)
    return report


def run(
    url: str,
    model: str,
    requests: int = 1000,
    concurrency: int = 8,
    warmup: int = 50,
    server_pid: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """Soak ``model`` at ``url`` (HTTP host:port): 16 distinct inputs sent round-robin, each
    answer compared with the first answer to the same input (any mix-up between requests
    shows), every output of the model checked."""
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url)
    metadata = client.get_model_metadata(model)
    client.close()
    outputs = [o["name"] for o in metadata["outputs"]]
    name, datatype, samples = _samples({i["name"] for i in metadata["inputs"]}, model)
    first: dict[int, dict[str, np.ndarray]] = {}
    local = threading.local()

    def send(i: int) -> dict[str, np.ndarray]:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(url=url, network_timeout=120)
        sample = samples[i % len(samples)]
        tensor = httpclient.InferInput(name, list(sample.shape), datatype)
        tensor.set_data_from_numpy(sample)
        result = local.client.infer(model, [tensor])
        return {o: result.as_numpy(o) for o in outputs}

    def check(i: int, out: dict[str, np.ndarray]) -> bool:
        ref = first.setdefault(i % len(samples), out)
        return all(
            out[o].shape[0] == 1 and bool(np.allclose(out[o], ref[o], atol=1e-4)) for o in outputs
        )

    return run_soak(send, check, requests, concurrency, server_pid, warmup, progress)


# -- overload: open-loop load past capacity ---------------------------------------------------


@dataclass
class OverloadReport:
    """Offered load ``factor`` x the measured capacity, open loop, for ``seconds``."""

    model: str
    capacity_rps: float  # closed loop at concurrency = 2 x the model's max batch size
    unloaded_p99_ms: float  # the same closed loop: busy all the time, nothing refused
    offered_rps: float
    seconds: float
    ok: int = 0
    wrong: int = 0
    refused: int = 0  # UNAVAILABLE (503) "Exceeds maximum queue size": refused on arrival
    timed_out: int = 0  # UNAVAILABLE (503) "Request timeout expired": waited past the timeout
    other_errors: list[str] = field(default_factory=list)
    accepted_ms: list[float] = field(default_factory=list, repr=False)
    refused_ms: list[float] = field(default_factory=list, repr=False)
    rss_before: int = 0
    rss_after: int = 0

    def p(self, values: list[float], q: float) -> float:
        import numpy as np

        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> str:
        return (
            f"{self.model}: capacity {self.capacity_rps:.1f} req/s (p99 {self.unloaded_p99_ms:.0f} "
            f"ms at capacity); offered {self.offered_rps:.0f} req/s for {self.seconds:.0f} s: "
            f"{self.ok} answered (p50 {self.p(self.accepted_ms, 50):.0f} ms, p99 "
            f"{self.p(self.accepted_ms, 99):.0f} ms = "
            f"{self.p(self.accepted_ms, 99) / self.unloaded_p99_ms:.1f}x), {self.refused} "
            f"refused with 503 (p99 {self.p(self.refused_ms, 99):.1f} ms), {self.timed_out} "
            f"timed out in the queue, {self.wrong} wrong, "
            f"{len(self.other_errors)} other errors; server RSS "
            f"{self.rss_before / 2**20:.0f} -> {self.rss_after / 2**20:.0f} MiB"
        )


def overload(
    url: str,
    model: str,
    factor: float = 10.0,
    seconds: float = 60.0,
    server_pid: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> OverloadReport:
    """Measure capacity closed-loop, then offer ``factor`` x that open-loop for ``seconds``.

    Every answer is checked against the lone answer to the same input; refusals must be
    Triton's UNAVAILABLE; anything else is an error.
    """
    import asyncio

    import numpy as np
    import tritonclient.http as httpclient
    import tritonclient.http.aio as aioclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=url)
    metadata = client.get_model_metadata(model)
    config = client.get_model_config(model)
    client.close()
    name, datatype, samples = _samples({i["name"] for i in metadata["inputs"]}, model)
    outputs = [o["name"] for o in metadata["outputs"]]
    batch = max(1, int(config.get("max_batch_size", 1)))
    say = progress or (lambda _: None)

    async def main() -> OverloadReport:
        aio = aioclient.InferenceServerClient(url=url, conn_limit=4096)
        try:
            return await measure(aio)
        finally:
            await aio.close()

    async def measure(aio: Any) -> OverloadReport:
        expected: dict[int, dict[str, np.ndarray]] = {}

        async def one(i: int) -> dict[str, np.ndarray]:
            sample = samples[i % len(samples)]
            tensor = aioclient.InferInput(name, list(sample.shape), datatype)
            tensor.set_data_from_numpy(sample)
            result = await aio.infer(model, [tensor])
            return {o: result.as_numpy(o) for o in outputs}

        for i in range(len(samples)):
            expected[i] = await one(i)

        # Capacity: enough callers back to back to keep the model busy (a batch running, the
        # next one forming), none refused: the latency of a full but not overloaded server.
        callers = 2 * batch
        done, latencies = 0, []
        # A first round per caller warms up; then at least two more per caller are counted.
        warm, stop_at = 2 * callers, None
        counted_from = 0.0

        async def caller(k: int) -> None:
            nonlocal done, stop_at, counted_from
            i = k
            while stop_at is None or time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    await one(i)
                except InferenceServerException as e:
                    if e.status() != "503":
                        raise
                    await asyncio.sleep(0.1)  # still draining earlier load: not counted
                    continue
                done += 1
                if done == warm:
                    counted_from = time.monotonic()
                    stop_at = counted_from + max(min(seconds / 3, 60.0), 1.0)
                elif done > warm:
                    latencies.append((time.perf_counter() - start) * 1e3)
                i += callers

        await asyncio.gather(*(caller(k) for k in range(callers)))
        capacity = len(latencies) / (time.monotonic() - counted_from)
        report = OverloadReport(
            model,
            capacity,
            float(np.percentile(latencies, 99)),
            factor * capacity,
            seconds,
            rss_before=rss_bytes(server_pid) if server_pid else 0,
        )
        say(f"capacity {capacity:.1f} req/s; offering {report.offered_rps:.0f} req/s")

        async def fire(i: int) -> None:
            start = time.perf_counter()
            try:
                got = await one(i)
            except InferenceServerException as e:
                ms = (time.perf_counter() - start) * 1e3
                if e.status() == "503" and "timeout" in e.message().lower():
                    report.timed_out += 1
                elif e.status() == "503":
                    report.refused += 1
                    report.refused_ms.append(ms)
                else:
                    report.other_errors.append(f"[{e.status()}] {e.message()}")
                return
            except Exception as e:  # connection trouble: counted, never hidden
                report.other_errors.append(f"{type(e).__name__}: {e}")
                return
            report.accepted_ms.append((time.perf_counter() - start) * 1e3)
            ref = expected[i % len(samples)]
            same = all(np.allclose(got[o], ref[o], atol=1e-4) for o in outputs)
            report.ok += same
            report.wrong += not same

        tasks = []
        interval = 1.0 / report.offered_rps
        began = time.monotonic()
        i = 0
        while (now := time.monotonic()) < began + seconds:
            due = began + i * interval
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.ensure_future(fire(i)))
            i += 1
        await asyncio.gather(*tasks)
        if server_pid:
            report.rss_after = rss_bytes(server_pid)
        return report

    return asyncio.run(main())


def _samples(inputs: set[str], model: str) -> tuple[str, str, list[Any]]:
    """16 distinct one-item requests for a model taking images or text."""
    import numpy as np

    from hf_triton.tasks import IMAGE_INPUTS, TEXT_INPUTS

    rng = np.random.default_rng(0)
    if IMAGE_INPUTS[1].name in inputs:
        images = [rng.integers(0, 256, (1, 48 + i, 64, 3), dtype=np.uint8) for i in range(16)]
        return IMAGE_INPUTS[1].name, "UINT8", images
    if TEXT_INPUTS[0].name in inputs:
        texts = [
            np.array([[f"Soak sentence number {i}: {'word ' * i}".encode()]], dtype=object)
            for i in range(16)
        ]
        return TEXT_INPUTS[0].name, "BYTES", texts
    if len(inputs) == 1:  # a plain tensor model (e.g. the tests' fault model): FP32 rows
        only = next(iter(inputs))
        return only, "FP32", [np.full((1, 4), float(i), np.float32) for i in range(16)]
    raise ValueError(f"model '{model}' takes {sorted(inputs)}; soak sends images or text")
