"""Safe defaults of the launched server: loopback only, admin APIs locked, no model control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from test_bad_input import post
from tritonclient.utils import InferenceServerException

from hf_triton.soak import process_tree

from conftest import ADMIN_HEADERS, ADMIN_KEY

RESTRICTED = [
    "/v2/repository/index",
    "/v2/systemsharedmemory/status",
    "/v2/cudasharedmemory/status",
    "/v2/logging",
    "/v2/trace/setting",
]


def _get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    import http.client

    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    body = r.read().decode(errors="replace")
    try:
        parsed = json.loads(body)
    except ValueError:
        return r.status, body
    return r.status, parsed.get("error", body) if isinstance(parsed, dict) else body


@pytest.mark.parametrize("path", RESTRICTED)
def test_restricted_http_api_needs_the_admin_key(server, path):
    method = post if path == "/v2/repository/index" else None
    if method:
        status, message = post(server.url, path, b"{}")
        ok_status, _ = post(server.url, path, b"{}", ADMIN_HEADERS)
    else:
        status, message = _get(server.url, path)
        ok_status, _ = _get(server.url, path, ADMIN_HEADERS)
    assert (status, message) == (403, "This API is restricted, expecting header 'admin-key'")
    assert ok_status == 200


def test_restricted_grpc_protocol_needs_the_admin_key(server):
    with grpcclient.InferenceServerClient(url=server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        # gRPC metadata carries the key as 'triton-grpc-protocol-<header>'.
        headers = {"triton-grpc-protocol-admin-key": ADMIN_KEY}
        index = client.get_model_repository_index(headers=headers)
    assert {m.name for m in index.models} >= {"python_vit", "ensemble_model"}


def test_inference_and_health_stay_open(server):
    assert _get(server.url, "/v2/health/ready")[0] == 200
    assert _get(server.url, "/v2/models/ensemble_model")[0] == 200


def test_model_control_is_off_even_with_the_key(server):
    status, message = post(
        server.url, "/v2/repository/models/python_vit/unload", b"{}", ADMIN_HEADERS
    )
    assert status >= 400 and "not allowed" in message, message


def _listening_addresses(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addresses.add(fields[1].split(":")[0])
    return addresses


def test_server_listens_on_loopback_only(server):
    pids = process_tree(server.process.pid)
    addresses = _listening_addresses(pids)
    assert addresses, "no listening sockets found"
    # 127.0.0.1 as little-endian hex, alone or IPv4-mapped in an IPv6 socket (gRPC's).
    assert addresses <= {"0100007F", "0000000000000000FFFF00000100007F"}, addresses


def test_server_runs_offline(server):
    tritonserver = [
        p
        for p in process_tree(server.process.pid)
        if Path(f"/proc/{p}/exe").resolve().name == "tritonserver"
    ]
    env = Path(f"/proc/{tritonserver[0]}/environ").read_bytes().split(b"\0")
    assert b"HF_HUB_OFFLINE=1" in env


def test_admin_key_file_is_private(server):
    key_file = server.workdir / "admin-key"
    assert key_file.read_text() == ADMIN_KEY
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
