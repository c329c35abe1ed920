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
    """Triton's shared-memory regions in /dev/shm (python backend and Python-based backends)."""
    try:
        return {p.name for p in SHM_DIR.iterdir() if "shm_region" in p.name}
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

    from hf_triton.tasks import IMAGE_INPUTS, TEXT_INPUTS

    client = httpclient.InferenceServerClient(url=url)
    metadata = client.get_model_metadata(model)
    client.close()
    inputs = {i["name"] for i in metadata["inputs"]}
    outputs = [o["name"] for o in metadata["outputs"]]
    rng = np.random.default_rng(0)
    if IMAGE_INPUTS[1].name in inputs:
        name, datatype = IMAGE_INPUTS[1].name, "UINT8"
        samples = [rng.integers(0, 256, (1, 48 + i, 64, 3), dtype=np.uint8) for i in range(16)]
    elif TEXT_INPUTS[0].name in inputs:
        name, datatype = TEXT_INPUTS[0].name, "BYTES"
        samples = [
            np.array([[f"Soak sentence number {i}: {'word ' * i}".encode()]], dtype=object)
            for i in range(16)
        ]
    else:
        raise ValueError(f"model '{model}' takes {sorted(inputs)}; soak sends images or text")
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
