#!/usr/bin/env python3
"""Liveness that means something: one real inference per model, with the standard library only.

Triton 2.51 keeps ``/v2/health/live`` and ``/v2/health/ready`` at 200 after a Python-backend stub
has died, while every request to that model fails with ``Stub process '<instance>' is not
healthy``. Only an inference tells. This file is the launcher's probe (``hf_triton.supervise``)
and, copied into the container image, the Kubernetes and KServe liveness probe:

    python3 probe.py [--url http://127.0.0.1:8000] [--timeout-s 10] MODEL [MODEL ...]
    python3 probe.py --all [--admin-key-env ADMIN_KEY]   # every READY model of the server

Exit 1 when a model is dead: Triton names its stub unhealthy, which only a restart cures.
Anything else exits 0 with a warning: a refused probe input (4xx) means the model's code ran,
and a full queue (503) or a timeout under load is the autoscaler's business, not a reason to
kill a working pod.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request

#: Answers that mean "this model will not answer again until it is reloaded".
FATAL_MARKERS = ("is not healthy", "Stub process")
#: Probe values per input name of this project's models; other inputs get zeros or "probe".
_TEXT_INPUTS = {"text": "A probe sentence."}
#: Among a model's optional inputs (exactly one to send), the ones a probe can fill in JSON.
_PREFERRED = ("image_uint8", "image", "text")


class ProbeFailed(Exception):
    """A probe inference failed; ``fatal`` when the model needs a restart to answer again."""

    def __init__(self, message: str, fatal: bool):
        super().__init__(message)
        self.fatal = fatal


def _get(url: str, timeout_s: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.load(r)


def request_body(metadata: dict, config: dict) -> dict:
    """The smallest valid JSON inference request for a model, from its metadata and config."""
    optional = {i["name"] for i in config.get("input", []) if i.get("optional")}
    inputs = [i for i in metadata["inputs"] if i["name"] not in optional]
    # Of the optional inputs (send exactly one: an image as UINT8, FP32 or bytes), the one a
    # probe fills best; the required ones (a zero-shot model's labels) go with it.
    ranked = sorted(
        (i for i in metadata["inputs"] if i["name"] in optional),
        key=lambda i: _PREFERRED.index(i["name"]) if i["name"] in _PREFERRED else 99,
    )
    inputs += ranked[:1]
    batching = int(config.get("max_batch_size", 0)) > 0
    tensors = []
    for spec in inputs:
        shape = [int(d) for d in spec["shape"]]
        if batching:
            shape = [1, *shape[1:]]
        shape = [8 if d < 0 else d for d in shape]
        count = 1
        for d in shape:
            count *= d
        if spec["datatype"] == "BYTES":
            data: list = [_TEXT_INPUTS.get(spec["name"], "probe")] * count
        elif spec["datatype"] == "BOOL":
            data = [False] * count
        else:
            data = [0] * count
        tensors.append(
            {"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": data}
        )
    return {"inputs": tensors}


def probe(url: str, model: str, timeout_s: float = 10.0) -> None:
    """One inference on ``model`` at ``url`` (http://host:port); raise :class:`ProbeFailed`."""
    base = f"{url.rstrip('/')}/v2/models/{model}"
    try:
        body = request_body(_get(base, timeout_s), _get(f"{base}/config", timeout_s))
        request = urllib.request.Request(
            f"{base}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        message = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # Triton's {"error": "..."}
            message = json.loads(message).get("error", message)
        if e.code < 500 and not any(m in message for m in FATAL_MARKERS):
            return  # the model ran and refused the probe's input: it is alive
        raise ProbeFailed(
            f"probe of '{model}' failed: [{e.code}] {message}",
            fatal=any(m in message for m in FATAL_MARKERS),
        ) from e
    except (OSError, ValueError) as e:  # refused, reset, timed out, not JSON
        raise ProbeFailed(f"probe of '{model}' failed: {e}", fatal=False) from e


def ready_models(url: str, admin_key: str | None, timeout_s: float = 10.0) -> list[str]:
    """Every READY model (the repository index is a restricted API: the admin key opens it)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v2/repository/index",
        data=b"{}",
        headers={"admin-key": admin_key} if admin_key else {},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        return [m["name"] for m in json.load(r) if m.get("state") == "READY"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--all", action="store_true", help="probe every READY model")
    parser.add_argument(
        "--admin-key-env",
        default="ADMIN_KEY",
        help="with --all: environment variable holding the admin key (default: %(default)s)",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    models = list(args.models)
    if args.all:
        try:
            models += ready_models(args.url, os.environ.get(args.admin_key_env), args.timeout_s)
        except (OSError, ValueError) as e:
            print(f"warning: cannot list the models at {args.url}: {e}", file=sys.stderr)
    if not models:
        parser.error("name the models to probe, or pass --all")
    dead = 0
    for model in models:
        try:
            probe(args.url, model, args.timeout_s)
        except ProbeFailed as e:
            print(("dead: " if e.fatal else "warning: ") + str(e), file=sys.stderr)
            dead += e.fatal
    return 1 if dead else 0


if __name__ == "__main__":
    sys.exit(main())
