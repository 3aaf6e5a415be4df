"""Tests of aeordb.py: the WSGI app through webtest, and real waitress servers on 127.0.0.1.

Run: python -m pytest -q test_aeordb.py

Every WASM module here is written as WAT and compiled with wasmtime.wat2wasm,
so the suite needs no toolchain.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import wasmtime
import webtest

import aeordb

HERE = Path(__file__).resolve().parent
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# Helpers ######################################################################

def wat(text: str) -> bytes:
    return wasmtime.wat2wasm(text)


def make_app(data_dir: Path, **overrides):
    """A fresh, isolated app on ``data_dir``; answers (webtest.TestApp, bottle app)."""
    settings = aeordb.Settings(data_dir=Path(data_dir), token=TOKEN, **overrides)
    app = aeordb.create_app(settings)
    return webtest.TestApp(app), app


@pytest.fixture
def client(tmp_path):
    test_app, _ = make_app(tmp_path)
    return test_app


def deploy(client, path: str, module: bytes, status=200, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return client.put(f"/{path}/_deploy" + (f"?{query}" if query else ""), module,
                      headers=AUTH, status=status)


def invoke(client, path: str, body: bytes = b"", status=200, **kwargs):
    return client.post(f"/{path}/_invoke", body, headers={**AUTH, **kwargs.pop("headers", {})},
                       status=status, **kwargs)


def wat_string(data: bytes) -> str:
    """``data`` as a WAT data-segment string literal."""
    return "".join(f"\\{b:02x}" for b in data)


# A module that answers its own request envelope verbatim (the original's "echo").
ECHO_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
"""

# A bump allocator shared by modules that export alloc (as every SDK module does).
ALLOC_WAT = """
  (global $heap (mut i32) (i32.const 65536))
  (func $alloc (export "alloc") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (i32.sub (global.get $heap)
                  (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536)) (i32.const 1))))))
    (local.get $p))
"""


def answer_module(answer: bytes) -> bytes:
    """A module whose handle always answers ``answer`` (kept in a data segment at 1024)."""
    return wat(f"""
(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{wat_string(answer)}")
  (func (export "handle") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const {len(answer)}))))
""")


def host_call_module(function: str, args: bytes) -> bytes:
    """A module whose handle calls aeordb.<function> with ``args`` and answers the host's answer."""
    return wat(f"""
(module
  (import "aeordb" "{function}" (func $host (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (data (i32.const 1024) "{wat_string(args)}")
  (func (export "handle") (param i32 i32) (result i64)
    (call $host (i32.const 1024) (i32.const {len(args)}))))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(port: int, timeout: float = 20.0) -> None:
    """Poll /_health until the server answers (readiness, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/_health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


@contextlib.contextmanager
def server_process(data_dir: Path, *extra_args: str, env: dict | None = None):
    """``python aeordb.py`` as a real process on 127.0.0.1; yields (process, port)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(HERE / "aeordb.py"), "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--token", TOKEN, *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_until_healthy(port)
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def server_thread(app, threads: int = 4, **options):
    """A real waitress server for ``app`` in this process, on a free 127.0.0.1 port; yields the port."""
    import waitress.server
    server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=threads, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = server.effective_port
        wait_until_healthy(port)
        yield port
    finally:
        server.close()
        thread.join(timeout=10)


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 30.0):
    """One request to a real server; answers (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={**AUTH, **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# Smoke ########################################################################

def test_health_and_echo_round_trip(client):
    assert client.get("/_health").json == {"status": "ok"}
    deploy(client, "mydb/public/users", wat(ECHO_WAT))
    answer = invoke(client, "mydb/public/users/compute", b"hi")
    envelope = json.loads(answer.body)
    assert envelope["arguments"] == [104, 105]
    assert answer.content_type == "application/octet-stream"
