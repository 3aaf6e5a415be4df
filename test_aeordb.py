"""Tests of aeordb.py: the WSGI app through webtest, and real waitress servers on 127.0.0.1.

Run: python -m pytest -q test_aeordb.py

Every WASM module here is written as WAT and compiled with wasmtime.wat2wasm,
so the suite needs no toolchain.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import http.client
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sqlite3
import sys
import threading
import time
from pathlib import Path

import jsonschema
import openapi_spec_validator
import pytest
import wasmtime
import webtest

import aeordb

HERE = Path(__file__).resolve().parent
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# Helpers and fixtures #########################################################

# -- WASM modules, written as WAT ----------------------------------------------

def wat(text: str) -> bytes:
    return wasmtime.wat2wasm(text)


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


# A handle that loops forever, and one that traps.
LOOP_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param i32 i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0)))
"""


TRAP_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param i32 i32) (result i64) unreachable))
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


def json_args(args) -> bytes:
    return args if isinstance(args, bytes) else json.dumps(args).encode()


def write_step(path: str, data: bytes, content_type: str | None = None) -> tuple:
    args = {"path": path, "data": base64.b64encode(data).decode()}
    if content_type:
        args["content_type"] = content_type
    return ("aeordb_write_file", json_args(args))


SPIN_ROUNDS = 1 << 28   # rounds of an empty loop: far past aeordb.HOLD_TICKS, far within 30 s


def sequence_module(steps, *, alloc: bool = True, tail="return") -> bytes:
    """A module whose handle runs host calls in order, then ends as ``tail`` says.

    ``steps``: (function, args_bytes) for the (i32, i32) -> i64 host functions, or
    ("log_message", level_bytes, message_bytes). Arguments live in data segments
    (above the request, which lands at 0 without ``alloc``). ``tail``: "return"
    (the last host answer), "trap" (unreachable), "bad_pointer", "loop" (endless),
    "spin" (the last host answer after SPIN_ROUNDS rounds of an empty loop),
    "offset0" (the last answer's length at pointer 0: proves a module without
    alloc got it there) or "check_alloc" (traps unless the last answer came from
    the module's alloc).
    """
    base = 1024 if alloc else 32768
    imports, segments, body = {}, [], []
    offset = base

    def place(data: bytes) -> int:
        nonlocal offset
        at = offset
        segments.append(f'(data (i32.const {at}) "{wat_string(data)}")')
        offset += len(data) + 8
        return at

    for step in steps:
        if step[0] == "log_message":
            imports["log_message"] = ('(import "aeordb" "log_message" '
                                      '(func $log_message (param i32 i32 i32 i32)))')
            level, message = step[1], step[2]
            body.append(f"(call $log_message (i32.const {place(level)}) (i32.const {len(level)})"
                        f" (i32.const {place(message)}) (i32.const {len(message)}))")
        else:
            function, args = step
            imports[function] = (f'(import "aeordb" "{function}" '
                                 f'(func ${function} (param i32 i32) (result i64)))')
            body.append(f"(local.set $r (call ${function} (i32.const {place(args)})"
                        f" (i32.const {len(args)})))")
    if tail == "return":
        end = "(local.get $r)"
    elif tail == "trap":
        end = "unreachable"
    elif tail == "bad_pointer":
        end = "(i64.const 0x7FFF000000000064)"   # 100 bytes at 2 GiB: far outside memory
    elif tail == "loop":
        end = "(loop $forever (br $forever)) (i64.const 0)"
    elif tail == "spin":
        end = (f"(block $done (loop $round (br_if $done (i64.ge_u (local.get $i) (i64.const {SPIN_ROUNDS})))"
               " (local.set $i (i64.add (local.get $i) (i64.const 1))) (br $round))) (local.get $r)")
    elif tail == "offset0":
        end = "(i64.and (local.get $r) (i64.const 0xFFFFFFFF))"
    else:
        assert tail == "check_alloc", tail
        end = ("(if (i64.lt_u (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 65536))"
               " (then unreachable)) (local.get $r)")
    return wat(f"""
(module
  {' '.join(imports.values())}
  (memory (export "memory") 2)
  {ALLOC_WAT if alloc else ''}
  {' '.join(segments)}
  (func (export "handle") (param i32 i32) (result i64)
    (local $r i64) (local $i i64)
    {' '.join(body)}
    {end}))
""")


def packed(ptr: int, length: int) -> int:
    """handle's i64 answer for (ptr, length), as the signed value an i64.const needs."""
    value = (ptr & 0xFFFFFFFF) << 32 | (length & 0xFFFFFFFF)
    return value - (1 << 64) if value >= 1 << 63 else value


HOSTILE_BODY = b"x" * 400      # its envelope is over 1600 bytes: a misbehaving_module misbehaves
OK_AT_1024 = 1024 << 32 | 2     # handle's answer "ok", kept at 1024


def misbehaving_module(hostile: str, head: str = "", extra: str = "", memory: str = "1") -> bytes:
    """A module answering "ok" unless its request envelope is over 1000 bytes: then ``hostile`` runs."""
    return wat(f"""
(module
  {head}
  (memory (export "memory") {memory})
  {extra}
  (data (i32.const 1024) "ok")
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.gt_u (local.get $len) (i32.const 1000)) (then {hostile}))
    (i64.const {OK_AT_1024})))
""")


# -- Apps, plugins and requests ------------------------------------------------

def make_app(data_dir: Path, *, options: dict | None = None, **overrides):
    """A fresh, isolated app on ``data_dir``; answers (webtest.TestApp, bottle app).

    ``overrides`` are Settings fields (``token`` defaults to TOKEN; None generates one);
    ``options`` are the Settings fields that choose engine paths (``engine``, ``fast_calls``).
    """
    settings = aeordb.Settings(**{"data_dir": Path(data_dir), "token": TOKEN, **overrides, **(options or {})})
    app = aeordb.create_app(settings)
    return webtest.TestApp(app), app


@pytest.fixture
def client(tmp_path):
    test_app, _ = make_app(tmp_path)
    return test_app


@pytest.fixture
def deployed(client):
    """A fresh app with the echo plugin (ECHO_WAT) deployed; answers (client, the plugin's path)."""
    deploy(client, "db/s/t", wat(ECHO_WAT))
    return client, "db/s/t"


def deploy(client, path: str, module: bytes, status=200, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return client.put(f"/{path}/_deploy" + (f"?{query}" if query else ""), module,
                      headers=AUTH, status=status)


def invoke(client, path: str, body: bytes = b"", status=200, **kwargs):
    return client.post(f"/{path}/_invoke", body, headers={**AUTH, **kwargs.pop("headers", {})},
                       status=status, **kwargs)


def error_of(response) -> str:
    """The error message of a JSON error answer (asserting that it is one)."""
    assert response.content_type == "application/json", response.body[:200]
    body = json.loads(response.body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


def answer_with(client, answer: bytes, status: int = 200):
    """Deploy a module that always answers ``answer``; invoke it once."""
    deploy(client, "db/s/answer", answer_module(answer))
    return invoke(client, "db/s/answer/f", b"x", status=status)


def envelope_of(client, body: bytes = b"", path: str = "db/schema/table", function: str = "function",
                query: str = "", headers: dict | None = None) -> dict:
    """Deploy ECHO at ``path`` and answer the request envelope the plugin received."""
    deploy(client, path, wat(ECHO_WAT))
    answer = client.post(f"/{path}/{function}/_invoke" + (f"?{query}" if query else ""), body,
                         headers={**AUTH, **(headers or {})}, status=200)
    return json.loads(answer.body)


def call_host(client, db: str, function: str, args, table: str = "t") -> dict:
    """Deploy host_call_module(function, args) at {db}/s/{table}; answer its invocation's JSON."""
    deploy(client, f"{db}/s/{table}", host_call_module(function, json_args(args)))
    answer = invoke(client, f"{db}/s/{table}/run")
    return json.loads(answer.body)


def run_sequence(client, db: str, steps, status: int = 200, table: str = "seq", **options):
    deploy(client, f"{db}/s/{table}", sequence_module(steps, **options))
    return invoke(client, f"{db}/s/{table}/run", status=status)


def put_file(client, db: str, path: str, data: bytes, content_type: str = "application/octet-stream",
             status=None):
    return client.put(f"/{db}/_files{path}", data, headers=AUTH, content_type=content_type,
                      status=status)


def sha256_hex(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


# -- A populated database ------------------------------------------------------

USERS = [
    {"name": "Alice", "age": 30, "address": {"city": "Paris"}, "tags": ["admin", "dev"], "active": True},
    {"name": "Bob", "age": 25, "address": {"city": "Berlin"}, "tags": ["dev"], "active": False},
    {"name": "Carol", "age": 35, "address": {"city": "Paris"}, "tags": ["ops"], "active": True},
    {"name": "Dave", "age": 40, "address": {"city": "London"}, "tags": [], "active": True},
    {"name": "Eve", "age": 22, "address": {"city": "Berlin"}, "tags": ["dev", "sec"], "active": False},
    {"name": "Frank", "age": 30, "address": {"city": "Rome"}, "tags": ["ops"], "active": True},
    {"name": "Grace", "age": 28.5, "address": {"city": "Paris"}, "tags": ["admin"], "active": True},
    {"name": "heidi", "age": 45, "address": {"city": "London"}, "tags": ["dev"], "active": None},
]


USER_NAMES = [user["name"] for user in USERS]


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A client over /users: 8 documents, plus files a query must skip."""
    client, _ = make_app(tmp_path_factory.mktemp("users"))
    for number, user in enumerate(USERS, 1):
        put_file(client, "q", f"/users/u{number}.json", json.dumps(user).encode(), "application/json")
    put_file(client, "q", "/users/readme.txt", b"name: Alice, not JSON", "text/plain")
    put_file(client, "q", "/users/broken.json", b'{"name": "Alice"', "application/json")
    put_file(client, "q", "/users/list.json", b'[{"name": "Alice"}]', "application/json")
    put_file(client, "q", "/users/sub/u9.json", json.dumps({"name": "Zed", "age": 30}).encode())
    put_file(client, "q", "/users2/u10.json", json.dumps({"name": "Yan", "age": 30}).encode())
    put_file(client, "other", "/users/u11.json", json.dumps({"name": "Xi", "age": 30}).encode())
    return client


def post_query(client, spec, status=200):
    return client.post("/q/_query", json.dumps(spec), headers=AUTH, status=status,
                       content_type="application/json")


def names_matching(client, where, **extra) -> list:
    answer = post_query(client, {"path": "/users", "where": where, **extra}).json
    paths = [item["path"] for item in answer["items"]]
    return [USERS[int(path.rsplit("/u", 1)[1][:-5]) - 1]["name"] for path in paths]


def cond(field, op, value, **more):
    return {"field": field, "op": op, "value": value, **more}


def post_aggregate(client, aggregate, status=200, **extra):
    return post_query(client, {"path": "/users", "aggregate": aggregate, **extra}, status=status)


# -- Files on disk, faults and races -------------------------------------------

def flip_middle(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:]


def restart_without_cache(tmp_path):
    """A new app on ``tmp_path`` that must load every plugin from plugins/ alone."""
    import shutil
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    return make_app(tmp_path)[0]


def temp_files(root: Path) -> list:
    return [p for p in root.rglob("*") if aeordb.TEMP_MARK in p.name]


def check_plugin_files(data_dir: Path, listed: list) -> None:
    """plugin.json files on disk match ``listed``, each beside exactly its own module."""
    on_disk = {}
    for meta_file in (data_dir / "plugins").glob("*/*/*/plugin.json"):
        meta = json.loads(meta_file.read_text())
        on_disk[meta["path"]] = meta
        folder = meta_file.parent
        assert meta["path"] == "/".join(folder.parts[-3:])
        assert sorted(p.name for p in folder.glob("module-*.wasm")) == [f"module-{meta['sha256']}.wasm"], meta
    assert on_disk == {meta["path"]: meta for meta in listed}


def disk_error(code: int = 28) -> OSError:
    """The OSError a full (ENOSPC, 28) or read-only (EROFS, 30) disk raises."""
    return OSError(code, os.strerror(code))


class CommitFails:
    """A connection whose next COMMIT fails as a full disk makes it fail."""

    def __init__(self, conn):
        self.conn, self.failed = conn, False

    def execute(self, sql, *args):
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise aeordb.sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


class CountingInput:
    """A wsgi.input that counts what the app reads (and has only a few bytes to give)."""

    def __init__(self, data: bytes = b"0123456789"):
        self.data, self.read_bytes = data, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[:len(self.data) if size is None or size < 0 else size]
        self.data = self.data[len(chunk):]
        self.read_bytes += len(chunk)
        return chunk

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)


class GatedLock:
    """Stands in for a lock: the first thread to take it runs ``gate(self)`` first.

    ``waiting`` is set when another thread asks for the lock meanwhile.
    """

    def __init__(self, lock, gate=lambda gated: None):
        self.lock, self.gate, self.first, self.waiting = lock, gate, None, threading.Event()

    def __enter__(self):
        if self.first is None:
            self.first = threading.current_thread()
            self.gate(self)
        else:
            self.waiting.set()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


# -- Real servers and processes ------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.002)


def wait_until_healthy(port: int, timeout: float = 20.0, process=None) -> None:
    """Poll /_health until the server answers 200 (readiness, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process is None or process.poll() is None, f"the server exited with {process.returncode}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/_health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        assert time.monotonic() < deadline, f"no healthy server on port {port} within {timeout} s"
        time.sleep(0.02)


@contextlib.contextmanager
def server_process(data_dir: Path, *extra_args: str, env: dict | None = None, address_space: int | None = None,
                   token: bool = True, python: tuple = ()):
    """``python aeordb.py`` as a real process on 127.0.0.1; yields (process, port).

    ``address_space`` sets the process's RLIMIT_AS (bytes), as ``ulimit -v`` would;
    ``token=False`` leaves the token to the server; ``python``: arguments for
    Python itself instead of the script's path (e.g. ``-c``, a script, ``aeordb.py``).
    """
    port = free_port()

    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    process = subprocess.Popen(
        [sys.executable, *(python or (str(HERE / "aeordb.py"),)), "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), *(("--token", TOKEN) if token else ()), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        preexec_fn=limit if address_space else None)
    try:
        wait_until_healthy(port, process=process)
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
def server_thread(app, threads: int = 4):
    """aeordb.py's own Server for ``app`` (guarded connections, clean stop) in a thread on a free
    127.0.0.1 port, with ``threads`` workers; yields the port."""
    settings = dataclasses.replace(app.config["aeordb.settings"], threads=threads)
    server = aeordb.Server(app, settings, aeordb.bind_listener("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = server.waitress.socket.getsockname()[1]
        wait_until_healthy(port)
        yield port
    finally:
        server.stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def real_server(tmp_path):
    """A real waitress server (server_thread's defaults) for a fresh app.

    Yields (a webtest client of the same app, the server's port).
    """
    client, app = make_app(tmp_path)
    with server_thread(app) as port:
        yield client, port


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


def send_raw(port: int, head: bytes, body: bytes, timeout: float = 5.0) -> bytes:
    """Send a raw request (headers, then only ``body``) and answer what the server says first."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


@contextlib.contextmanager
def guarded_server(data_dir: Path, **overrides):
    """A fresh app on ``data_dir`` served by server_thread; yields (webtest client, port)."""
    client, app = make_app(data_dir, **overrides)
    with server_thread(app, threads=app.config["aeordb.settings"].threads) as port:
        yield client, port


def read_responses(sock: socket.socket, count: int) -> list:
    """``count`` HTTP/1.1 responses read in order from ``sock`` (Content-Length framed): [(status, headers, body)]."""
    received, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(answers)} response(s) and {received!r}"
            received += chunk
        head, received = received.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(received) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            received += chunk
        answers.append((int(lines[0].split()[1]), headers, received[:length]))
        received = received[length:]
    return answers


def read_response(sock: socket.socket) -> tuple:
    """(status, headers, body) of one HTTP/1.1 response read from ``sock``."""
    return read_responses(sock, 1)[0]


@functools.cache
def help_text() -> str:
    """What ``python aeordb.py --help`` prints (asserting that it succeeds); run once."""
    result = subprocess.run([sys.executable, str(HERE / "aeordb.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    return result.stdout


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` run by ``python -c`` beside aeordb.py (so that it imports it); its outcome."""
    return subprocess.run([sys.executable, "-c", script, *args], cwd=Path(aeordb.__file__).parent,
                          capture_output=True, text=True, timeout=60)   # a broken timer would spin forever


# Settings #####################################################################

def test_settings_accept_their_edges():
    settings = aeordb.parse_settings(["--port", "65535", "--log-level", "debug"], {"AEORDB_ACCESS_LOG": "off"})
    assert (settings.port, settings.log_level, settings.access_log) == (65535, "DEBUG", False)
    assert aeordb.parse_settings([], {"AEORDB_ACCESS_LOG": "1"}).access_log is True


@pytest.mark.parametrize("argv, environ", [
    (["--port", "70000"], {}), (["--timeout", "nan"], {}), (["--timeout", "inf"], {}),
    (["--log-level", "bogus"], {}), ([], {"AEORDB_PORT": "70000"}), ([], {"AEORDB_TIMEOUT": "nan"}),
])
def test_settings_out_of_range_are_refused(argv, environ, capsys):
    with pytest.raises(SystemExit) as exited:
        aeordb.parse_settings(argv, environ)
    assert exited.value.code == 2 and "error" in capsys.readouterr().err


def test_threads_over_the_pool_are_refused(capsys):
    with pytest.raises(SystemExit):
        aeordb.parse_settings(["--threads", str(aeordb.MAX_THREADS + 1)], environ={})
    assert "at most" in capsys.readouterr().err
    assert aeordb.parse_settings(["--threads", str(aeordb.MAX_THREADS)], environ={}).threads == aeordb.MAX_THREADS


def test_default_request_limit_fits_the_default_memory_limit(client):
    """A body as large as --max-request-size allows must reach the plugin, not fail placement."""
    module = wat(f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (data (i32.const 16) "fits")
  (func (export "handle") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 4))))
""")
    deploy(client, "db/s/big", module)
    body = os.urandom(aeordb.Settings().max_request_size)
    assert invoke(client, "db/s/big/f", body).body == b"fits"


def test_configured_token_writes_no_file(tmp_path):
    _, app = make_app(tmp_path, token=TOKEN)
    assert app.config["aeordb.token"] == TOKEN and app.config["aeordb.token_created"] is False
    assert not (tmp_path / "token").exists()


def test_generated_tokens_differ_between_data_dirs(tmp_path):
    one = make_app(tmp_path / "a", token=None)[1].config["aeordb.token"]
    two = make_app(tmp_path / "b", token=None)[1].config["aeordb.token"]
    assert one != two


def test_token_is_generated_once_and_kept(tmp_path):
    _, app = make_app(tmp_path, token=None)
    token = app.config["aeordb.token"]
    token_file = tmp_path / "token"
    assert app.config["aeordb.token_created"] is True
    assert len(token) >= 32
    assert token_file.read_text().strip() == token
    assert token_file.stat().st_mode & 0o777 == 0o600

    client, again = make_app(tmp_path, token=None)
    assert again.config["aeordb.token"] == token
    assert again.config["aeordb.token_created"] is False

    client.get("/db/_plugins", headers={"Authorization": f"Bearer {token}"}, status=200)
    response = client.get("/db/_plugins", headers=AUTH, status=401)
    assert token not in response.text


def test_token_file_is_owner_only_and_token_never_logged(tmp_path, caplog):
    import logging
    import stat
    caplog.set_level(logging.DEBUG)
    client, app = make_app(tmp_path, token=None, access_log=True)
    token = app.config["aeordb.token"]
    token_file = tmp_path / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == token and len(token) >= 32
    _, again = make_app(tmp_path, token=None, access_log=True)
    assert again.config["aeordb.token"] == token and not again.config["aeordb.token_created"]
    good = {"Authorization": f"Bearer {token}"}
    bodies = []
    for value in (f"Bearer {token} ", f"Bearer {token}x", f"Basic {token}", token, f"Token {token}"):
        answer = client.get("/db/_plugins", headers={"Authorization": value}, status=401)
        bodies.append(answer.body + str(answer.headers).encode())
    module = misbehaving_module(
        "unreachable", head='(import "aeordb" "log_message" (func $log (param i32 i32 i32 i32)))',
        extra='(data (i32.const 3000) "debug") (data (i32.const 3010) "hello from the plugin")'
              '(func $start (call $log (i32.const 3000) (i32.const 5) (i32.const 3010)'
              ' (i32.const 21))) (start $start)')
    client.put("/db/s/t/_deploy", module, headers=good, status=200)
    bodies.append(client.post("/db/s/t/f/_invoke", HOSTILE_BODY, headers=good, status=500).body)
    bodies.append(client.post("/db/s/t/f/_invoke", b"", headers=good, status=200).body)
    bodies.append(client.put("/db/s/u/_deploy", b"\0asm junk", headers=good, status=400).body)
    bodies.append(client.get("/db/_files/nothing", headers=good, status=404).body)
    assert "hello from the plugin" in caplog.text          # logging was on and captured
    assert token not in caplog.text
    assert all(token.encode() not in body for body in bodies)


# Names, paths and JSON input ##################################################

def test_free_text_plugin_names_are_accepted(client):
    assert deploy(client, "db/s/t", wat(ECHO_WAT), name="My%20Plugin%20%C3%A9").json["name"] == "My Plugin é"


@pytest.mark.parametrize("name", ["n" * 129, "a%0Ab", "a%00b"])
def test_bad_plugin_names_are_refused(client, name):
    assert "name" in error_of(deploy(client, "db/s/t", wat(ECHO_WAT), status=400, name=name))


def test_deploy_parameters_that_are_not_utf8_are_refused(client):
    for query in ("name=%FF%FE", "plugin_type=%C3"):
        answer = client.put(f"/db/s/t/_deploy?{query}", wat(ECHO_WAT), headers=AUTH, status=400)
        assert "not valid UTF-8" in answer.json["error"]
    assert client.get("/db/_plugins", headers=AUTH).json == []


def test_segment_length_boundary(client):
    deploy(client, "db/s/" + "t" * 128, wat(ECHO_WAT))
    deploy(client, "db/s/" + "t" * 129, wat(ECHO_WAT), status=400)
    assert [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json] == ["db/s/" + "t" * 128]


@pytest.mark.parametrize("path", [
    "_x/s/t", "db/_s/t", "db/s/_t",                  # '_' is reserved for system routes
    "db/%2E%2E/t", "db/s/%2E", "db/s/..",            # '..' and '.'
    "d%40b/s/t", "db/s%20x/t", "db/s/t%3Bu",         # '@', space, ';'
    "db/s/" + "t" * 200, "db/s/t%C3%A9",             # too long, non-ASCII
])
def test_deploy_refuses_invalid_segments(client, path):
    response = client.put(f"/{path}/_deploy", wat(ECHO_WAT), headers=AUTH, status=400)
    assert "invalid" in error_of(response)
    assert client.get("/db/_plugins", headers=AUTH).json == []
    assert not (client.app.config["aeordb.settings"].data_dir / "plugins").exists() or \
        not any((client.app.config["aeordb.settings"].data_dir / "plugins").rglob("plugin.json"))


def test_deploy_refuses_an_encoded_slash(client):
    response = client.put("/db/s/t%2Fu/_deploy", wat(ECHO_WAT), headers=AUTH, expect_errors=True)
    assert response.status_int in (400, 404) and "error" in response.json
    assert client.get("/db/_plugins", headers=AUTH).json == []


@pytest.mark.parametrize("method, path", [
    ("POST", "/db/s/t/_f/_invoke"), ("POST", "/db/s/t/f%40/_invoke"),
    ("DELETE", "/db/s/t/_f/_remove"), ("GET", "/_db/_plugins"), ("GET", "/d%20b/_plugins"),
])
def test_invalid_segments_are_refused_on_other_routes(client, method, path):
    response = client.request(path, method=method, headers=AUTH, expect_errors=True)
    assert response.status_int == 400 and "invalid" in error_of(response)


@pytest.mark.parametrize("path", [
    "/f/_files/a/../secret.txt", "/f/_files/a/%2e%2e/secret.txt", "/f/_files/a/%2E%2E/secret.txt",
    "/f/_files/a%2f..%2fsecret.txt", "/f/_files/../f/_files/secret.txt", "/f/_files/./secret.txt",
    "/f/_files/a//secret.txt", "/other/_files/../../f/_files/secret.txt", "/../_files/secret.txt",
    "/f/_files/..", "/f/_files/%2e%2e/other/x.txt",
])
def test_file_path_traversal_never_reaches_other_files(client, path):
    put_file(client, "f", "/secret.txt", b"SECRET")
    put_file(client, "other", "/x.txt", b"OTHER")
    got = client.get(path, headers=AUTH, expect_errors=True)
    assert got.status_int in (400, 404) and b"SECRET" not in got.body and b"OTHER" not in got.body
    put = client.put(path, b"OVERWRITE", headers=AUTH, expect_errors=True)
    assert put.status_int in (400, 404, 405)
    deleted = client.delete(path, headers=AUTH, expect_errors=True)
    assert deleted.status_int in (400, 404, 405)
    assert client.get("/f/_files/secret.txt", headers=AUTH).body == b"SECRET"
    assert client.get("/other/_files/x.txt", headers=AUTH).body == b"OTHER"
    assert [e["name"] for e in client.get("/f/_files/", headers=AUTH).json["entries"]] == ["secret.txt"]


def test_load_json_reads_what_json_loads_reads():
    """UTF-8 is the fast case; a BOM or NUL bytes still mean UTF-16 or UTF-32, as for json.loads."""
    document = {"a": [1, "é€😀", {"b": None}], "s": "\ud800"}
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
        raw = json.dumps(document, ensure_ascii=False).encode(encoding, "surrogatepass")
        assert aeordb.load_json(raw) == json.loads(raw) == document, encoding
    for bad in (b"[1] x", b"\xff\xfe\x00", b"\xc3", b"{"):
        with pytest.raises(ValueError):
            aeordb.load_json(bad)


@pytest.mark.parametrize("op", ["eq", "gt", "contains", "in"])
def test_lone_surrogates_in_query_strings_are_400(client, op):
    value = b'["\\ud800"]' if op == "in" else b'"\\ud800"'
    body = b'{"where": {"field": "a", "op": "' + op.encode() + b'", "value": ' + value + b'}}'
    answer = client.post("/db/_query", body, headers=AUTH, status=400)
    assert "surrogate" in answer.json["error"]


def test_json_nested_past_the_depth_limit_is_refused_everywhere(client):
    deep = b"[" * 5000 + b"]" * 5000
    # An HTTP query body: 400 naming the cause.
    answer = client.post("/db/_query", b'{"path": "/", "where": ' + deep + b"}", headers=AUTH, status=400)
    assert "nested deeper" in answer.json["error"]
    # Host-function arguments: an error answer to the plugin, the invocation itself fine.
    deploy(client, "db/s/deep", host_call_module("aeordb_query", b'{"where": ' + deep + b"}"))
    assert "nested deeper" in json.loads(invoke(client, "db/s/deep/f").body)["error"]
    # A plugin answer nested that deep is not an envelope: it goes out raw.
    raw = b'{"status_code": 200, "body": [], "x": ' + deep + b"}"
    deploy(client, "db/s/answer", answer_module(raw))
    answer = invoke(client, "db/s/answer/f")
    assert answer.body == raw and answer.content_type == "application/octet-stream"
    # Just inside the limit, and brackets inside strings, are ordinary JSON.
    limit = aeordb.MAX_JSON_DEPTH
    assert aeordb.load_json(b"[" * limit + b"]" * limit) is not None
    assert aeordb.load_json(json.dumps({"s": "[" * 5000 + '\\"' + "{" * 5000})) == \
        {"s": "[" * 5000 + '\\"' + "{" * 5000}


# Plugin registry ##############################################################

def test_deploy_answers_metadata(client):
    import datetime
    module = wat(ECHO_WAT)
    before = datetime.datetime.now(datetime.timezone.utc)
    meta = deploy(client, "mydb/public/users", module).json
    after = datetime.datetime.now(datetime.timezone.utc)
    assert meta["name"] == "users"
    assert meta["path"] == "mydb/public/users"
    assert meta["plugin_type"] == "wasm"
    assert meta["sha256"] == sha256_hex(module)
    assert meta["size"] == len(module)
    assert isinstance(meta["plugin_id"], str) and meta["plugin_id"]
    assert meta["deployed_at"].endswith("Z")
    deployed = datetime.datetime.fromisoformat(meta["deployed_at"].replace("Z", "+00:00"))
    assert deployed.utcoffset() == datetime.timedelta(0)
    assert before - datetime.timedelta(seconds=1) <= deployed <= after + datetime.timedelta(seconds=1)


def test_deploy_takes_a_name_and_a_plugin_type(client):
    meta = deploy(client, "mydb/public/users", wat(ECHO_WAT), name="my-plugin", plugin_type="wasm").json
    assert (meta["name"], meta["plugin_type"]) == ("my-plugin", "wasm")
    listed = client.get("/mydb/_plugins", headers=AUTH).json
    assert [(p["name"], p["path"]) for p in listed] == [("my-plugin", "mydb/public/users")]


def test_redeploy_replaces(client):
    first = deploy(client, "db/s/t", answer_module(b"one")).json
    assert invoke(client, "db/s/t/f").body == b"one"
    second = deploy(client, "db/s/t", answer_module(b"two")).json
    # The same plugin, a new version: its id and creation time are kept (as AeorDB keeps them).
    assert second["plugin_id"] == first["plugin_id"] and second["sha256"] != first["sha256"]
    assert second["created_at"] == first["created_at"] and second["updated_at"] >= first["updated_at"]
    assert invoke(client, "db/s/t/f").body == b"two"
    listed = client.get("/db/_plugins", headers=AUTH).json
    assert len(listed) == 1 and listed[0]["sha256"] == second["sha256"]


def test_deploy_over_the_size_limit_is_413(tmp_path):
    client, _ = make_app(tmp_path, max_module_size=64)
    module = wat(ECHO_WAT)
    assert len(module) > 64
    assert "limit" in error_of(deploy(client, "db/s/t", module, status=413))


@pytest.mark.parametrize("body, params, fragment", [
    (b"", {}, "empty"),
    (None, {"plugin_type": "js"}, "plugin_type"),
    (bytes(random.Random(2).randrange(256) for _ in range(300)), {}, "not a valid WebAssembly"),
    (b"\0asm\x01\0\0\0garbage", {}, "not a valid WebAssembly"),
])
def test_deploy_refuses_bad_bodies(client, body, params, fragment):
    response = deploy(client, "db/s/t", wat(ECHO_WAT) if body is None else body, status=400, **params)
    assert fragment in error_of(response)
    assert client.get("/db/_plugins", headers=AUTH).json == []


def test_deploy_refuses_the_text_format(client):
    # wasmtime-py would compile WAT text, past the declared-size check, into a "module-*.wasm" of text.
    answer = deploy(client, "db/s/t", ECHO_WAT.encode(), status=400)
    assert "not a valid WebAssembly module" in answer.json["error"]
    assert client.get("/db/_plugins", headers=AUTH).json == []


ALL_HOST_IMPORTS = "\n".join(
    f'  (import "aeordb" "{name}" (func (param i32 i32) (result i64)))'
    for name in aeordb.HOST_FUNCTION_NAMES
) + '\n  (import "aeordb" "log_message" (func (param i32 i32 i32 i32)))'


@pytest.mark.parametrize("module, fragment", [
    ('(module (memory (export "memory") 1))', "handle"),
    ('(module (memory (export "memory") 1) (global (export "handle") i32 (i32.const 0)))', "handle"),
    ('(module (memory (export "memory") 1)'
     ' (func (export "handle") (param i32) (result i32) (local.get 0)))', "(i32, i32) -> i64"),
    ('(module (memory (export "memory") 1)'
     ' (func (export "handle") (param i32 i32) (result i32) (local.get 0)))', "(i32, i32) -> i64"),
    ('(module (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))', "memory"),
    ('(module (import "env" "foo" (func (param i32))) (memory (export "memory") 1)'
     ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))', "env.foo"),
    ('(module (import "aeordb" "nope" (func (param i32 i32) (result i64))) (memory (export "memory") 1)'
     ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))', "aeordb.nope"),
    ('(module (import "aeordb" "aeordb_read_file" (func (param i32) (result i64)))'
     ' (memory (export "memory") 1)'
     ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))', "aeordb.aeordb_read_file"),
])
def test_deploy_refuses_modules_off_the_abi(client, module, fragment):
    assert fragment in error_of(deploy(client, "db/s/t", wat(module), status=400))
    assert client.get("/db/_plugins", headers=AUTH).json == []


def test_deploy_names_every_unsupported_import(client):
    module = wat('(module (import "env" "foo" (func)) (import "wasi_snapshot_preview1" "sock_open"'
                 ' (func (param i32 i32 i32 i32) (result i32))) (memory (export "memory") 1)'
                 ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    error = error_of(deploy(client, "db/s/t", module, status=400))
    assert "env.foo" in error and "wasi_snapshot_preview1.sock_open" in error


def test_deploy_accepts_every_host_import(client):
    module = wat(f"""
(module
{ALL_HOST_IMPORTS}
  (memory (export "memory") 1)
  (data (i32.const 4096) "ok")
  (func (export "handle") (param i32 i32) (result i64) (i64.const 0x0000100000000002)))
""")
    deploy(client, "db/s/t", module)
    assert invoke(client, "db/s/t/f").body == b"ok"


def test_deploy_does_not_run_the_start_function(client):
    module = wat('(module (memory (export "memory") 1) (func $boom unreachable) (start $boom)'
                 ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    deploy(client, "db/s/t", module)
    assert "unreachable" in error_of(invoke(client, "db/s/t/f", status=500))


def test_refused_redeploy_keeps_the_old_plugin(tmp_path):
    client, _ = make_app(tmp_path)
    meta = deploy(client, "db/s/t", answer_module(b"old")).json
    deploy(client, "db/s/t", wat('(module (memory (export "memory") 1))'), status=400)
    deploy(client, "db/s/t", b"junk", status=400)
    deploy(client, "db/s/t", b"", status=400)
    assert invoke(client, "db/s/t/f").body == b"old"
    assert client.get("/db/_plugins", headers=AUTH).json == [meta]
    assert [p.name for p in (tmp_path / "plugins" / "db" / "s" / "t").glob("module-*.wasm")] == \
        [f"module-{meta['sha256']}.wasm"]
    again, _ = make_app(tmp_path)
    assert invoke(again, "db/s/t/f").body == b"old"


def test_invoke_of_an_unknown_plugin_is_404(client):
    assert "db/s/t" in error_of(invoke(client, "db/s/t/f", b"x", status=404))


def test_list_is_scoped_to_one_database(client):
    for path in ("a/s/t", "a/s/u", "a/x/t", "b/s/t"):
        deploy(client, path, wat(ECHO_WAT))
    listed_a = client.get("/a/_plugins", headers=AUTH).json
    listed_b = client.get("/b/_plugins", headers=AUTH).json
    assert sorted(p["path"] for p in listed_a) == ["a/s/t", "a/s/u", "a/x/t"]
    assert [p["path"] for p in listed_b] == ["b/s/t"]
    assert client.get("/c/_plugins", headers=AUTH).json == []
    for entry in listed_a + listed_b:
        assert {"name", "path", "plugin_type", "deployed_at"} <= set(entry)
        assert entry["plugin_type"] == "wasm"


def test_list_does_not_mix_databases_sharing_a_prefix(client):
    deploy(client, "ab/s/t", wat(ECHO_WAT))
    assert client.get("/a/_plugins", headers=AUTH).json == []
    assert [p["path"] for p in client.get("/ab/_plugins", headers=AUTH).json] == ["ab/s/t"]


def test_remove_of_an_unknown_plugin_is_404(client):
    assert "error" in client.delete("/db/s/t/f/_remove", headers=AUTH, status=404).json


def test_remove_takes_the_plugin_away(client):
    deploy(client, "db/schema/table", wat(ECHO_WAT))
    deploy(client, "db/schema/other", wat(ECHO_WAT))
    response = client.delete("/db/schema/table/anything/_remove", headers=AUTH, status=200)
    assert response.json == {"removed": True, "path": "db/schema/table"}
    assert "db/schema/table" in error_of(
        client.delete("/db/schema/table/anything/_remove", headers=AUTH, status=404))
    invoke(client, "db/schema/table/f", status=404)
    assert [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json] == ["db/schema/other"]
    invoke(client, "db/schema/other/f")


def test_plugins_survive_a_restart(tmp_path):
    client, _ = make_app(tmp_path)
    module = answer_module(b"persisted")
    meta = deploy(client, "db/s/t", module, name="kept").json
    deploy(client, "db/s/gone", answer_module(b"x"))
    client.delete("/db/s/gone/f/_remove", headers=AUTH)

    again, _ = make_app(tmp_path)
    assert again.get("/db/_plugins", headers=AUTH).json == [meta]
    assert invoke(again, "db/s/t/f").body == b"persisted"
    invoke(again, "db/s/gone/f", status=404)
    again.delete("/db/s/t/f/_remove", headers=AUTH)

    third, _ = make_app(tmp_path)
    assert third.get("/db/_plugins", headers=AUTH).json == []
    invoke(third, "db/s/t/f", status=404)


def test_on_disk_layout_is_ordinary_files(tmp_path):
    client, _ = make_app(tmp_path)
    old = answer_module(b"old")
    deploy(client, "db/s/t", old)
    module = answer_module(b"new")
    meta = deploy(client, "db/s/t", module).json
    folder = tmp_path / "plugins" / "db" / "s" / "t"
    assert json.loads((folder / "plugin.json").read_text()) == meta
    sha = sha256_hex(module)
    assert (folder / f"module-{sha}.wasm").read_bytes() == module
    assert sorted(p.name for p in folder.iterdir()) == ["module-" + sha + ".wasm", "plugin.json"]
    artifacts = list((tmp_path / "cache").glob(f"{sha}-*.cwasm"))
    assert len(artifacts) == 1 and artifacts[0].stat().st_size > 0

    client.delete("/db/s/t/f/_remove", headers=AUTH)
    assert not folder.exists()


def test_new_plugin_folders_are_fsynced_into_their_parents(client, tmp_path, monkeypatch):
    synced, real_fsync_dir = [], aeordb.fsync_dir

    def recording(directory):
        synced.append(Path(directory))
        real_fsync_dir(directory)
    monkeypatch.setattr(aeordb, "fsync_dir", recording)
    deploy(client, "db/s/t", wat(ECHO_WAT))
    plugins = tmp_path / "plugins"
    for parent in (tmp_path, plugins, plugins / "db", plugins / "db" / "s", plugins / "db" / "s" / "t"):
        assert parent in synced, parent


def test_copied_plugins_folder_is_loaded(tmp_path):
    # An operator can back up and copy plugins as files.
    client, _ = make_app(tmp_path / "one")
    meta = deploy(client, "db/s/t", answer_module(b"copied")).json
    import shutil
    shutil.copytree(tmp_path / "one" / "plugins", tmp_path / "two" / "plugins")
    other, _ = make_app(tmp_path / "two")
    assert other.get("/db/_plugins", headers=AUTH).json == [meta]
    assert invoke(other, "db/s/t/f").body == b"copied"


def test_copied_plugin_folder_takes_the_path_of_its_folder(tmp_path):
    # An operator copies a plugin folder to another table: both plugins exist after a restart,
    # each at the path of its folder (plugin.json's "path" must not shadow the original).
    client, _ = make_app(tmp_path)
    deploy(client, "db/s/t", answer_module(b"same module"))
    import shutil
    shutil.copytree(tmp_path / "plugins" / "db" / "s" / "t", tmp_path / "plugins" / "db" / "s" / "u")
    again, _ = make_app(tmp_path)
    assert sorted(p["path"] for p in again.get("/db/_plugins", headers=AUTH).json) == ["db/s/t", "db/s/u"]
    again.delete("/db/s/u/f/_remove", headers=AUTH, status=200)
    third, _ = make_app(tmp_path)
    assert [p["path"] for p in third.get("/db/_plugins", headers=AUTH).json] == ["db/s/t"]
    assert invoke(third, "db/s/t/f").body == b"same module"


def test_missing_artifact_is_recompiled(tmp_path):
    client, _ = make_app(tmp_path)
    deploy(client, "db/s/t", answer_module(b"fine"))
    for artifact in (tmp_path / "cache").glob("*.cwasm"):
        artifact.unlink()
    again, _ = make_app(tmp_path)
    assert invoke(again, "db/s/t/f").body == b"fine"
    assert list((tmp_path / "cache").glob("*.cwasm"))


@pytest.mark.parametrize("damage", ["garbage", "payload-end", "payload-middle", "truncate", "empty"])
def test_damaged_artifact_is_recompiled(tmp_path, damage):
    client, _ = make_app(tmp_path)
    module = answer_module(b"still works")
    deploy(client, "db/s/t", module)
    sha = sha256_hex(module)
    [artifact] = (tmp_path / "cache").glob(f"{sha}-*.cwasm")
    blob = artifact.read_bytes()
    damaged = {"garbage": os.urandom(len(blob)),
               "payload-end": blob[:-200] + bytes(b ^ 0xFF for b in blob[-200:]),
               # wasmtime itself may accept this one: only our hash notices it
               "payload-middle": flip_middle(blob),
               "truncate": blob[:len(blob) // 2],
               "empty": b""}[damage]
    artifact.write_bytes(damaged)

    again, _ = make_app(tmp_path)
    # Detected at start: the artifact was rebuilt before anything ran from it.
    repaired = artifact.read_bytes()
    assert repaired != damaged and repaired.startswith(aeordb.ARTIFACT_MAGIC)
    header = len(aeordb.ARTIFACT_MAGIC) + 64
    assert repaired[len(aeordb.ARTIFACT_MAGIC):header].decode() == sha256_hex(repaired[header:])
    assert invoke(again, "db/s/t/f").body == b"still works"


def test_tampered_module_file_is_not_loaded(tmp_path):
    client, _ = make_app(tmp_path)
    module = answer_module(b"original")
    deploy(client, "db/s/t", module)
    deploy(client, "db/s/u", answer_module(b"other"))
    sha = sha256_hex(module)
    for artifact in (tmp_path / "cache").glob(f"{sha}-*.cwasm"):
        artifact.unlink()
    (tmp_path / "plugins" / "db" / "s" / "t" / f"module-{sha}.wasm").write_bytes(answer_module(b"evil"))
    again, _ = make_app(tmp_path)
    invoke(again, "db/s/t/f", status=404)
    assert invoke(again, "db/s/u/f").body == b"other"


def test_concurrent_redeploys_leave_a_loadable_plugin(tmp_path):
    # A deploy that commits first must not delete the module file of a deploy still in flight.
    client, app = make_app(tmp_path)
    registry = app.config["aeordb.registry"]
    first, second = answer_module(b"first"), answer_module(b"second")
    second_file = tmp_path / "plugins" / "db" / "s" / "t" / f"module-{sha256_hex(second)}.wasm"
    registry._lock = GatedLock(registry._lock, lambda lock: wait_for(
        lambda: second_file.exists() or lock.waiting.is_set()))

    results = {}
    def run(label, module):
        results[label] = registry.deploy("db", "s", "t", module, "t", "wasm")
    threads = [threading.Thread(target=run, args=("first", first))]
    threads[0].start()
    wait_for(lambda: registry._lock.first is not None or not threads[0].is_alive())
    threads.append(threading.Thread(target=run, args=("second", second)))
    threads[1].start()
    for thread in threads:
        thread.join(timeout=20)
    assert set(results) == {"first", "second"}

    answer = invoke(client, "db/s/t/f").body
    assert answer in (b"first", b"second")
    meta = json.loads((tmp_path / "plugins" / "db" / "s" / "t" / "plugin.json").read_text())
    assert (tmp_path / "plugins" / "db" / "s" / "t" / f"module-{meta['sha256']}.wasm").exists()
    assert invoke(restart_without_cache(tmp_path), "db/s/t/f").body == answer


def test_remove_during_a_deploy_leaves_a_consistent_registry(tmp_path):
    client, app = make_app(tmp_path)
    registry = app.config["aeordb.registry"]
    deploy(client, "db/s/t", answer_module(b"old"))
    new = answer_module(b"new")
    folder = tmp_path / "plugins" / "db" / "s" / "t"
    removed = threading.Event()

    def remove_in_between(lock):
        # The deploy is about to commit: a remove of the same path runs meanwhile
        # (or waits for the lock, if the deploy's writes are already under it).
        worker = threading.Thread(target=lambda: (registry.remove("db", "s", "t"), removed.set()))
        worker.start()
        wait_for(lambda: removed.is_set() or lock.waiting.is_set())
    registry._lock = GatedLock(registry._lock, remove_in_between)
    registry.deploy("db", "s", "t", new, "t", "wasm")
    assert removed.wait(timeout=10)
    live = [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json]
    assert sorted(p.name for p in folder.glob("*")) == \
        (["module-" + sha256_hex(new) + ".wasm", "plugin.json"] if live else [])
    again = restart_without_cache(tmp_path)
    assert [p["path"] for p in again.get("/db/_plugins", headers=AUTH).json] == live


def test_a_process_that_cannot_load_a_replaced_plugin_stops_serving_the_old_one(tmp_path, monkeypatch):
    first, _ = make_app(tmp_path)
    second, second_app = make_app(tmp_path)
    deploy(first, "db/s/t", wat(ECHO_WAT))
    invoke(second, "db/s/t/f", b"hi")
    registry = second_app.config["aeordb.registry"]
    monkeypatch.setattr(registry, "_load_folder", lambda folder: None)   # say, out of memory while compiling
    deploy(first, "db/s/t", wat(TRAP_WAT))
    error_of(invoke(second, "db/s/t/f", b"hi", status=404))
    monkeypatch.undo()
    deploy(first, "db/s/t", wat(ECHO_WAT))
    assert json.loads(invoke(second, "db/s/t/f", b"hi").body)["arguments"] == [104, 105]


@pytest.mark.parametrize("counter", ["mapped", "pread"])
def test_apps_sharing_a_data_dir_see_each_others_changes_at_once(tmp_path, monkeypatch, counter):
    """Processes serving one data dir: the disk, not one process's memory, says what is deployed."""
    if counter == "pread":   # where the counter's file cannot be mapped
        def unmappable(*args, **kwargs):
            raise OSError("no mmap here")
        monkeypatch.setattr(aeordb.mmap, "mmap", unmappable)
    first, first_app = make_app(tmp_path)
    assert (first_app.config["aeordb.registry"].changes._map is None) == (counter == "pread")
    second, _ = make_app(tmp_path)
    echo, trap = wat(ECHO_WAT), wat(TRAP_WAT)
    deploy(first, "db/s/t", echo)
    assert json.loads(invoke(second, "db/s/t/f", b"hi").body)["arguments"] == [104, 105]
    deploy(first, "db/s/t", trap)   # replaced: the very next request elsewhere runs the new module
    assert "unreachable" in error_of(invoke(second, "db/s/t/f", b"hi", status=500))
    deploy(second, "db/s/u", echo)
    listings = [[m["path"] for m in app.get("/db/_plugins", headers=AUTH).json] for app in (first, second)]
    assert listings == [["db/s/t", "db/s/u"]] * 2
    # second's deploy pruned the cache knowing what first deployed: both artifacts stay.
    assert {a.name.split("-")[0] for a in (tmp_path / "cache").glob("*.cwasm")} == {sha256_hex(echo), sha256_hex(trap)}
    first.delete("/db/s/t/f/_remove", headers=AUTH)
    error_of(invoke(second, "db/s/t/f", status=404))
    second.delete("/db/s/u/f/_remove", headers=AUTH)
    first.delete("/db/s/u/f/_remove", headers=AUTH, status=404)
    assert first.get("/db/_plugins", headers=AUTH).json == [] == second.get("/db/_plugins", headers=AUTH).json
    deploy(second, "db/s/t", echo)   # a path removed elsewhere, deployed again
    assert json.loads(invoke(first, "db/s/t/f", b"ok").body)["arguments"] == [111, 107]


def test_a_start_leaves_another_live_processs_writes_in_flight_alone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()   # reaped: its pid names no process now
    folder = tmp_path / "plugins" / "db" / "s" / "t"
    folder.mkdir(parents=True)
    mark = aeordb.TEMP_MARK
    in_flight = folder / f"plugin.json{mark}{os.getppid()}-abc"   # a live process is writing it
    crashed = [folder / f"plugin.json{mark}{gone.pid}-abc", folder / f"plugin.json{mark}{os.getpid()}-old",
               folder / f"plugin.json{mark}oldstyle"]
    for temp in [in_flight] + crashed:
        temp.write_bytes(b"partial")
    make_app(tmp_path)
    assert [p.name for p in folder.iterdir()] == [in_flight.name]


# WASM runtime and limits ######################################################
# The fast guest path (below wasmtime-py's public API) and the public-API
# fallback must behave the same; so must pooled and on-demand allocation.

def test_trap_is_a_500_with_the_reason(client):
    deploy(client, "db/s/t", wat('(module (memory (export "memory") 1)'
                                  ' (func (export "handle") (param i32 i32) (result i64)'
                                  ' (i64.extend_i32_s (i32.div_s (i32.const 1) (i32.const 0)))))'))
    assert "division by zero" in error_of(invoke(client, "db/s/t/f", status=500))


def test_bad_answer_pointer_is_a_500(client):
    deploy(client, "db/s/t", wat('(module (memory (export "memory") 1)'
                                  ' (func (export "handle") (param i32 i32) (result i64)'
                                  ' (i64.const 0x0000FFFF00000010)))'))
    assert "pointer" in error_of(invoke(client, "db/s/t/f", status=500))


def test_endless_loop_hits_the_time_limit(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.5)
    deploy(client, "db/s/loop", wat(LOOP_WAT))
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    started = time.monotonic()
    error = error_of(invoke(client, "db/s/loop/f", status=500))
    elapsed = time.monotonic() - started
    assert "time limit" in error and "0.5" in error
    assert 0.4 <= elapsed < 5
    assert json.loads(invoke(client, "db/s/echo/f", b"ok").body)["arguments"] == [111, 107]
    assert "time limit" in error_of(invoke(client, "db/s/loop/f", status=500))


# A handle that grows memory until memory.grow fails, then aborts like Rust's allocator.
MEMORY_BOMB_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param i32 i32) (result i64)
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
"""


def test_memory_bomb_hits_the_memory_limit(tmp_path):
    client, _ = make_app(tmp_path, memory_limit=4 * 1024 * 1024)
    deploy(client, "db/s/bomb", wat(MEMORY_BOMB_WAT))
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    error = error_of(invoke(client, "db/s/bomb/f", status=500))
    assert "memory limit" in error
    assert json.loads(invoke(client, "db/s/echo/f", b"ok").body)["arguments"] == [111, 107]


RUNTIME_PATHS = [
    pytest.param({"fast_calls": True, "engine": "pooling"}, id="fast-pooled"),
    pytest.param({"fast_calls": True, "engine": "bounded-pooling"}, id="fast-bounded"),
    pytest.param({"fast_calls": True, "engine": "on-demand"}, id="fast-ondemand"),
    pytest.param({"fast_calls": False, "engine": "pooling"}, id="public-pooled"),
    pytest.param({"fast_calls": False, "engine": "bounded-pooling"}, id="public-bounded"),
    pytest.param({"fast_calls": False, "engine": "on-demand"}, id="public-ondemand"),
]


@pytest.mark.parametrize("options", RUNTIME_PATHS)
def test_tables_within_the_limit_run_on_every_allocator(tmp_path, options):
    client, _ = make_app(tmp_path, options=options)
    module = wat('(module (memory (export "memory") 1) (table 30000 funcref) (table $b 2 funcref)'
                 ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    deploy(client, "db/s/tables", module)
    assert invoke(client, "db/s/tables/f").body == b""


ENV_MEMORY_ECHO_WAT = """
(module
  (import "env" "memory" (memory 1))
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
"""


ALLOC_ECHO_WAT = f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
"""


@pytest.mark.parametrize("options", RUNTIME_PATHS)
def test_runtime_paths_agree(tmp_path, options):
    client, app = make_app(tmp_path, options=options, timeout=0.5)
    expected_ops = aeordb.FastGuestOps if options["fast_calls"] else aeordb.GuestOps
    assert type(app.config["aeordb.runtime"].wasm.ops) is expected_ops
    assert app.config["aeordb.runtime"].wasm.mode == options["engine"]
    # The time limit below is met by the epoch timer on the fast path (Linux), by a thread otherwise.
    expected_ticker = "timer" if options["fast_calls"] and sys.platform.startswith("linux") else "thread"
    assert app.config["aeordb.runtime"].wasm.ticker == expected_ticker
    body = bytes(range(256)) * 3

    deploy(client, "db/s/plain", wat(ECHO_WAT))
    deploy(client, "db/s/alloc", wat(ALLOC_ECHO_WAT))
    deploy(client, "db/s/envmem", wat(ENV_MEMORY_ECHO_WAT))
    for table in ("plain", "alloc", "envmem"):
        envelope = json.loads(invoke(client, f"db/s/{table}/f", body).body)
        assert bytes(envelope["arguments"]) == body, table
        assert envelope["metadata"]["plugin_path"] == f"db/s/{table}"

    # A host call that answers through alloc, and one through offset 0.
    client.put("/db/_files/a.txt", b"payload", headers=AUTH, content_type="text/plain")
    deploy(client, "db/s/host", host_call_module("aeordb_read_file", b'{"path": "/a.txt"}'))
    answer = json.loads(invoke(client, "db/s/host/f").body)
    assert base64.b64decode(answer["data"]) == b"payload"

    # Traps and the time limit surface the same way on every path.
    deploy(client, "db/s/trap", wat(TRAP_WAT))
    assert "unreachable" in invoke(client, "db/s/trap/f", status=500).json["error"]
    deploy(client, "db/s/loop", wat(LOOP_WAT))
    assert "time limit" in invoke(client, "db/s/loop/f", status=500).json["error"]
    # ...and the plugin after them still works.
    assert bytes(json.loads(invoke(client, "db/s/alloc/f", b"ok").body)["arguments"]) == b"ok"


def test_fast_path_is_feature_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(aeordb.FastGuestOps, "_NEEDS", ("no_such_wasmtime_symbol",))
    assert not aeordb.FastGuestOps.available()
    # Without timer_create (say, not Linux) the epoch is ticked by a thread.
    monkeypatch.setattr(aeordb.sys, "platform", "darwin")
    # A fresh engine key, so the detection runs again for this app.
    client, app = make_app(tmp_path, options={"fast_calls": True, "engine": "on-demand"},
                           memory_limit=32 << 20, timeout=0.3)
    wasm = app.config["aeordb.runtime"].wasm
    assert type(wasm.ops) is aeordb.GuestOps and wasm.ticker == "thread"
    deploy(client, "db/s/t", wat(ECHO_WAT))
    assert json.loads(invoke(client, "db/s/t/f", b"x").body)["arguments"] == [120]
    deploy(client, "db/s/loop", wat(LOOP_WAT))
    assert "time limit" in invoke(client, "db/s/loop/f", status=500).json["error"]


START_SECTION_WAT = '(module (memory (export "memory") 1) (func $s) (start $s)' + \
    ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))'


def test_quick_instantiation_detection(tmp_path):
    """Only a module without a start function and with little data is instantiated holding the GIL.

    Unsure means slow: a binary not read to its end, or one not at hand.
    """
    big_data = wat('(module (memory (export "memory") 17) (data (i32.const 0) "'
                   + "\\00" * (aeordb.QUICK_DATA + 1) + '")'
                   ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    client, app = make_app(tmp_path)
    deploy(client, "db/s/plain", wat(ECHO_WAT))
    deploy(client, "db/s/starts", wat(START_SECTION_WAT))
    deploy(client, "db/s/big", big_data)
    registry = app.config["aeordb.registry"]
    assert registry.get("db/s/plain").shape.quick_instantiate is True
    assert registry.get("db/s/starts").shape.quick_instantiate is False
    assert registry.get("db/s/big").shape.quick_instantiate is False
    assert aeordb.instantiates_quickly(wat(ECHO_WAT))
    assert not aeordb.instantiates_quickly(wat(START_SECTION_WAT))
    assert not aeordb.instantiates_quickly(big_data)
    assert aeordb.instantiates_quickly(wat('(module (memory 1) (data (i32.const 0) "' + "\\01" * 1000 + '"))'))
    # Past 1,000 sections, or at a section it cannot read, the scan gives up: slow.
    many_sections = b"\0asm\1\0\0\0" + b"\0\1a" * 1001   # one-byte custom sections
    assert aeordb.instantiates_quickly(many_sections[:8 + 3 * 1000])
    assert not aeordb.instantiates_quickly(many_sections)
    assert not aeordb.instantiates_quickly(wat(ECHO_WAT)[:-3])   # the last section cut short

    # After a restart the shape comes from the verified module file; without it, slow.
    _, again = make_app(tmp_path)
    assert again.config["aeordb.registry"].get("db/s/plain").shape.quick_instantiate is True
    for module_file in (tmp_path / "plugins" / "db" / "s" / "plain").glob("module-*.wasm"):
        module_file.write_bytes(module_file.read_bytes() + b"tampered")
    client_after, tampered = make_app(tmp_path)
    plugin = tampered.config["aeordb.registry"].get("db/s/plain")   # runs from its artifact
    assert plugin.shape.quick_instantiate is False
    assert json.loads(invoke(client_after, "db/s/plain/f", b"x").body)["arguments"] == [120]


def test_start_function_that_loops_is_bounded(tmp_path):
    """The start function never runs at deploy; at invoke it meets the time limit like handle would."""
    client, _ = make_app(tmp_path, timeout=0.5)
    module = misbehaving_module("", extra="(func $spin (loop $forever (br $forever))) (start $spin)")
    started = time.monotonic()
    deploy(client, "db/s/spin", module, status=200)
    assert time.monotonic() - started < 2.0
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    started = time.monotonic()
    assert "time limit" in error_of(invoke(client, "db/s/spin/f", status=500))
    assert time.monotonic() - started < 2.0
    # A restart loads it without running it.
    started = time.monotonic()
    make_app(tmp_path, timeout=0.5)
    assert time.monotonic() - started < 5.0
    assert json.loads(invoke(client, "db/s/echo/f", b"x").body)["arguments"] == [120]


HOLDING_THE_GIL_SCRIPT = """
import ctypes, sys, wasmtime
import aeordb
from wasmtime import _bindings as bindings, _ffi as ffi
wasm = aeordb.Wasm.shared(64 << 20, 10000)
assert wasm.ticker == "timer", wasm.ticker
holding = ctypes.PyDLL(ffi.dll._name, handle=ffi.dll._handle).wasmtime_func_call
holding.restype, holding.argtypes = bindings._wasmtime_func_call.restype, bindings._wasmtime_func_call.argtypes
store = wasmtime.Store(wasm.engine)
store.set_epoch_deadline(20)
module = wasmtime.Module(wasm.engine, sys.argv[1])
spin = wasmtime.Instance(store, module, []).exports(store)["handle"]
params = (ffi.wasmtime_val_t * 2)()
for param in params:
    param.kind = ffi.WASMTIME_I32.value
results, trap = (ffi.wasmtime_val_t * 1)(), ctypes.POINTER(ffi.wasm_trap_t)()
# No Python thread could tick now: this call keeps the GIL until the guest stops.
error = holding(store._context(), ctypes.byref(spin._func), params, 2, results, 1, ctypes.byref(trap))
assert not error and trap
print(wasmtime.Trap._from_ptr(trap).trap_code.name)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the epoch timer is Linux's timer_create")
def test_epoch_timer_ticks_without_the_gil():
    """The timer calls wasmtime itself: it interrupts a guest while Python holds the GIL throughout."""
    done = run_python(HOLDING_THE_GIL_SCRIPT, LOOP_WAT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "INTERRUPT"


STOPPED_TIMER_SCRIPT = """
import logging, sys, wasmtime
import aeordb
logging.basicConfig(level=logging.ERROR)
aeordb.Wasm._start_epoch_timer = classmethod(lambda cls, engine: True)   # a timer that never ticks
wasm = aeordb.Wasm.shared(64 << 20, 10000)
assert wasm.ticker == "timer", wasm.ticker
store = wasmtime.Store(wasm.engine)
store.set_epoch_deadline(10)
spin = wasmtime.Instance(store, wasmtime.Module(wasm.engine, sys.argv[1]), []).exports(store)["handle"]
try:
    spin(store, 0, 0)
except wasmtime.Trap as trap:
    print(trap.trap_code.name, wasm.ticker)
"""


def test_a_stopped_epoch_timer_is_taken_over():
    """Should the timer stop ticking, the watching thread notices and ticks instead: no guest runs
    forever, and none holds the GIL from then on (the thread could not tick)."""
    done = run_python(STOPPED_TIMER_SCRIPT, LOOP_WAT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "INTERRUPT thread"
    assert "the epoch timer stopped ticking" in done.stderr


TICKER_THREAD_SCRIPT = """
import pathlib, sys, tempfile, wasmtime, webtest
import aeordb
aeordb.Wasm._start_epoch_timer = classmethod(lambda cls, engine: False)   # no timer: a ticker thread
app = aeordb.create_app(aeordb.Settings(data_dir=pathlib.Path(tempfile.mkdtemp()), token="t" * 16, timeout=1))
client = webtest.TestApp(app)
auth = {"Authorization": "Bearer " + "t" * 16}
client.put("/db/s/spin/_deploy", wasmtime.wat2wasm(sys.argv[1]), headers=auth)
answer = client.post("/db/s/spin/f/_invoke", b"", headers=auth, expect_errors=True)
print(app.config["aeordb.runtime"].wasm.ticker, answer.status_int, answer.json["error"])
"""


def test_a_guest_never_holds_the_gil_when_a_thread_ticks_the_epoch():
    """The ticker thread needs the GIL to tick: a looping guest holding it would never be stopped."""
    done = run_python(TICKER_THREAD_SCRIPT, GUEST_LOOPS["handle"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "thread 500 plugin invocation failed: time limit of 1 s exceeded"


GUEST_LOOPS = {
    "handle": '(module (memory (export "memory") 1)'
              ' (func (export "handle") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0)))',
    "alloc": '(module (memory (export "memory") 1)'
             ' (func (export "alloc") (param i32) (result i32) (loop $l (br $l)) (i32.const 0))'
             ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))',
    "start": '(module (memory (export "memory") 1) (func $spin (loop $l (br $l))) (start $spin)'
             ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))',
}


@contextlib.contextmanager
def longest_stall():
    """Yields a list whose item, once the block ended, is the longest time (s) another thread
    of this process, one that needs the GIL to go on as a server's threads do, stood still."""
    watching, done, stall = threading.Event(), threading.Event(), [0.0]

    def watch() -> None:
        last = time.monotonic()
        watching.set()
        while not done.is_set():
            now = time.monotonic()
            stall[0], last = max(stall[0], now - last), now
    watcher = threading.Thread(target=watch)
    watcher.start()
    assert watching.wait(10)
    try:
        yield stall
    finally:
        done.set()
        watcher.join()


@pytest.mark.parametrize("options", [path for path in RUNTIME_PATHS if path.id in ("fast-pooled", "fast-ondemand")])
@pytest.mark.parametrize("where", sorted(GUEST_LOOPS))
def test_looping_guest_never_holds_the_gil(tmp_path, options, where):
    """While a guest spins in handle, alloc or its start function, this thread runs on.

    (The epoch timer would stop such a guest even with the GIL held: only the
    gaps this thread sees show whether other requests were stalled. The public
    API path leaves every such call to wasmtime-py, which always releases it.)
    """
    client, app = make_app(tmp_path, options=options, timeout=1)
    deploy(client, "db/s/spin", wat(GUEST_LOOPS[where]))
    with longest_stall() as stall:
        response = invoke(client, "db/s/spin/f", b"x", status=500)
    assert "time limit" in response.json["error"]
    assert stall[0] < 0.4, f"another thread stood still for {stall[0]:.2f} s while the guest ran"


def counting_held_calls(app, monkeypatch) -> list:
    """A list that grows by one at every guest call made with the GIL held."""
    ops, held = app.config["aeordb.runtime"].wasm.ops, []
    holding = ops.func_call_holding

    def counted(*args):
        held.append(1)
        return holding(*args)
    monkeypatch.setattr(ops, "func_call_holding", counted)
    return held


def test_a_quick_guest_runs_with_the_gil_held(tmp_path, monkeypatch):
    client, app = make_app(tmp_path)
    held = counting_held_calls(app, monkeypatch)
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    deploy(client, "db/s/wasi", wasi_module(imports=FD_WRITE, body="(i64.const 0)"))
    for _ in range(20):
        assert invoke(client, "db/s/echo/f", b"hi").status_int == 200
    # Every call held it, unless one was held up past the hold (a loaded machine): then it stopped.
    holding = app.config["aeordb.registry"].get("db/s/echo").holds_gil
    assert held and (len(held) == 20) == holding, (len(held), holding)
    # wasmtime's WASI calls back into Python from another thread: never with the GIL held.
    count = len(held)
    assert invoke(client, "db/s/wasi/f", b"hi").status_int == 200 and len(held) == count
    # The public API cannot hold it, and a time limit within the hold leaves no room to.
    assert not make_app(tmp_path / "public", options={"fast_calls": False})[1].config["aeordb.runtime"].may_hold
    assert not make_app(tmp_path / "brief", timeout=aeordb.HOLD_TICKS * aeordb.EPOCH_TICK)[1].config[
        "aeordb.runtime"].may_hold


def test_a_guest_past_the_hold_starts_over_with_the_gil_released(tmp_path, monkeypatch):
    """Its first call runs with the GIL held until HOLD_TICKS, then starts over: one write, one
    log line, one set of host calls counted; the other threads stood still no longer than the hold."""
    client, app = make_app(tmp_path, timeout=30)
    held = counting_held_calls(app, monkeypatch)
    module = sequence_module([write_step("/slow.txt", b"once"), ("log_message", b"info", b"spun")], tail="spin",
                             alloc=False)
    deploy(client, "db/s/slow", module)
    with longest_stall() as stall:
        assert invoke(client, "db/s/slow/f", b"x").status_int == 200
    assert len(held) == 1 and not app.config["aeordb.registry"].get("db/s/slow").holds_gil
    assert stall[0] < 0.3, f"another thread stood still for {stall[0]:.2f} s"
    assert client.get("/db/_files/slow.txt", headers=AUTH).body == b"once"
    lines = client.get("/db/s/slow/_logs", headers=AUTH).json["lines"]
    assert [line["message"] for line in lines] == ["spun"], lines
    assert client.get("/db/s/slow/_stats", headers=AUTH).json["invocations"] == 1
    metrics = client.get("/_metrics", headers=AUTH).text
    host_calls = re.findall(r'^aeordb_host_calls_total\{.*table="slow".*function="(\w+)".*\} (\S+)$', metrics, re.M)
    assert dict(host_calls) == {"aeordb_write_file": "1"}, metrics
    # From now on its calls release the GIL from the start.
    assert invoke(client, "db/s/slow/f", b"x").status_int == 200 and len(held) == 1


# Envelope #####################################################################

def test_echo_answers_its_own_envelope_verbatim(deployed):
    client, path = deployed
    response = invoke(client, f"{path}/f", b"hi")
    assert response.content_type == "application/octet-stream"
    assert response.body.startswith(b'{"arguments":')


def test_request_envelope_of_an_empty_body(client):
    assert envelope_of(client, b"")["arguments"] == []


def test_request_envelope_carries_every_byte(client):
    data = bytes(range(256))
    assert envelope_of(client, data)["arguments"] == list(range(256))


def test_request_envelope_metadata(client):
    envelope = envelope_of(client, b"{}", query="a=1&b=two",
                           headers={"Content-Type": "application/json"})
    metadata = envelope["metadata"]
    assert metadata["function_name"] == "function"
    assert metadata["path"] == "/db/schema/table/function"
    assert metadata["plugin_path"] == "db/schema/table"
    assert metadata["method"] == "POST"
    assert metadata["query_string"] == "a=1&b=two"
    assert metadata["content_type"] == "application/json"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert set(envelope) == {"arguments", "metadata"}


def test_request_envelope_metadata_without_query_or_content_type(deployed):
    client, path = deployed
    metadata = json.loads(client.post(f"/{path}/f/_invoke", headers=AUTH, status=200).body)["metadata"]
    assert metadata["query_string"] == ""
    assert all(isinstance(v, str) for v in metadata.values())


def test_request_is_placed_with_alloc(client):
    # ECHO with alloc: the request must arrive where alloc said (65536), not at 0.
    module = wat(f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.ne (local.get $ptr) (i32.const 65536)) (then unreachable))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
""")
    deploy(client, "db/s/t", module)
    assert json.loads(invoke(client, "db/s/t/f", b"ab").body)["arguments"] == [97, 98]


def test_response_envelope_string_body(client):
    response = answer_with(client, '{"status_code":200,"content_type":"text/plain","body":"héllo"}'.encode())
    assert response.body == "héllo".encode("utf-8")
    assert response.content_type == "text/plain"


def test_response_envelope_byte_array_body(client):
    response = answer_with(client, b'{"status_code":201,"content_type":"text/plain; charset=utf-8",'
                                   b'"headers":{"x-custom":"yes"},"body":[72,105]}', status=201)
    assert response.body == b"Hi"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["x-custom"] == "yes"


@pytest.mark.parametrize("status", [200, 202, 204, 302, 404, 418, 503, 599])
def test_response_envelope_statuses_pass_through(client, status):
    body = b"[]" if status in (204,) else b"[111,107]"
    response = answer_with(client, b'{"status_code":%d,"body":%s}' % (status, body), status=status)
    assert response.body == (b"" if status == 204 else b"ok")


@pytest.mark.parametrize("content_type", ["", ',"content_type":null', ',"content_type":""'])
def test_response_envelope_default_content_type(client, content_type):
    response = answer_with(client, b'{"status_code":200%s,"body":[1]}' % content_type.encode())
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.body == b"\x01"


@pytest.mark.parametrize("code", [99, 0, -200, 600, 1000])
def test_response_status_out_of_range_is_500(client, code):
    response = answer_with(client, b'{"status_code":%d,"body":[1]}' % code, status=500)
    assert str(code) in error_of(response)


@pytest.mark.parametrize("raw", [
    b"hello, not json",
    b"",
    b"[1,2,3]",
    b'"just a string"',
    b'{"status_code":"200","body":[1]}',
    b'{"status_code":200.5,"body":[1]}',
    b'{"status_code":200.0,"body":[1]}',
    b'{"status_code":true,"body":[1]}',
    b'{"status_code":null,"body":[1]}',
    b'{"body":[1]}',
    b'{"status_code":200}',
    b'{"status_code":200,"body":null}',
    b'{"status_code":200,"body":[256]}',
    b'{"status_code":200,"body":[-1]}',
    b'{"status_code":200,"body":[1.5]}',
    b'{"status_code":200,"body":[true]}',
    b'{"status_code":200,"body":[[1]]}',
    b'{"status_code":200,"body":{"a":1}}',
    b'{"status_code":200,"body":[1],"headers":{"x-a":1}}',
    b'{"status_code":200,"body":[1],"headers":["x-a"]}',
    b'{"status_code":200,"body":[1],"content_type":5}',
    b'{"status_code":200,"body":[1]} trailing',
    b'{"status_code":200,"body":[1,2',
])
def test_answer_that_is_no_envelope_is_sent_raw(client, raw):
    response = answer_with(client, raw)
    assert response.status_int == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.body == raw


def test_answers_with_lone_surrogates_are_served(client):
    answer = b'{"status_code":201,"body":"ok","content_type":"\\ud800","headers":{"x-a":"\\ud800","x-b":"fine"}}'
    deploy(client, "db/s/t", answer_module(answer))
    response = invoke(client, "db/s/t/f", status=201)
    assert response.body == b"ok" and response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["x-b"] == "fine" and "x-a" not in response.headers
    raw = b'{"status_code":201,"body":"\\ud800"}'      # not a text body: sent raw, as any non-envelope
    deploy(client, "db/s/t", answer_module(raw))
    response = invoke(client, "db/s/t/f", status=200)
    assert response.body == raw and response.headers["Content-Type"] == "application/octet-stream"


def test_plugin_headers_differing_in_case_both_go_out(client):
    raw = b'{"status_code":200,"body":[111,107],"headers":{"X-Twice":"first","x-twice":"second"}}'
    response = answer_with(client, raw)
    assert sorted(v for k, v in response.headerlist if k.lower() == "x-twice") == ["first", "second"]


def test_response_envelope_passes_safe_headers_only(client):
    headers = {
        "x-custom": "yes", "X-Upper-Case": "kept", "cache-control": "no-store", "ETag": '"abc"',
        "last-modified": "Wed, 21 Oct 2015 07:28:00 GMT", "content-disposition": "inline",
        "content-language": "en", "content-encoding": "identity", "vary": "Accept",
        "set-cookie": "session=stolen", "Set-Cookie": "a=b", "location": "/elsewhere",
        "access-control-allow-origin": "*", "www-authenticate": "Basic", "server": "evil",
        "content-length": "999", "transfer-encoding": "chunked", "content-type": "text/html",
        "x-crlf": "a\r\nSet-Cookie: injected=1", "x-lf": "a\nb", "x-cr": "a\rb",
        "x bad name": "v", "x-ok-after": "still here",
    }
    raw = json.dumps({"status_code": 200, "content_type": "text/plain", "headers": headers,
                      "body": [111, 107]}).encode()
    response = answer_with(client, raw)
    got = {k.lower(): v for k, v in response.headerlist}
    for kept in ("x-custom", "x-upper-case", "cache-control", "etag", "last-modified",
                 "content-disposition", "content-language", "content-encoding", "vary", "x-ok-after"):
        assert got[kept] == {k.lower(): v for k, v in headers.items()}[kept], kept
    for dropped in ("set-cookie", "location", "access-control-allow-origin", "www-authenticate",
                    "transfer-encoding", "x-crlf", "x-lf", "x-cr", "x bad name"):
        assert dropped not in got, dropped
    assert got.get("server") != "evil"
    assert got["content-type"] == "text/plain"
    assert got.get("content-length", "2") == "2"
    assert response.body == b"ok"
    assert "injected" not in str(response.headerlist)


BODY_PREFIX = b'{"status_code":200,"body":'


# Answers {"status_code":200,"body":<the request's arguments array>}: it finds the
# first '[' (the arguments array, first in the envelope) and the ']' closing it
# (a byte array holds no other bracket), copies the prefix just before the '['
# (alloc places the request at 65536, so there is room) and puts '}' after ']'.
BODY_ECHO_WAT = f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (data (i32.const 0) "{wat_string(BODY_PREFIX)}")
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $open i32) (local $close i32) (local $start i32)
    (local.set $open (local.get $ptr))
    (block $found
      (loop $scan
        (br_if $found (i32.eq (i32.load8_u (local.get $open)) (i32.const 91)))
        (local.set $open (i32.add (local.get $open) (i32.const 1)))
        (br_if $scan (i32.lt_u (local.get $open) (i32.add (local.get $ptr) (local.get $len))))
        (unreachable)))
    (local.set $close (local.get $open))
    (block $found
      (loop $scan
        (br_if $found (i32.eq (i32.load8_u (local.get $close)) (i32.const 93)))
        (local.set $close (i32.add (local.get $close) (i32.const 1)))
        (br $scan)))
    (local.set $start (i32.sub (local.get $open) (i32.const {len(BODY_PREFIX)})))
    (memory.copy (local.get $start) (i32.const 0) (i32.const {len(BODY_PREFIX)}))
    (i32.store8 (i32.add (local.get $close) (i32.const 1)) (i32.const 125))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $start)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (i32.add (local.get $close) (i32.const 2))
                                       (local.get $start))))))
"""


@pytest.mark.parametrize("size", [16 * 1024 - 100, 16 * 1024, 100 * 1024, 1024 * 1024])
def test_large_body_round_trip(client, size):
    deploy(client, "db/s/t", wat(BODY_ECHO_WAT))
    data = random.Random(size).randbytes(size - 3) + b"\0\xff]"
    response = invoke(client, "db/s/t/f", data)
    assert response.content_type == "application/octet-stream"
    assert len(response.body) == len(data) and response.body == data
    if size >= 16 * 1024:   # such answers went through the WASM codec, not json.loads
        codec = client.app.config["aeordb.runtime"].codec
        assert getattr(codec._local, "state", None) is not None


def test_large_answer_with_a_nested_body_key_first(client):
    data = random.Random(7).randbytes(12 * 1024)
    raw = (b'{"status_code":202,"content_type":"application/x-test","meta":{"body":[1,2,3],'
           b'"note":"\\"body\\":[9]"},"headers":{"x-n":"1"},"body":' + json.dumps(list(data)).encode() + b"}")
    assert len(raw) > 16 * 1024
    response = answer_with(client, raw, status=202)
    assert response.body == data
    assert response.content_type == "application/x-test"
    assert response.headers["x-n"] == "1"


@pytest.mark.parametrize("bad", [b"256", b"-1", b"1.0", b"01", b"[1]", b'"a"', b"1 2", b"", b"true"])
def test_large_answer_with_a_bad_byte_is_sent_raw(client, bad):
    values = b",".join([b"65"] * 6000 + ([bad] if bad else [b""]) + [b"66"])
    raw = b'{"status_code":200,"content_type":"text/plain","body":[' + values + b"]}"
    assert len(raw) > 16 * 1024
    response = answer_with(client, raw)
    assert response.content_type == "application/octet-stream"
    assert response.body == raw


def test_large_answer_with_body_twice_follows_json_semantics(client):
    # Duplicate keys: json.loads keeps the last one; the fast path must not disagree.
    first = b",".join([b"1"] * 9000)
    raw = b'{"status_code":200,"body":[' + first + b'],"body":[104,105]}'
    assert len(raw) > 16 * 1024
    assert answer_with(client, raw).body == b"hi"


def test_large_answer_nested_past_the_recursion_limit_is_sent_raw(client):
    # Over ByteArrayCodec.SMALL with a '"body":[' inside: the fast path's json.loads hits the
    # recursion limit; like any answer that is no envelope, it goes out as it is (not a 500).
    raw = b'{"status_code":201,"x":' + b"[" * 20_000 + b'"body":[104,105]}'
    assert len(raw) > aeordb.ByteArrayCodec.SMALL
    response = answer_with(client, raw, status=200)
    assert response.content_type == "application/octet-stream" and response.body == raw


# Host functions ###############################################################

def test_context(client):
    answer = call_host(client, "ctx", "aeordb_context", {})
    assert answer["function_name"] == "run"
    assert answer["plugin_path"] == "ctx/s/t"
    assert answer["db"] == "ctx"
    assert answer["method"] == "POST"
    assert 0 < answer["remaining_ms"] <= 5000


def test_read_file(client):
    data = "héllo\nwörld\n".encode()
    put_file(client, "h", "/docs/a.txt", data, "text/plain; charset=utf-8")
    answer = call_host(client, "h", "aeordb_read_file", {"path": "/docs/a.txt"})
    assert base64.b64decode(answer["data"]) == data
    assert answer["content_type"] == "text/plain; charset=utf-8"
    assert answer["size"] == len(data)


def test_write_file_is_visible_over_http(client):
    data = bytes(range(256))
    answer = call_host(client, "h", "aeordb_write_file",
                       {"path": "/w/new.bin", "data": base64.b64encode(data).decode(),
                       "content_type": "application/x-test"})
    assert answer == {"ok": True, "size": 256}
    got = client.get("/h/_files/w/new.bin", headers=AUTH)
    assert got.body == data and got.content_type == "application/x-test"
    # Without content_type the type follows the extension.
    call_host(client, "h", "aeordb_write_file",
              {"path": "/w/doc.json", "data": base64.b64encode(b'{"a": 1}').decode()})
    assert client.get("/h/_files/w/doc.json", headers=AUTH).content_type == "application/json"


def test_a_content_type_that_cannot_be_served_is_never_stored(client):
    for content_type in ("text/plain\u0000evil", "text/\ud800", "a\u007fb"):
        args = json.dumps({"path": "/x", "data": "aGk=", "content_type": content_type}).encode()
        deploy(client, "db/s/t", host_call_module("aeordb_write_file", args))
        assert "invalid content type" in json.loads(invoke(client, "db/s/t/f").body)["error"]
        client.get("/db/_files/x", headers=AUTH, status=404)
    args = json.dumps({"path": "/blank", "data": "aGk=", "content_type": "   "}).encode()
    deploy(client, "db/s/t", host_call_module("aeordb_write_file", args))
    assert json.loads(invoke(client, "db/s/t/f").body) == {"ok": True, "size": 2}
    served = client.get("/db/_files/blank", headers=AUTH, status=200)
    assert served.headers["Content-Type"] == "application/octet-stream" and served.body == b"hi"


def test_delete_file(client):
    put_file(client, "h", "/gone.txt", b"bye")
    assert call_host(client, "h", "aeordb_delete_file", {"path": "/gone.txt"}) == {"ok": True}
    client.get("/h/_files/gone.txt", headers=AUTH, status=404)
    again = call_host(client, "h", "aeordb_delete_file", {"path": "/gone.txt"})
    assert "no file" in again["error"]


def test_file_metadata(client):
    before = int(time.time() * 1000)
    put_file(client, "h", "/m/x.txt", b"12345", "text/plain")
    after = int(time.time() * 1000)
    meta = call_host(client, "h", "aeordb_file_metadata", {"path": "/m/x.txt"})
    assert meta["path"] == "/m/x.txt" and meta["size"] == 5 and meta["content_type"] == "text/plain"
    assert before - 1 <= meta["created_at"] <= after + 1          # milliseconds, not seconds
    assert meta["updated_at"] == meta["created_at"]
    put_file(client, "h", "/m/x.txt", b"1234567", "text/plain")
    again = call_host(client, "h", "aeordb_file_metadata", {"path": "/m/x.txt"})
    assert again["created_at"] == meta["created_at"] and again["updated_at"] >= meta["updated_at"]
    assert again["size"] == 7


def test_list_directory(client):
    put_file(client, "h", "/d/a.txt", b"aaa")
    put_file(client, "h", "/d/sub/b.txt", b"bb")
    put_file(client, "h", "/d/sub/deeper/c.txt", b"c")
    put_file(client, "h", "/d2/z.txt", b"z")       # a sibling whose name extends "d"
    answer = call_host(client, "h", "aeordb_list_directory", {"path": "/d"})
    assert answer["entries"] == [{"name": "a.txt", "type": "file", "size": 3},
                                 {"name": "sub", "type": "directory", "size": 3}]
    root = call_host(client, "h", "aeordb_list_directory", {"path": "/"})
    assert [(e["name"], e["type"]) for e in root["entries"]] == [("d", "directory"), ("d2", "directory")]
    assert "error" in call_host(client, "h", "aeordb_list_directory", {"path": "/nothing"})
    assert "error" in call_host(client, "h", "aeordb_list_directory", {"path": "/d/a.txt"})


EXTRACT_TEXT = "line1\nline2 ünï\nline3 日本語\nline4\n"


@pytest.mark.parametrize("args, expected", [
    ({"mode": "lines", "start": 2, "end": 3}, {"text": "line2 ünï\nline3 日本語\n", "truncated": False,
                                               "start": 2, "end": 3}),
    ({"mode": "lines", "start": None, "end": None}, {"text": EXTRACT_TEXT, "start": 1, "end": None}),
    ({"mode": "lines"}, {"text": EXTRACT_TEXT, "truncated": False, "start": 1, "end": None}),
    ({"mode": "lines", "start": 4, "end": 99}, {"text": "line4\n"}),
    ({"mode": "lines", "start": 5, "end": 9}, {"text": ""}),             # past the end: nothing, no error
    ({"mode": "lines", "start": 3, "end": 3}, {"text": "line3 日本語\n"}),
    ({"mode": "chars", "start": 6, "end": 15}, {"text": "line2 ünï"}),       # characters, not bytes
    ({"mode": "chars", "start": 0, "end": 0}, {"text": ""}),
    ({"mode": "chars", "start": 22, "end": None}, {"text": "日本語\nline4\n", "start": 22, "end": None}),
    ({"mode": "chars"}, {"text": EXTRACT_TEXT, "start": 0, "end": None}),
    ({"mode": "bytes", "start": 0, "end": 5}, {"text": "line1", "start": 0, "end": 5}),
    ({"mode": "bytes", "start": 24, "end": 27}, {"text": "日"}),
    ({"mode": "chars", "start": 22, "end": 25, "max_bytes": 7}, {"text": "日本", "truncated": True}),
    ({"mode": "chars", "start": 22, "end": 25, "max_bytes": 9}, {"text": "日本語", "truncated": False}),
    ({"mode": "chars", "start": 22, "end": 25, "max_bytes": 2}, {"text": "", "truncated": True}),
    ({"mode": "bytes", "start": 24, "end": 27, "max_bytes": 2}, {"text": "\ufffd", "truncated": True}),
    ({"mode": "lines", "max_bytes": 16 * 1024 * 1024}, {"text": EXTRACT_TEXT, "truncated": False}),
    # null, negative, float, boolean and string optional arguments count as absent, not as errors
    ({"mode": "chars", "start": 0, "end": 1, "max_bytes": -5}, {"text": "l", "truncated": False}),
    ({"mode": "lines", "max_bytes": None}, {"text": EXTRACT_TEXT, "truncated": False}),
    ({"mode": "lines", "start": "2", "end": 1.0}, {"text": EXTRACT_TEXT, "start": 1, "end": None}),
    ({"mode": "chars", "start": -3, "end": True, "max_bytes": 2.5}, {"text": EXTRACT_TEXT, "start": 0}),
])
def test_extract_file(client, args, expected):
    data = EXTRACT_TEXT.encode()
    put_file(client, "x", "/t.txt", data, "text/plain")
    answer = call_host(client, "x", "aeordb_extract_file", {"path": "/t.txt", **args})
    assert "error" not in answer, answer
    assert list(answer) == ["text", "content_type", "source_size", "mode", "start", "end", "pointer",
                            "truncated"]
    for key, value in expected.items():
        assert answer[key] == value, (key, answer)
    assert answer["source_size"] == len(data) and answer["content_type"] == "text/plain"
    assert answer["mode"] == args["mode"] and answer["pointer"] is None
    limit = args.get("max_bytes")
    if args["mode"] != "bytes":   # bytes mode cuts raw bytes, and U+FFFD takes three
        assert len(answer["text"].encode()) <= (limit if isinstance(limit, int) and limit > 0 else 4 * 1024 * 1024)


def test_extract_file_examples_of_aeordb(client):
    """The examples of AEORDB_TODAY.md section 4, each as upstream answers it."""
    put_file(client, "x", "/mixed.txt", b"one\r\ntwo\nthree\rfour", "text/plain")
    put_file(client, "x", "/unicode.txt", "aé日b".encode(), "text/plain")
    put_file(client, "x", "/bin.dat", bytes([0x61, 0x62, 0xFF, 0x63]))
    put_file(client, "x", "/doc.json", b'{"messages":[{"content":"hello"},{"content":{"nested":true}}]}',
             "application/json")
    put_file(client, "x", "/greek.txt", "alpha βeta gamma".encode(), "text/plain")
    extract = functools.partial(call_host, client, "x", "aeordb_extract_file")
    assert extract({"path": "/mixed.txt", "mode": "lines", "start": 2, "end": 3}) == {
        "text": "two\nthree\r", "content_type": "text/plain", "source_size": 19, "mode": "lines", "start": 2,
        "end": 3, "pointer": None, "truncated": False}
    assert extract({"path": "/mixed.txt", "mode": "lines", "start": 1, "end": 1})["text"] == "one\r\n"
    assert extract({"path": "/mixed.txt", "mode": "lines", "start": 4})["text"] == "four"
    assert extract({"path": "/mixed.txt", "mode": "lines", "start": 5, "end": 9})["text"] == ""
    assert extract({"path": "/unicode.txt", "mode": "chars", "start": 1, "end": 3})["text"] == "é日"
    assert extract({"path": "/bin.dat", "mode": "bytes", "start": 1, "end": 4})["text"] == "b\ufffdc"
    assert extract({"path": "/bin.dat", "mode": "bytes"})["content_type"] == "application/octet-stream"
    first = extract({"path": "/doc.json", "mode": "json_pointer", "pointer": "/messages/0/content",
                     "start": 3, "end": 9})
    assert first == {"text": "hello", "content_type": "application/json", "source_size": 62,
                     "mode": "json_pointer", "start": None, "end": None, "pointer": "/messages/0/content",
                     "truncated": False}
    assert extract({"path": "/doc.json", "mode": "json_pointer",
                    "pointer": "/messages/1/content"})["text"] == '{"nested":true}'
    greek = extract({"path": "/greek.txt", "mode": "chars", "start": 6, "end": 16, "max_bytes": 5})
    assert (greek["text"], greek["truncated"]) == ("βeta", True)


def test_extract_file_line_breaks_are_lf_crlf_and_cr_only(client):
    """Not str.splitlines: vertical tab, form feed, the separators, NEL and U+2028/2029 are not breaks."""
    text = "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g\r\nsecond\n\nfourth\r\rsixth"
    put_file(client, "x", "/breaks.txt", text.encode(), "text/plain")
    lines = ["a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g\r\n", "second\n", "\n", "fourth\r", "\r", "sixth"]
    for number, line in enumerate(lines, 1):
        answer = call_host(client, "x", "aeordb_extract_file",
                           {"path": "/breaks.txt", "mode": "lines", "start": number, "end": number})
        assert answer["text"] == line, (number, answer)
    whole = call_host(client, "x", "aeordb_extract_file", {"path": "/breaks.txt", "mode": "lines"})
    assert whole["text"] == text


def test_extract_file_json_pointer(client):
    document = {"b": [10, {"z": 1, "a": [True, None, 1.5]}], "a/b": "slash", "m~n": "tilde", "": "empty key",
                "text": "ünï 日本", "0": "zero"}
    put_file(client, "x", "/d.json", json.dumps(document).encode(), "application/json")
    extract = functools.partial(call_host, client, "x", "aeordb_extract_file")
    for pointer, text in [("", json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)),
                          ("/b/1", '{"a":[true,null,1.5],"z":1}'),   # keys sorted, compact
                          ("/b/0", "10"), ("/b/1/a/1", "null"), ("/b/1/a/0", "true"),
                          ("/a~1b", "slash"), ("/m~0n", "tilde"), ("/", "empty key"),
                          ("/text", "ünï 日本"),                           # a string unquoted
                          ("/0", "zero")]:                               # a digit key of an object
        answer = extract({"path": "/d.json", "mode": "json_pointer", "pointer": pointer})
        assert (answer.get("text"), answer.get("pointer")) == (text, pointer), (pointer, answer)
    for pointer in ("b", "/b/01", "/b/2", "/b/-", "/b/+1", "/nothing", "/text/0", "/b/1/z/x"):
        answer = extract({"path": "/d.json", "mode": "json_pointer", "pointer": pointer})
        assert answer == {"error": f"Invalid input: JSON pointer not found: {pointer}"}, (pointer, answer)
    cut = extract({"path": "/d.json", "mode": "json_pointer", "pointer": "/text", "max_bytes": 7})
    assert (cut["text"], cut["truncated"]) == ("ünï ", True)


@pytest.mark.parametrize("args, error", [
    ({"mode": "lines"}, "Missing 'path' argument"),
    ({"path": 7, "mode": "lines"}, "Missing 'path' argument"),
    ({"path": "/t.txt"}, "Missing 'mode' argument"),
    ({"path": "/t.txt", "mode": None}, "Missing 'mode' argument"),
    ({"path": "/t.txt", "mode": "words"},
     "Unsupported extract mode; expected 'lines', 'chars', 'bytes', or 'json_pointer'"),
    ({"path": "/t.txt", "mode": "LINES"},
     "Unsupported extract mode; expected 'lines', 'chars', 'bytes', or 'json_pointer'"),
    ({"path": "/missing.txt", "mode": "words"},                   # the mode is checked first
     "Unsupported extract mode; expected 'lines', 'chars', 'bytes', or 'json_pointer'"),
    ({"path": "/missing.txt", "mode": "lines", "max_bytes": 0}, "Not found: /missing.txt"),
    ({"path": "/t.txt", "mode": "lines", "max_bytes": 0},
     "Invalid input: Invalid max_bytes: must be between 1 and 16777216"),
    ({"path": "/t.txt", "mode": "chars", "max_bytes": 16 * 1024 * 1024 + 1},
     "Invalid input: Invalid max_bytes: must be between 1 and 16777216"),
    ({"path": "/t.txt", "mode": "lines", "max_bytes": 1 << 40},
     "Invalid input: Invalid max_bytes: must be between 1 and 16777216"),
    ({"path": "/t.txt", "mode": "lines", "start": 0},
     "Invalid input: Line ranges are 1-based; start must be at least 1"),
    ({"path": "/t.txt", "mode": "lines", "start": 3, "end": 2},
     "Invalid input: Range end must be greater than or equal to start"),
    ({"path": "/t.txt", "mode": "chars", "start": 3, "end": 2},
     "Invalid input: Range end must be greater than or equal to start"),
    ({"path": "/t.txt", "mode": "bytes", "start": 3, "end": 2},
     "Invalid input: Range end must be greater than or equal to start"),
    ({"path": "/t.txt", "mode": "json_pointer"}, "Invalid input: json_pointer range requires 'pointer'"),
    ({"path": "/t.txt", "mode": "json_pointer", "pointer": 5}, "Invalid input: json_pointer range requires 'pointer'"),
])
def test_extract_file_errors(client, args, error):
    put_file(client, "x", "/t.txt", b"abc\n", "text/plain")
    assert call_host(client, "x", "aeordb_extract_file", args) == {"error": error}


def test_extract_file_errors_on_content(client):
    put_file(client, "x", "/t.txt", b"abc\n", "text/plain")
    put_file(client, "x", "/bad.txt", b"one\ntw\xffo\nthree\n", "text/plain")
    extract = functools.partial(call_host, client, "x", "aeordb_extract_file")
    answer = extract({"path": "/t.txt", "mode": "json_pointer", "pointer": ""})
    assert answer["error"].startswith("JSON parse error: Stored file is not valid JSON: "), answer
    # Invalid UTF-8 is an error once the range reaches it, not before; bytes mode replaces it.
    assert extract({"path": "/bad.txt", "mode": "lines", "start": 1, "end": 1})["text"] == "one\n"
    assert extract({"path": "/bad.txt", "mode": "chars", "start": 0, "end": 6})["text"] == "one\ntw"
    for args in ({"mode": "lines", "start": 2, "end": 2}, {"mode": "lines", "start": 3},
                 {"mode": "chars", "start": 0, "end": 7}, {"mode": "chars"}):
        answer = extract({"path": "/bad.txt", **args})
        assert answer == {"error": "Invalid input: Invalid UTF-8: invalid utf-8 sequence of 1 bytes from index 6"}, \
            (args, answer)
    assert extract({"path": "/bad.txt", "mode": "bytes", "start": 4, "end": 8})["text"] == "tw\ufffdo"


def test_extract_file_truncation_keeps_utf8_whole(client):
    text = "aé日😀" * 50                         # 1, 2, 3 and 4-byte characters
    put_file(client, "x", "/u.txt", text.encode(), "text/plain")
    for max_bytes in range(1, 25):
        answer = call_host(client, "x", "aeordb_extract_file",
                           {"path": "/u.txt", "mode": "lines", "max_bytes": max_bytes})
        got = answer["text"]
        assert answer["truncated"] is True
        assert text.startswith(got) and "\ufffd" not in got
        assert len(got.encode()) <= max_bytes
        # The longest whole-character prefix that fits: nothing more could have been kept.
        assert len(text[:len(got) + 1].encode()) > max_bytes


def test_log_message(client, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb.plugin")
    answer = run_sequence(client, "lg", [("log_message", b"warn", "hello from wasm ✓".encode()),
                                         ("aeordb_context", b"{}")], table="logger")
    assert json.loads(answer.body)["plugin_path"] == "lg/s/logger"
    records = [r for r in caplog.records if r.name == "aeordb.plugin"]
    assert any("[lg/s/logger request=" in r.getMessage() and "hello from wasm ✓" in r.getMessage()
               and r.levelno == logging.WARNING for r in records), [r.getMessage() for r in records]


def test_plugin_log_lines_cannot_forge_other_lines(client, caplog):
    message = b"first\r\nINFO aeordb: forged\rthird"
    module = wat(f"""
(module
  (import "aeordb" "log_message" (func $log (param i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 32768) "warn")
  (data (i32.const 32800) "{wat_string(message)}")
  (func (export "handle") (param i32 i32) (result i64)
    (call $log (i32.const 32768) (i32.const 4) (i32.const 32800) (i32.const {len(message)}))
    (i64.const 0)))
""")
    deploy(client, "db/s/logger", module)
    with caplog.at_level("INFO", logger="aeordb.plugin"):
        invoke(client, "db/s/logger/f")
    lines = [r.getMessage() for r in caplog.records if r.name == "aeordb.plugin"]
    assert len(lines) == 1 and re.fullmatch(r"\[db/s/logger request=\S+\] first\\r\\nINFO aeordb: forged\\rthird",
                                            lines[0]), lines
    assert not any(ch in lines[0] for ch in "\r\n")


def test_example_plugin_matches_its_source_and_runs(client, caplog):
    example = HERE / "examples"
    assert (example / "hello.wasm").read_bytes() == wat((example / "hello.wat").read_text())
    deploy(client, "mydb/public/users", (example / "hello.wasm").read_bytes(), name="hello")
    with caplog.at_level("INFO", logger="aeordb.plugin"):
        answer = invoke(client, "mydb/public/users/greet", b'{"input": "hello"}')
    assert answer.json == {"hello": "world"}
    assert answer.headers["x-plugin"] == "hello"
    assert any(re.fullmatch(r"\[mydb/public/users request=\S+\] hello plugin invoked", r.getMessage())
               for r in caplog.records)


@pytest.mark.parametrize("args", [
    b"{}",                                    # missing path
    b"not json at all",
    b'["/a.txt"]',                            # JSON, but not an object
    b'{"path": "a.txt"}',                     # relative
    b'{"path": "/a/../a.txt"}',
    b'{"path": "/../a.txt"}',
    b'{"path": 42}',
    b'{"path": "/a\\u0000b"}',
    b"\xff\xfe",                              # not UTF-8
])
@pytest.mark.parametrize("function", ["aeordb_read_file", "aeordb_file_metadata", "aeordb_delete_file",
                                      "aeordb_write_file", "aeordb_extract_file", "aeordb_list_directory"])
def test_bad_host_arguments_answer_an_error(client, function, args):
    put_file(client, "e", "/a.txt", b"secret")
    answer = call_host(client, "e", function, args)      # invoke still answers 200
    assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"]
    assert client.get("/e/_files/a.txt", headers=AUTH).body == b"secret"


def test_bad_host_pointers_answer_an_error(client):
    put_file(client, "e", "/a.txt", b"secret")
    for ptr, length in ((-1, 10), (0, -1), (2 * 65536 - 5, 100), (0x7FFFFFFF, 0x7FFFFFFF)):
        module = wat(f"""
(module
  (import "aeordb" "aeordb_read_file" (func $read (param i32 i32) (result i64)))
  (import "aeordb" "log_message" (func $log (param i32 i32 i32 i32)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (func (export "handle") (param i32 i32) (result i64)
    (call $log (i32.const {ptr}) (i32.const {length}) (i32.const {ptr}) (i32.const {length}))
    (call $read (i32.const {ptr}) (i32.const {length}))))
""")
        deploy(client, "e/s/ptr", module)
        answer = json.loads(invoke(client, "e/s/ptr/run").body)
        assert set(answer) == {"error"}, (ptr, length, answer)


def test_host_function_failure_is_not_blamed_on_the_arguments(client, monkeypatch):
    def broken(self, db, path):
        raise ValueError("a bug of the server")
    monkeypatch.setattr(aeordb.FileStore, "metadata", broken)
    deploy(client, "db/s/t", host_call_module("aeordb_file_metadata", b'{"path": "/x"}'))
    error = json.loads(invoke(client, "db/s/t/f").body)["error"]
    assert "not valid JSON" not in error and "aeordb_file_metadata failed: ValueError" in error


def test_host_answer_placement_with_and_without_alloc(client):
    put_file(client, "p", "/f.txt", b"placed", "text/plain")
    args = json_args({"path": "/f.txt"})
    with_alloc = run_sequence(client, "p", [("aeordb_read_file", args)], alloc=True, tail="check_alloc")
    assert base64.b64decode(json.loads(with_alloc.body)["data"]) == b"placed"
    without = run_sequence(client, "p", [("aeordb_read_file", args)], alloc=False, tail="offset0")
    assert base64.b64decode(json.loads(without.body)["data"]) == b"placed"
    # Several answers in a row without alloc: each lands at 0 and the arguments stay intact.
    steps = [("aeordb_file_metadata", args), ("aeordb_list_directory", json_args({"path": "/"})),
             ("aeordb_read_file", args)]
    last = run_sequence(client, "p", steps, alloc=False, tail="offset0")
    assert json.loads(last.body)["size"] == 6


# -- the wall between databases ------------------------------------------------

def test_wall_between_databases(client):
    written = call_host(client, "a", "aeordb_write_file",
                        {"path": "/x.json", "data": base64.b64encode(b'{"owner": "a"}').decode()})
    assert written["ok"] is True
    assert client.get("/a/_files/x.json", headers=AUTH).json == {"owner": "a"}
    answer = call_host(client, "b", "aeordb_read_file", {"path": "/x.json"})
    assert "no file" in answer["error"]
    assert "error" in call_host(client, "b", "aeordb_file_metadata", {"path": "/x.json"})
    assert "error" in call_host(client, "b", "aeordb_delete_file", {"path": "/x.json"})
    assert call_host(client, "b", "aeordb_list_directory", {"path": "/"}) == {"entries": []}
    assert call_host(client, "b", "aeordb_query", {"path": "/"})["items"] == []
    client.get("/b/_files/x.json", headers=AUTH, status=404)
    assert client.get("/a/_files/x.json", headers=AUTH).json == {"owner": "a"}   # b deleted nothing


# -- all-or-nothing invocations ------------------------------------------------

def test_invocation_that_returns_keeps_everything(client):
    steps = [write_step(f"/many/{n}.txt", str(n).encode()) for n in range(5)]
    steps.append(("aeordb_delete_file", json_args({"path": "/many/0.txt"})))
    answer = run_sequence(client, "t", steps)
    assert json.loads(answer.body) == {"ok": True}
    client.get("/t/_files/many/0.txt", headers=AUTH, status=404)
    for n in range(1, 5):
        assert client.get(f"/t/_files/many/{n}.txt", headers=AUTH).body == str(n).encode()


def test_invocation_reads_its_own_writes(client):
    put_file(client, "r", "/own.txt", b"before", "text/plain")
    steps = [write_step("/own.txt", b"after", "text/x-new"),
             write_step("/fresh.txt", b"fresh"),
             ("aeordb_list_directory", json_args({"path": "/"})),
             ("aeordb_read_file", json_args({"path": "/own.txt"}))]
    answer = json.loads(run_sequence(client, "r", steps).body)
    assert base64.b64decode(answer["data"]) == b"after" and answer["content_type"] == "text/x-new"
    steps[-1] = ("aeordb_list_directory", json_args({"path": "/"}))
    listing = json.loads(run_sequence(client, "r", steps).body)
    assert [e["name"] for e in listing["entries"]] == ["fresh.txt", "own.txt"]
    deleted = json.loads(run_sequence(client, "r", [("aeordb_delete_file", json_args({"path": "/fresh.txt"})),
                                                    ("aeordb_read_file", json_args({"path": "/fresh.txt"}))]).body)
    assert "no file" in deleted["error"]


def test_invocation_that_traps_leaves_nothing(client):
    put_file(client, "t", "/keep.txt", b"old")
    steps = [write_step("/one.txt", b"1"), write_step("/dir/two.txt", b"2"),
             write_step("/keep.txt", b"new"), ("aeordb_delete_file", json_args({"path": "/keep.txt"}))]
    answer = run_sequence(client, "t", steps, status=500, tail="trap")
    assert "unreachable" in answer.json["error"]
    client.get("/t/_files/one.txt", headers=AUTH, status=404)
    client.get("/t/_files/dir/two.txt", headers=AUTH, status=404)
    assert client.get("/t/_files/keep.txt", headers=AUTH).body == b"old"


def test_invocation_with_a_bad_answer_pointer_leaves_nothing(client):
    steps = [write_step("/p1.txt", b"1"), write_step("/p2.txt", b"2")]
    answer = run_sequence(client, "t", steps, status=500, tail="bad_pointer")
    assert "pointer" in answer.json["error"]
    client.get("/t/_files/p1.txt", headers=AUTH, status=404)
    client.get("/t/_files/p2.txt", headers=AUTH, status=404)


def test_invocation_over_the_time_limit_leaves_nothing(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.3)
    answer = run_sequence(client, "t", [write_step("/slow.txt", b"x")], status=500, tail="loop")
    assert "time limit" in answer.json["error"]
    client.get("/t/_files/slow.txt", headers=AUTH, status=404)


def test_invocation_failed_by_the_host_leaves_nothing(client):
    # alloc answers the request a good pointer, then nonsense: the host cannot place the
    # write's answer, fails the invocation, and the write must go with it.
    module = wat(f"""
(module
  (import "aeordb" "aeordb_write_file" (func $write (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  (global $calls (mut i32) (i32.const 0))
  (func (export "alloc") (param i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (result i32) (i32.eq (global.get $calls) (i32.const 1))
      (then (i32.const 65536)) (else (i32.const -16))))
  (data (i32.const 1024) "{wat_string(write_step('/host.txt', b'h')[1])}")
  (func (export "handle") (param i32 i32) (result i64)
    (drop (call $write (i32.const 1024) (i32.const {len(write_step('/host.txt', b'h')[1])})))
    (i64.const 0)))
""")
    deploy(client, "t/s/hostfail", module)
    answer = invoke(client, "t/s/hostfail/run", status=500)
    assert "bad pointer" in answer.json["error"]
    client.get("/t/_files/host.txt", headers=AUTH, status=404)


def test_only_plugins_that_can_write_run_in_a_transaction(client, monkeypatch):
    deploy(client, "db/s/reader", host_call_module("aeordb_read_file", b'{"path": "/x"}'))
    deploy(client, "db/s/writer", host_call_module("aeordb_delete_file", b'{"path": "/x"}'))
    registry = client.app.config["aeordb.registry"]
    assert registry.get("db/s/reader").shape.writes_files is False
    assert registry.get("db/s/writer").shape.writes_files is True
    files, batches = client.app.config["aeordb.files"], []
    real_batch = files.batch
    monkeypatch.setattr(files, "batch", lambda: batches.append(1) or real_batch())
    assert "error" in json.loads(invoke(client, "db/s/reader/f").body)
    assert batches == []
    assert "error" in json.loads(invoke(client, "db/s/writer/f").body)
    assert batches == [1]


def test_invocation_fails_whole_when_the_database_abandons_its_transaction(client, monkeypatch):
    """Disk full midway: SQLite rolls the transaction back itself; later writes must not commit."""
    first = json.dumps({"path": "/first.txt", "data": base64.b64encode(b"1").decode()}).encode()
    second = json.dumps({"path": "/second.txt", "data": base64.b64encode(b"2").decode()}).encode()
    third = json.dumps({"path": "/third.txt", "data": base64.b64encode(b"3").decode()}).encode()
    module = wat(f"""
(module
  (import "aeordb" "aeordb_write_file" (func $write (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (data (i32.const 1024) "{wat_string(first)}")
  (data (i32.const 2048) "{wat_string(second)}")
  (data (i32.const 3072) "{wat_string(third)}")
  (func (export "handle") (param i32 i32) (result i64)
    (drop (call $write (i32.const 1024) (i32.const {len(first)})))
    (drop (call $write (i32.const 2048) (i32.const {len(second)})))
    (drop (call $write (i32.const 3072) (i32.const {len(third)})))
    (i64.const 0)))
""")
    deploy(client, "db/s/writer", module)
    real_range, calls = aeordb.descendant_range, []

    def failing_range(directory):
        calls.append(directory)
        if directory == "/second.txt":   # inside the second write's transaction block
            conn = client.app.config["aeordb.files"]._conn()
            conn.execute("ROLLBACK")
            raise aeordb.sqlite3.OperationalError("database or disk is full")
        return real_range(directory)
    monkeypatch.setattr(aeordb, "descendant_range", failing_range)
    answer = invoke(client, "db/s/writer/f", status=503)
    assert "storage unavailable" in answer.json["error"]
    assert "/second.txt" in calls
    monkeypatch.undo()
    for name in ("first", "second", "third"):
        client.get(f"/db/_files/{name}.txt", headers=AUTH, status=404)


# File store and queries #######################################################

def test_file_round_trip_and_caching(client):
    data = bytes(range(256))
    put = put_file(client, "f", "/bin/all.bytes", data, "application/x-custom", status=201)
    assert put.json["size"] == 256 and put.json["path"] == "/bin/all.bytes"
    assert put.json["content_type"] == "application/x-custom"
    got = client.get("/f/_files/bin/all.bytes", headers=AUTH)
    assert got.body == data and got.content_type == "application/x-custom"
    etag, modified = got.headers["ETag"], got.headers["Last-Modified"]
    assert etag.startswith('"') and modified.endswith("GMT")
    client.get("/f/_files/bin/all.bytes", headers={**AUTH, "If-None-Match": etag}, status=304)
    client.get("/f/_files/bin/all.bytes", headers={**AUTH, "If-None-Match": '"other"'}, status=200)
    client.get("/f/_files/bin/all.bytes", headers={**AUTH, "If-None-Match": f'"other", {etag}'}, status=304)
    client.get("/f/_files/bin/all.bytes", headers={**AUTH, "If-None-Match": "*"}, status=304)
    head = client.head("/f/_files/bin/all.bytes", headers=AUTH)
    assert head.body == b"" and head.headers["ETag"] == etag
    assert head.content_type == "application/x-custom"
    again = put_file(client, "f", "/bin/all.bytes", data[::-1], "image/png", status=200)
    assert again.json["created_at"] == put.json["created_at"]
    got = client.get("/f/_files/bin/all.bytes", headers=AUTH)
    assert got.body == data[::-1] and got.content_type == "image/png" and got.headers["ETag"] != etag


def test_directory_listing(client):
    put_file(client, "f", "/dir/a.txt", b"a")
    put_file(client, "f", "/dir/sub/b.txt", b"bb")
    put_file(client, "f", "/top.txt", b"t")
    expected = [{"name": "a.txt", "type": "file", "size": 1},
                {"name": "sub", "type": "directory", "size": 2}]
    assert client.get("/f/_files/dir", headers=AUTH).json == {"path": "/dir", "entries": expected}
    assert client.get("/f/_files/dir/", headers=AUTH).json["entries"] == expected
    for root in ("/f/_files/", "/f/_files"):
        assert [e["name"] for e in client.get(root, headers=AUTH).json["entries"]] == ["dir", "top.txt"]
    assert client.get("/empty/_files/", headers=AUTH).json["entries"] == []
    client.get("/f/_files/top.txt/", headers=AUTH, status=400)
    put_file(client, "f", "/newdir/", b"x", status=400)       # a path ending in '/' names a directory
    client.get("/f/_files/newdir", headers=AUTH, status=404)


def test_missing_files_are_404_and_delete_removes(client):
    client.get("/f/_files/missing.txt", headers=AUTH, status=404)
    client.get("/f/_files/missing/", headers=AUTH, status=404)
    client.head("/f/_files/missing.txt", headers=AUTH, status=404)
    client.delete("/f/_files/missing.txt", headers=AUTH, status=404)
    put_file(client, "f", "/del/me.txt", b"x")
    assert client.delete("/f/_files/del/me.txt", headers=AUTH).json == {"deleted": True,
                                                                         "path": "/del/me.txt"}
    client.get("/f/_files/del/me.txt", headers=AUTH, status=404)
    client.get("/f/_files/del", headers=AUTH, status=404)       # the directory went with its file
    client.get("/f/_files/x.txt", status=401)                   # behind the token
    client.put("/f/_files/x.txt", b"x", status=401)


def test_file_inside_a_file_conflicts(client):
    put_file(client, "f", "/file.txt", b"x")
    conflict = put_file(client, "f", "/file.txt/inner.txt", b"y", status=409)
    assert "error" in conflict.json
    put_file(client, "f", "/dir/child.txt", b"z")
    put_file(client, "f", "/dir", b"w", status=409)
    # Nor through a plugin: the host answers an error and the invocation still succeeds.
    answer = call_host(client, "f", "aeordb_write_file",
                       {"path": "/file.txt/deep/x", "data": base64.b64encode(b"q").decode()})
    assert "error" in answer
    assert client.get("/f/_files/file.txt", headers=AUTH).body == b"x"


def test_file_size_limit(tmp_path):
    client, _ = make_app(tmp_path, max_file_size=100)
    put_file(client, "f", "/big.bin", b"x" * 101, status=413)
    client.get("/f/_files/big.bin", headers=AUTH, status=404)
    put_file(client, "f", "/ok.bin", b"x" * 100, status=201)
    answer = call_host(client, "f", "aeordb_write_file",
                       {"path": "/big2.bin", "data": base64.b64encode(b"y" * 101).decode()})
    assert "exceeds" in answer["error"]
    client.get("/f/_files/big2.bin", headers=AUTH, status=404)


def test_files_persist_across_restarts(tmp_path):
    client, _ = make_app(tmp_path)
    put_file(client, "keep", "/bin/all.bytes", bytes(range(256)), "application/x-custom")
    put_file(client, "keep", "/docs/a.json", b'{"n": 7}', "application/json")
    call_host(client, "keep", "aeordb_write_file",
              {"path": "/docs/b.json", "data": base64.b64encode(b'{"n": 8}').decode()})
    client2, _ = make_app(tmp_path)
    got = client2.get("/keep/_files/bin/all.bytes", headers=AUTH)
    assert got.body == bytes(range(256)) and got.content_type == "application/x-custom"
    answer = client2.post("/keep/_query", json.dumps({"path": "/docs", "order_by": ["n"]}), headers=AUTH)
    assert [item["path"] for item in answer.json["items"]] == ["/docs/a.json", "/docs/b.json"]
    # The plugin deployed before is there too, and still reaches its database.
    assert call_host(client2, "keep", "aeordb_file_metadata", {"path": "/docs/b.json"})["size"] == 8


# -- queries -------------------------------------------------------------------

@pytest.mark.parametrize("where, expected", [
    (cond("name", "eq", "Alice"), ["Alice"]),
    (cond("name", "eq", "alice"), []),
    (cond("age", "eq", 30), ["Alice", "Frank"]),
    (cond("age", "eq", 28.5), ["Grace"]),
    (cond("active", "eq", True), ["Alice", "Carol", "Dave", "Frank", "Grace"]),
    (cond("active", "eq", False), ["Bob", "Eve"]),
    (cond("active", "eq", None), ["heidi"]),
    (cond("age", "gt", 30), ["Carol", "Dave", "heidi"]),
    (cond("age", "lt", 25), ["Eve"]),
    (cond("name", "gt", "F"), ["Frank", "Grace", "heidi"]),
    (cond("age", "between", 25, value2=30), ["Alice", "Bob", "Frank", "Grace"]),
    (cond("age", "between", 28.5, value2=28.5), ["Grace"]),
    (cond("address.city", "in", ["Rome", "London"]), ["Dave", "Frank", "heidi"]),
    (cond("age", "in", [22, 45, "30"]), ["Eve", "heidi"]),
    (cond("age", "in", []), []),
    (cond("name", "contains", "AL"), ["Alice"]),
    (cond("name", "contains", "e"), ["Alice", "Dave", "Eve", "Grace", "heidi"]),
    (cond("address.city", "contains", "ARI"), ["Alice", "Carol", "Grace"]),
    (cond("address.city", "eq", "Paris"), ["Alice", "Carol", "Grace"]),
    (cond("address.zip", "eq", "75001"), []),
    ({"and": [cond("age", "gt", 25), cond("address.city", "eq", "Paris")]}, ["Alice", "Carol", "Grace"]),
    ({"AND": [cond("age", "gt", 25), cond("address.city", "eq", "Paris")]}, ["Alice", "Carol", "Grace"]),
    ({"or": [cond("address.city", "eq", "Rome"), cond("age", "lt", 23)]}, ["Eve", "Frank"]),
    ({"OR": [cond("address.city", "eq", "Rome"), cond("age", "lt", 23)]}, ["Eve", "Frank"]),
    ({"not": cond("active", "eq", True)}, ["Bob", "Eve", "heidi"]),
    ({"NOT": cond("active", "eq", True)}, ["Bob", "Eve", "heidi"]),
    ({"And": [{"Or": [cond("address.city", "eq", "Berlin"), cond("address.city", "eq", "London")]},
              {"Not": cond("age", "gt", 40)}]}, ["Bob", "Dave", "Eve"]),
    ([cond("age", "gt", 25), cond("address.city", "eq", "Paris")], ["Alice", "Carol", "Grace"]),
    ({}, USER_NAMES),
    ([], USER_NAMES),
    (None, USER_NAMES),
])
def test_query_operators(populated, where, expected):
    assert names_matching(populated, where) == expected


def test_query_items_and_defaults(populated):
    answer = post_query(populated, {"path": "/users"}).json
    assert answer["items"] == answer["results"] and len(answer["items"]) == 8
    assert answer["has_more"] is False and "total" not in answer
    item = answer["items"][0]
    assert item["path"] == "/users/u1.json" and item["content_type"] == "application/json"
    assert item["total_size"] == len(json.dumps(USERS[0]))
    for key in ("score", "created_at", "updated_at", "matched_by"):
        assert key in item
    matched = post_query(populated, {"path": "/users", "where": cond("age", "gt", 40)}).json["items"]
    assert matched[0]["matched_by"] == ["age"]
    # Only documents directly in the directory; none of another directory or database.
    assert post_query(populated, {"path": "/users/sub"}).json["items"][0]["path"] == "/users/sub/u9.json"
    everything_at_root = post_query(populated, {"path": "/"}).json
    assert everything_at_root["items"] == []
    assert post_query(populated, {"path": "/users/", "where": cond("name", "eq", "Zed")}).json["items"] == []


def test_query_order_by(populated):
    assert names_matching(populated, {}, order_by=[{"field": "age", "direction": "desc"}]) == \
        ["heidi", "Dave", "Carol", "Alice", "Frank", "Grace", "Bob", "Eve"]
    assert names_matching(populated, {}, order_by=[{"field": "address.city", "direction": "asc"},
                                                   {"field": "age", "direction": "desc"}]) == \
        ["Bob", "Eve", "heidi", "Dave", "Carol", "Alice", "Grace", "Frank"]
    assert names_matching(populated, {}, order_by=[{"field": "name", "direction": "DESC"}]) == \
        ["heidi", "Grace", "Frank", "Eve", "Dave", "Carol", "Bob", "Alice"]
    assert names_matching(populated, {}, order_by=[{"field": "@path", "direction": "desc"}]) == USER_NAMES[::-1]
    assert names_matching(populated, {}, order_by="name") == sorted(USER_NAMES)
    # Ties keep a stable order (by path).
    assert names_matching(populated, cond("age", "eq", 30), order_by=[{"field": "age"}]) == ["Alice", "Frank"]
    post_query(populated, {"path": "/users", "order_by": [{"field": "age", "direction": "up"}]}, status=400)


def test_order_by_a_non_string_field_is_400(client):
    answer = client.post("/db/_query", json.dumps({"order_by": [{"field": ["a"]}]}), headers=AUTH, status=400)
    assert "invalid field" in answer.json["error"]


def test_query_default_limit(tmp_path):
    client, _ = make_app(tmp_path, query_limit=3)
    for number in range(5):
        put_file(client, "q", f"/d/{number}.json", json.dumps({"n": number}).encode())
    answer = post_query(client, {"path": "/d"}).json
    assert [item["path"] for item in answer["items"]] == ["/d/0.json", "/d/1.json", "/d/2.json"]
    assert answer["has_more"] is True
    assert len(post_query(client, {"path": "/d", "limit": 10}).json["items"]) == 5


def test_query_paging_and_total(populated):
    pages, offset = [], 0
    while True:
        answer = post_query(populated, {"path": "/users", "order_by": [{"field": "name"}], "limit": 3,
                                        "offset": offset, "include_total": True}).json
        assert answer["total"] == 8
        pages.append([item["path"] for item in answer["items"]])
        if not answer["has_more"]:
            break
        offset += 3
    assert [len(page) for page in pages] == [3, 3, 2]
    assert sum(pages, []) == [f"/users/u{n}.json" for n in range(1, 9)]
    filtered = post_query(populated, {"path": "/users", "where": cond("address.city", "eq", "Paris"),
                                      "limit": 1, "include_total": True}).json
    assert filtered["total"] == 3 and len(filtered["items"]) == 1 and filtered["has_more"] is True
    exact = post_query(populated, {"path": "/users", "limit": 8}).json
    assert len(exact["items"]) == 8 and exact["has_more"] is False
    assert post_query(populated, {"path": "/users", "limit": 0}).json["items"] == []


def test_query_body_that_is_not_json_is_400(populated):
    answer = populated.post("/q/_query", b"{not json", headers=AUTH, status=400)
    assert "JSON" in answer.json["error"]


@pytest.mark.parametrize("spec, words", [
    ({"path": "/users", "where": cond("name", "ne", "Alise")}, ["Unknown operation", "'ne'"]),
    ({"path": "/users", "where": cond("name", "similar", 5)}, ["similar"]),
    ({"path": "/users", "where": 5}, []),
    ({"path": "/users", "where": "name = 'Alice'"}, []),
    ({"path": "/users", "where": cond('na"me', "eq", "Alice")}, ["field"]),
    ({"path": "/users", "where": cond("name')) OR 1=1 --", "eq", "x")}, ["field"]),
    ({"path": "/users", "where": {"field": "name", "op": "eq"}}, []),
    ({"path": "/users", "where": {"and": cond("age", "gt", 1)}}, ["and"]),
    ({"path": "/users", "where": {"or": []}}, []),
    ({"path": "/users", "where": {"and": [], "or": []}}, []),
    ({"path": "/users", "where": cond("age", "between", 1)}, ["between"]),
    ({"path": "/users", "where": cond("age", "in", 30)}, ["in"]),
    ({"path": "/users", "where": cond("age", "gt", [1])}, []),
    ({"path": "/users", "where": cond("age", "gt", True)}, []),
    ({"path": "/users", "where": cond("name", "contains", 5)}, ["contains"]),
    ({"path": "/users", "limit": "ten"}, ["limit"]),
    ({"path": "/users", "limit": -1}, ["limit"]),
    ({"path": "/users", "offset": 1.5}, ["offset"]),
    ({"path": "users"}, ["absolute"]),
    ({"path": "/users/../x"}, []),
    ({"path": 7}, []),
    (["/users"], []),
    ("just text", []),
])
def test_query_errors(populated, spec, words):
    answer = post_query(populated, spec, status=400).json
    assert isinstance(answer["error"], str) and answer["error"]
    for word in words:
        assert word in answer["error"], answer


def test_query_from_a_plugin_matches_http(populated):
    specs = [
        {"path": "/users", "where": {"AND": [cond("age", "gt", 24), {"NOT": cond("address.city", "eq", "Rome")}]},
         "order_by": [{"field": "age", "direction": "desc"}], "limit": 2, "offset": 1, "include_total": True},
        {"path": "/users", "where": [cond("tags", "eq", ["dev"])]},
        {"path": "/users", "where": cond("name", "fuzzy", "x")},
    ]
    for spec in specs:
        from_plugin = call_host(populated, "q", "aeordb_query", spec, table="query")
        from_http = populated.post("/q/_query", json.dumps(spec), headers=AUTH, expect_errors=True)
        assert from_plugin == from_http.json
        if from_http.status_int == 200:
            assert from_plugin["items"] == from_plugin["results"]
    bob = call_host(populated, "q", "aeordb_query", specs[1], table="query")["items"]
    assert [item["path"] for item in bob] == ["/users/u2.json", "/users/u8.json"]


# -- aggregates ----------------------------------------------------------------

def test_aggregate_totals(populated):
    answer = post_aggregate(populated, {"count": True, "sum": ["age"], "avg": ["age"], "min": ["age"],
                                        "max": ["age", "name"]}).json
    ages = [user["age"] for user in USERS]
    assert answer["count"] == 8 and answer["total_count"] == 8
    assert answer["sum"] == {"age": sum(ages)}
    assert answer["avg"]["age"] == pytest.approx(sum(ages) / 8)
    assert answer["min"] == {"age": 22} and answer["max"]["age"] == 45
    assert answer["groups"] == [] and answer["has_more"] is False
    without_count = post_aggregate(populated, {"sum": ["age"]}).json
    assert "count" not in without_count and without_count["total_count"] == 8
    filtered = post_aggregate(populated, {"count": True, "sum": ["age"]}, where=cond("active", "eq", True)).json
    assert filtered["count"] == 5 and filtered["sum"]["age"] == 30 + 35 + 40 + 30 + 28.5
    nothing = post_aggregate(populated, {"count": True, "avg": ["age"]}, where=cond("age", "gt", 100)).json
    assert nothing["count"] == 0 and nothing["avg"] == {"age": None}


def test_aggregate_group_by(populated):
    answer = post_aggregate(populated, {"count": True, "sum": ["age"], "avg": ["age"], "min": ["age"],
                                        "max": ["age"], "group_by": ["address.city"]}).json
    groups = {group["key"]["address.city"]: group for group in answer["groups"]}
    assert [group["key"] for group in answer["groups"]] == \
        [{"address.city": city} for city in ("Berlin", "London", "Paris", "Rome")]
    assert {city: group["count"] for city, group in groups.items()} == \
        {"Berlin": 2, "London": 2, "Paris": 3, "Rome": 1}
    assert groups["Paris"]["sum"] == {"age": 93.5} and groups["Paris"]["min"] == {"age": 28.5}
    assert groups["London"]["max"] == {"age": 45} and groups["Berlin"]["avg"] == {"age": 23.5}
    assert answer["total_count"] == 8 and answer["count"] == 8 and answer["has_more"] is False
    assert answer["sum"] == {"age": sum(user["age"] for user in USERS)}

    two = post_aggregate(populated, {"count": True, "group_by": ["address.city", "active"]}).json
    counted = {(g["key"]["address.city"], g["key"]["active"]): g["count"] for g in two["groups"]}
    assert counted == {("Berlin", False): 2, ("London", True): 1, ("London", None): 1,
                       ("Paris", True): 3, ("Rome", True): 1}
    assert all(set(g["key"]) == {"address.city", "active"} for g in two["groups"])

    capped = post_aggregate(populated, {"count": True, "group_by": ["address.city"]}, limit=2).json
    assert [g["key"]["address.city"] for g in capped["groups"]] == ["Berlin", "London"]
    assert capped["has_more"] is True and capped["total_count"] == 8
    rest = post_aggregate(populated, {"count": True, "group_by": ["address.city"]}, limit=2, offset=2).json
    assert [g["key"]["address.city"] for g in rest["groups"]] == ["Paris", "Rome"]
    assert rest["has_more"] is False
    filtered = post_aggregate(populated, {"count": True, "group_by": ["address.city"]},
                              where=cond("age", "lt", 30)).json
    assert {g["key"]["address.city"]: g["count"] for g in filtered["groups"]} == {"Berlin": 2, "Paris": 1}
    assert filtered["total_count"] == 3


@pytest.mark.parametrize("aggregate", [{"median": ["age"]}, {"count": True, "percentile": ["age"]},
                                       "count", {"sum": "age OR 1"}, {"sum": [5]}, {"group_by": {"a": 1}}])
def test_aggregate_errors(populated, aggregate):
    answer = post_aggregate(populated, aggregate, status=400).json
    assert answer["error"]
    if isinstance(aggregate, dict) and "median" in aggregate:
        assert "median" in answer["error"]


def test_aggregate_from_a_plugin_matches_http(populated):
    spec = {"path": "/users", "where": cond("age", "gt", 20),
            "aggregate": {"count": True, "avg": ["age"], "group_by": ["address.city"]}, "limit": 3}
    from_plugin = call_host(populated, "q", "aeordb_aggregate", spec, table="aggregate")
    assert from_plugin == post_query(populated, spec).json
    assert len(from_plugin["groups"]) == 3 and from_plugin["has_more"] is True
    missing = call_host(populated, "q", "aeordb_aggregate", {"path": "/users"}, table="aggregate")
    assert "aggregate" in missing["error"]


# -- documents and queries at the edges ----------------------------------------

def test_contains_is_case_insensitive_beyond_ascii(client):
    for number, name in enumerate(["Élodie", "ÉCOLE normale", "Zoë", "plain"]):
        put_file(client, "q", f"/i/{number}.json", json.dumps({"name": name}).encode())

    def names(needle):
        answer = post_query(client, {"path": "/i", "where": cond("name", "contains", needle)}).json
        return [int(item["path"][3:-5]) for item in answer["items"]]
    assert names("élo") == [0]
    assert names("école") == [1]
    assert names("ZOË") == [2]
    assert names("É") == [0, 1]
    assert names("PLAIN") == [3]


def test_query_numbers_and_offsets_beyond_64_bits(populated):
    assert names_matching(populated, cond("age", "eq", 10 ** 30)) == []
    assert names_matching(populated, cond("age", "lt", 10 ** 30)) == USER_NAMES
    assert names_matching(populated, cond("age", "gt", -10 ** 30)) == USER_NAMES
    assert names_matching(populated, cond("age", "between", -10 ** 30, value2=25)) == ["Bob", "Eve"]
    assert names_matching(populated, cond("age", "in", [10 ** 30, 22])) == ["Eve"]
    assert names_matching(populated, cond("age", "lt", 10 ** 400)) == USER_NAMES
    assert names_matching(populated, cond("age", "gt", -10 ** 400)) == USER_NAMES
    answer = post_query(populated, {"path": "/users", "offset": 10 ** 30, "limit": 10 ** 30}).json
    assert answer["items"] == [] and answer["has_more"] is False
    assert len(post_query(populated, {"path": "/users", "limit": 10 ** 30}).json["items"]) == 8


def test_query_with_many_conditions(populated):
    ages = list(range(1000, 3000)) + [22, 45]
    assert names_matching(populated, cond("age", "in", ages)) == ["Eve", "heidi"]
    wide_or = {"OR": [cond("age", "eq", age) for age in ages]}
    assert names_matching(populated, wide_or) == ["Eve", "heidi"]
    wide_and = [cond("age", "lt", 1000 + n) for n in range(1500)]
    assert names_matching(populated, wide_and) == USER_NAMES
    # Past the server's bound it is a clear 400, never a 500 from SQLite.
    too_many = post_query(populated, {"path": "/users", "where": cond("age", "in", list(range(100_000)))},
                          status=400).json
    assert "conditions" in too_many["error"]


def test_json_that_sqlite_refuses_is_kept_but_not_queried(client):
    """Python's json accepts NaN and any depth; a document SQLite cannot parse must not
    turn every query over its directory into an error."""
    oddities = {"/j/nan.json": b'{"age": NaN}', "/j/inf.json": b'{"age": Infinity}',
                "/j/deep.json": b'{"a":' * 5000 + b"1" + b"}" * 5000,
                "/j/nul.json": b'{"age": 1}\x00'}
    for path, data in oddities.items():
        assert put_file(client, "q", path, data, "application/json").status_int == 201, path
    put_file(client, "q", "/j/ok.json", b'{"age": 3}', "application/json")
    for where, expected in ((cond("age", "gt", 1), ["/j/ok.json"]), ({}, ["/j/ok.json"]),
                            (cond("a", "eq", 1), [])):
        answer = post_query(client, {"path": "/j", "where": where})
        assert [item["path"] for item in answer.json["items"]] == expected, where
    aggregate = post_query(client, {"path": "/j", "aggregate": {"count": True, "sum": ["age"]}}).json
    assert aggregate["count"] == 1 and aggregate["sum"] == {"age": 3}
    for path, data in oddities.items():
        assert client.get(f"/q/_files{path}", headers=AUTH).body == data


# -- today's query language: text operators, @ fields and cursors ----
# The expected answers come from the reference implementations below, written
# apart from aeordb.py's (recursion instead of a band, a regex rule table
# instead of a letter switch...), over seeded random words with typos.

def ref_trigrams(text: str) -> set:
    words, word = [], ""
    for char in text.lower() + " ":
        if char.isalnum():
            word += char
        elif word:
            words.append(word)
            word = ""
    return {("  " + w + " ")[i:i + 3] for w in words for i in range(len(w) + 1)}


def ref_similarity(a: str, b: str) -> float:
    x, y = ref_trigrams(a), ref_trigrams(b)
    return 0.0 if not x and not y else 2 * len(x & y) / (len(x) + len(y))


def ref_osa(a: str, b: str) -> int:
    @functools.lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        best = min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
        if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
            best = min(best, d(i - 2, j - 2) + 1)
        return best
    return d(len(a), len(b))


def ref_jaro_winkler(s: str, t: str) -> float:
    if not s or not t:
        return float(s == t)
    reach = max(max(len(s), len(t)) // 2 - 1, 0)
    s_hits, t_hits = [], set()
    for i, char in enumerate(s):
        for j in range(max(0, i - reach), min(len(t), i + reach + 1)):
            if j not in t_hits and t[j] == char:
                t_hits.add(j)
                s_hits.append(char)
                break
    m = len(s_hits)
    if not m:
        return 0.0
    half = sum(x != y for x, y in zip(s_hits, (t[j] for j in sorted(t_hits)))) / 2
    jaro = (m / len(s) + m / len(t) + (m - half) / m) / 3
    prefix = len(os.path.commonprefix([s[:4], t[:4]]))
    return jaro + prefix * 0.1 * (1 - jaro)


REF_SOUNDEX = {**dict.fromkeys("AEIOUY", "0"), **dict.fromkeys("HW", "-"), **dict.fromkeys("BFPV", "1"),
               **dict.fromkeys("CGJKQSXZ", "2"), **dict.fromkeys("DT", "3"), "L": "4", "M": "5", "N": "5", "R": "6"}


def ref_soundex(word: str) -> str:
    letters = [c for c in word.upper() if c in REF_SOUNDEX]
    if not letters:
        return ""
    out, last = letters[0], REF_SOUNDEX[letters[0]]
    for letter in letters[1:]:
        code = REF_SOUNDEX[letter]
        if code == "-":
            continue
        if code != "0" and code != last:
            out += code
        last = code
    return (out + "000")[:4]


# (regex at the position, code or a function of (index, previous letter, code so far), letters consumed)
REF_METAPHONE_RULES = [
    (r"[AEIOU]", lambda i, p, out: "A" if i == 0 else "", 1),
    (r"BB", "P", 2), (r"B", "P", 1),
    (r"CH", "X", 2), (r"C[IEY]", "S", 2), (r"CC(?![IE])", "K", 2), (r"C", "K", 1),
    (r"DG[IEY]", "J", 3), (r"DD", "T", 2), (r"D", "T", 1),
    (r"GH", lambda i, p, out: "" if i > 0 and p in "AEIOU" else "K", 2), (r"GN", "", 2),
    (r"G[IEY]", lambda i, p, out: "J" if p != "G" else "K", None),
    (r"GG", lambda i, p, out: "K" if i == 0 else "", 2), (r"G", "K", 1),
    (r"H(?=[AEIOU])", lambda i, p, out: "" if p and p in "AEIOU" else "H", 1), (r"H", "", 1),
    (r"K", "K", None),
    (r"PH", "F", 2), (r"PP", "P", 2), (r"P", "P", 1), (r"QQ", "K", 2), (r"Q", "K", 1),
    (r"SH", "X", 2), (r"SCH", "X", 3), (r"S[IE][OA]", "X", 3), (r"S[SZ]", "S", 2), (r"S", "S", 1),
    (r"TH", "0", 2), (r"TI[OA]", "X", 3), (r"TT", "T", 2), (r"T", "T", 1),
    (r"VV", "F", 2), (r"V", "F", 1), (r"[WY](?=[AEIOU])", "A", 1), (r"[WY]", "", 1),
    (r"XX", lambda i, p, out: "KS" if len(out) < 3 else "K", 2), (r"X", lambda i, p, out: "KS" if len(out) < 3 else "K", 1),
    (r"ZZ", "S", 2), (r"Z", "S", 1),
    (r"([FJLMNR])\1", lambda i, p, out: None, 2), (r"[FJLMNR]", lambda i, p, out: None, 1),
]


def ref_metaphone(word: str) -> tuple:
    w = "".join(c for c in word.upper() if "A" <= c <= "Z")
    if not w:
        return "", None
    out, i = "", 1 if w[:2] in ("GN", "KN", "PN", "AE", "WR") else 0
    while i < len(w) and len(out) < 4:
        previous = w[i - 1] if i else ""
        for pattern, code, step in REF_METAPHONE_RULES:
            if re.match(pattern, w[i:]):
                emitted = code(i, previous, out) if callable(code) else code
                out += w[i] if emitted is None else emitted
                if step is None:   # G before I/E/Y after a G, and K: their own steps
                    step = (2 if previous != "G" else 1) if w[i] == "G" else (2 if previous == "C" else 1)
                i += step
                break
    primary = out[:4]
    alternate = ("S" + primary[1:])[:4] if w.startswith("SCH") else primary
    return primary, alternate if alternate != primary else None


def ref_phonetic(value: str, query: str) -> list:
    def codes(text):
        return [(ref_soundex(w), *ref_metaphone(w)) for w in text.split() if any(c.isalpha() for c in w)]
    mine, theirs = codes(query), codes(value)
    labels = []
    if any(s and s == t[0] for s, _, _ in mine for t in theirs):
        labels.append("soundex")
    if any(p and p in t[1:] for _, p, _ in mine for t in theirs):
        labels.append("dmetaphone")
    if any(a and a in t[1:] for _, _, a in mine for t in theirs):
        labels.append("dmetaphone_alt")
    return labels


def ref_auto(query: str) -> int:
    size = len(query.encode())
    return 0 if size < 3 else 1 if size < 6 else 2


def ref_dl_score(value: str, query: str, allowed: int):
    d = ref_osa(query, value)
    return 1 - d / max(len(query.encode()), len(value.encode(errors="surrogatepass")), 1) if d <= allowed else None


def ref_match(value: str, query: str) -> tuple:
    parts = []
    if value.lower() == query.lower():
        parts.append(("exact", 1.0))
    if ref_similarity(query, value) > 0.3:
        parts.append(("trigram", ref_similarity(query, value)))
    parts += [(label, 1.0) for label in ref_phonetic(value, query) if label != "dmetaphone_alt"]
    fuzzy = ref_dl_score(value, query, ref_auto(query))
    if fuzzy is not None:
        parts.append(("fuzzy", fuzzy))
    score = max((s for _, s in parts), default=0.0)
    return (score, [label for label, _ in parts]) if score > 0 else (None, [])


def ref_leaf(op: str, query: str, **options):
    """(value -> (score or None, matched_by)) of one text condition, by the references."""
    if op == "similar":
        threshold = options.get("threshold", 0.3)
        return lambda v: ((ref_similarity(query, v), ["trigram"])
                          if ref_similarity(query, v) >= threshold and ref_similarity(query, v) > 0 else (None, []))
    if op == "phonetic":
        return lambda v: (1.0, ref_phonetic(v, query)) if ref_phonetic(v, query) else (None, [])
    if op == "match":
        return lambda v: ref_match(v, query)
    fuzziness = options.get("fuzziness", "auto")
    fixed = max(fuzziness, 0) if isinstance(fuzziness, int) else None
    if options.get("algorithm") == "jaro_winkler":
        threshold = 0.8 if fixed is None else 1 - fixed / max(len(query.encode()), 1)
        return lambda v: ((ref_jaro_winkler(query, v), ["trigram"]) if ref_jaro_winkler(query, v) >= threshold
                          and ref_jaro_winkler(query, v) > 0 else (None, []))
    allowed = ref_auto(query) if fixed is None else fixed
    return lambda v: (ref_dl_score(v, query, allowed), ["trigram"])


FACT_WORDS = ["Smith", "Smythe", "Smyth", "Schmidt", "smith", "smith john", "Martha", "DUANE", "Rupert", "Robert",
              "restaurant", "Ashcraft", "Pfister", "cabin", "cab", "abc", "Item 20", "Johnson", "Knight", "Thompson",
              "Xavier", "Jackson", "Eggert", "Aeon", "Edge", "Nation", "Session", "Caesar", "Schwarz", "Smidt",
              # past ASCII: upper-cased or lower-cased into ASCII letters, or not at all
              "straße", "ﬁsh", "\u212aate", "İstanbul", "Zoë", "Ölaf", "123", "!!", "lone \ud800 Smith"]


def generated_words(count: int, seed: int = 16) -> list:
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiouy"] + ["sch", "th", "ph", "ck", "x"]
    words = []
    for _ in range(count):
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
        word = word.capitalize() if rng.random() < 0.6 else word
        if rng.random() < 0.4:   # a typo: delete, insert, substitute or swap
            at, kind = rng.randrange(len(word)), rng.randrange(4)
            letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
            word = [word[:at] + word[at + 1:], word[:at] + letter + word[at:], word[:at] + letter + word[at + 1:],
                    word[:at] + word[at + 1:at + 2] + word[at:at + 1] + word[at + 2:]][kind] or word
        if rng.random() < 0.1:
            word += " " + rng.choice(FACT_WORDS)
        words.append(word)
    return words


WORDY_NAMES = FACT_WORDS + generated_words(160)


@pytest.fixture(scope="module")
def wordy(tmp_path_factory):
    """/w: one document per word of WORDY_NAMES, in 'name' and 'person.name'; some without a string name."""
    client, _ = make_app(tmp_path_factory.mktemp("wordy"))
    for number, name in enumerate(WORDY_NAMES):
        put_file(client, "t", f"/w/d{number:03d}.json",
                 json.dumps({"name": name, "n": number, "person": {"name": name}}).encode(), "application/json")
    put_file(client, "t", "/w/number.json", b'{"name": 5, "n": -1}', "application/json")
    put_file(client, "t", "/w/object.json", b'{"name": {"Smith": 1}, "n": -2}', "application/json")
    put_file(client, "t", "/w/none.json", b'{"n": -3}', "application/json")
    return client


def text_query(client, where, status=200, **extra):
    return client.post("/t/_query", json.dumps({"path": "/w", "where": where, "limit": 1000, **extra}),
                       headers=AUTH, status=status, content_type="application/json")


def expected_text(field: str, op: str, query: str, **options) -> dict:
    """path: (score, matched_by) of the documents the reference implementations match (name and
    person.name hold the same word)."""
    leaf = ref_leaf(op, query, **options)
    expected = {}
    for number, name in enumerate(WORDY_NAMES):
        score, labels = leaf(name)
        if score is not None:
            expected[f"/w/d{number:03d}.json"] = (score, labels)
    return expected


def assert_ranked(items: list, expected: dict) -> None:
    """Items are exactly ``expected`` (path: (score, matched_by)), by score descending, then path."""
    assert {item["path"] for item in items} == set(expected), \
        (sorted({i["path"] for i in items} ^ set(expected)))
    for item in items:
        score, labels = expected[item["path"]]
        assert item["score"] == pytest.approx(score, abs=1e-12) and item["matched_by"] == labels, item
    for first, second in zip(items, items[1:]):
        assert (-first["score"], first["path"]) < (-second["score"], second["path"])


WORDY_QUERIES = ["Smith", "smith", "Smiht", "Marhta", "DWAYNE", "Robert", "restarant", "Jakson", "strasse",
                 "fish", "Kate", "istanbul", "Schmitt", "zoe", "ab", "123", "!!", "Sch"] + generated_words(12, seed=7)


@pytest.mark.parametrize("op, options", [
    ("similar", {}), ("similar", {"threshold": 0.5}), ("similar", {"threshold": 0.1}),
    ("phonetic", {}), ("match", {}),
    ("fuzzy", {}), ("fuzzy", {"fuzziness": 1}), ("fuzzy", {"fuzziness": 3}), ("fuzzy", {"fuzziness": -4}),
    ("fuzzy", {"algorithm": "jaro_winkler"}), ("fuzzy", {"algorithm": "jaro_winkler", "fuzziness": 2}),
    ("fuzzy", {"algorithm": "Jaro_Winkler"}), ("fuzzy", {"fuzziness": "AUTO"}),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()) or "defaults")
def test_text_operators_match_the_reference_implementations(wordy, op, options):
    for number, query in enumerate(WORDY_QUERIES):
        field = ("name", "person.name")[number % 2]
        answer = text_query(wordy, {"field": field, "op": op, "value": query, **options}).json
        assert_ranked(answer["items"], expected_text(field, op, query, **options))
        assert answer["items"] == answer["results"]
    # A plugin's aeordb_query answers the same.
    where = {"field": "name", "op": op, "value": "Smith", **options}
    from_plugin = call_host(wordy, "t", "aeordb_query", {"path": "/w", "where": where, "limit": 40}, table="text")
    assert_ranked(from_plugin["items"], expected_text("name", op, "Smith", **options))
    assert from_plugin["items"] == from_plugin["results"]


def test_the_reference_implementations_give_the_facts_examples():
    metaphones = {"Smith": "SM0", "Smythe": "SM0", "Schmidt": "XMTT", "Martha": "MR0", "Johnson": "JNSN",
                  "Knight": "NT", "Thompson": "0MPS", "Xavier": "KSFR", "Jackson": "JKKN", "Eggert": "ART",
                  "Aeon": "N", "Edge": "AJ", "Nation": "NXN", "Session": "SSN", "Caesar": "KSR", "Schwarz": "XARS"}
    soundexes = {"Robert": "R163", "Rupert": "R163", "Ashcraft": "A261", "Pfister": "P236", "A": "A000", "123": ""}
    for metaphone, soundex in ((ref_metaphone, ref_soundex), (aeordb.double_metaphone, aeordb.soundex)):
        assert {word: metaphone(word)[0] for word in metaphones} == metaphones
        assert metaphone("Schmidt") == ("XMTT", "SMTT") and metaphone("Schwarz") == ("XARS", "SARS")
        assert metaphone("Smith")[1] is None
        assert {word: soundex(word) for word in soundexes} == soundexes
    for grams in (ref_trigrams, aeordb.trigrams):
        assert grams("Item 20") == {"  i", " it", "ite", "tem", "em ", "  2", " 20", "20 "}
    for similarity in (ref_similarity, aeordb.trigram_similarity):
        assert similarity("Smith", "Smyth") == 0.5 and similarity("john smith", "smith john") == 1.0
        assert similarity("Smith", "Smythe") == pytest.approx(0.3077, abs=1e-4) and similarity("", "") == 0.0
    for jaro_winkler in (ref_jaro_winkler, aeordb.jaro_winkler):
        assert jaro_winkler("DWAYNE", "DUANE") == pytest.approx(0.84)
        assert jaro_winkler("Marhta", "Martha") == pytest.approx(0.9611, abs=1e-4)
        assert jaro_winkler("", "") == 1.0 and jaro_winkler("a", "") == 0.0
    for osa in (ref_osa, aeordb.osa_distance):
        assert osa("restarant", "restaurant") == 1 and osa("Smiht", "Smith") == 1 and osa("ca", "abc") == 3
    assert [aeordb.auto_fuzziness(q) for q in ("", "ab", "abc", "abcde", "abcdef", "ü", "üü", "üüü")] == \
        [ref_auto(q) for q in ("", "ab", "abc", "abcde", "abcdef", "ü", "üü", "üüü")] == [0, 0, 1, 1, 2, 0, 1, 2]


def test_the_facts_examples_through_the_server(wordy):
    def scored(where, **extra):
        return {WORDY_NAMES[int(item["path"][4:7])]: (round(item["score"], 4), item["matched_by"])
                for item in text_query(wordy, where, **extra).json["items"]}
    match = scored(cond("name", "match", "Smith"))
    assert match["Smythe"] == (1.0, ["trigram", "soundex", "dmetaphone"])
    assert match["Schmidt"] == (1.0, ["soundex"])
    assert match["smith"] == (1.0, ["exact", "trigram", "soundex", "dmetaphone", "fuzzy"])
    phonetic = scored(cond("name", "phonetic", "Smith"))
    assert phonetic["Smith"] == phonetic["Smythe"] == (1.0, ["soundex", "dmetaphone"])
    assert phonetic["Schmidt"] == (1.0, ["soundex"])
    assert scored(cond("name", "phonetic", "Robert"))["Rupert"] == (1.0, ["soundex", "dmetaphone"])   # R163, RPRT
    assert scored(cond("name", "phonetic", "123")) == {}                # no alphabetic word
    assert scored(cond("name", "phonetic", "Schmidt"))["Smidt"] == (1.0, ["soundex", "dmetaphone_alt"])   # S530, SMTT
    similar = scored(cond("name", "similar", "Smith"))
    assert similar["Smyth"] == (0.5, ["trigram"]) and similar["Smythe"] == (0.3077, ["trigram"])
    assert "Smythe" not in scored(cond("name", "similar", "Smith", threshold=0.31))
    assert scored(cond("name", "similar", {"text": "john smith", "threshold": 0.9}))["smith john"] == (1.0, ["trigram"])
    assert scored(cond("name", "similar", "Item 20"))["Item 20"] == (1.0, ["trigram"])
    fuzzy = scored(cond("name", "fuzzy", "restarant"))
    assert fuzzy == {"restaurant": (0.9, ["trigram"])}
    assert scored(cond("name", "fuzzy", "Smiht"))["Smith"] == (0.8, ["trigram"])
    assert scored(cond("name", "fuzzy", "smith"))["Smith"] == (0.8, ["trigram"])      # case-sensitive, 1 edit
    assert scored(cond("name", "fuzzy", "Smiht", fuzziness=-1)) == {}                  # Fixed(0)
    assert scored(cond("name", "fuzzy", "Marhta", algorithm="jaro_winkler"))["Martha"] == (0.9611, ["trigram"])
    assert scored(cond("name", "fuzzy", "DWAYNE", algorithm="jaro_winkler"))["DUANE"] == (0.84, ["trigram"])
    # contains rechecks every document: no trigram pre-filter misses 'cabin'.
    contains = scored(cond("name", "contains", "ab"))
    assert {"cabin", "cab", "abc"} <= set(contains) and contains["cabin"] == (1.0, ["name"])
    # Past ASCII: the pre-filters in SQL fold no case there, the answers still do.
    assert "straße" in scored(cond("name", "phonetic", "strasse"))
    assert "ﬁsh" in scored(cond("name", "phonetic", "FISH"))
    assert "\u212aate" in scored(cond("name", "similar", "kate"))
    assert "İstanbul" in scored(cond("name", "similar", "istanbul"))
    # A lone surrogate (JSON allows "\ud800"; SQLite keeps it) breaks no query.
    for op in ("contains", "similar", "phonetic", "match", "fuzzy"):
        assert "lone \ud800 Smith" in scored(cond("name", op, "lone \u00e9 Smith" if op != "contains" else "SMITH",
                                                   **({"fuzziness": 1} if op == "fuzzy" else {})))


def test_the_sql_pre_filters_know_every_character_that_folds_into_ascii():
    """The pre-filters fold case in SQLite, which knows ASCII only; these tables name the rest."""
    others = [chr(code) for code in range(128, sys.maxunicode + 1)]
    assert aeordb._UPPER_TO_ASCII == "".join(c for c in others if any("A" <= x <= "Z" for x in c.upper()))
    assert set(aeordb._LOWER_TO_ASCII) == {c for c in others if any(x.isascii() and x.isalnum() for x in c.lower())}
    assert all(c.lower().startswith(folded) for c, folded in aeordb._LOWER_TO_ASCII.items())


def test_text_operators_combine_with_plain_ones(wordy):
    smith = {"field": "name", "op": "fuzzy", "value": "Smiht"}
    both = text_query(wordy, {"and": [smith, cond("n", "lt", 5)]}).json["items"]
    assert [(item["path"], item["score"], item["matched_by"]) for item in both] == \
        [("/w/d000.json", 0.8, ["n", "trigram"])]
    # OR of two scored conditions: an item's score is the better one it met.
    either = text_query(wordy, {"OR": [smith, cond("name", "similar", "Smyth")]}).json["items"]
    scores = {WORDY_NAMES[int(item["path"][4:7])]: item["score"] for item in either}
    assert scores["Smith"] == pytest.approx(max(0.8, ref_similarity("Smyth", "Smith")))
    assert scores["Smyth"] == 1.0 and scores["Smythe"] == pytest.approx(ref_similarity("Smyth", "Smythe"))
    # NOT of a text condition: everything it did not match, documents without a string name included.
    rest = text_query(wordy, {"not": smith}, include_total=True).json
    assert rest["total"] == len(WORDY_NAMES) + 3 - len(expected_text("name", "fuzzy", "Smiht"))
    assert {"/w/number.json", "/w/none.json"} <= {item["path"] for item in rest["items"]}
    assert all(item["score"] == 1.0 and item["matched_by"] == [] for item in rest["items"])
    # Plain conditions alone keep the seed era's order (path) and matched_by (field names).
    plain = text_query(wordy, cond("n", "lt", 0)).json["items"]
    assert [item["path"] for item in plain] == ["/w/none.json", "/w/number.json", "/w/object.json"]
    assert plain[0]["matched_by"] == ["n"] and plain[0]["size"] == plain[0]["total_size"]
    ordered = text_query(wordy, cond("name", "phonetic", "Smith"), order_by=[{"field": "n", "direction": "desc"}])
    numbers = [json.loads(wordy.get(f"/t/_files{i['path']}", headers=AUTH).body)["n"] for i in ordered.json["items"]]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) >= 3


def test_virtual_fields_filter_and_order(client):
    sizes = {}
    for name, body, kind in (("b.json", b'{"k": 1}', "application/json"), ("a.data.json", b'{"k": 22}', "text/json"),
                             ("noext", b'{"k": 333, "pad": "xxxxxxxxxx"}', "application/json")):
        sizes[name] = put_file(client, "v", f"/m/{name}", body, kind).json
    put_file(client, "v", "/m/sub/deeper.json", b'{"k": 4}', "application/json")

    def paths(where, **extra):
        answer = client.post("/v/_query", json.dumps({"path": "/m", "where": where, **extra}), headers=AUTH)
        return [item["path"].rsplit("/", 1)[1] for item in answer.json["items"]]
    assert paths(cond("@path", "eq", "/m/b.json")) == ["b.json"]
    assert paths(cond("@filename", "in", ["noext", "b.json"])) == ["b.json", "noext"]
    assert paths(cond("@file_name", "contains", "DATA")) == ["a.data.json"]
    assert paths(cond("@extension", "eq", "json")) == ["a.data.json", "b.json"]
    assert paths(cond("@extension", "eq", "")) == ["noext"]
    assert paths(cond("@content_type", "eq", "text/json")) == ["a.data.json"]
    assert paths(cond("@hash", "eq", sizes["noext"]["etag"])) == ["noext"]
    assert paths(cond("@size", "gt", 8)) == ["a.data.json", "noext"]
    assert paths(cond("@size", "eq", "8")) == []                                  # never across JSON types
    stamp = sizes["b.json"]["created_at"]
    assert paths(cond("@created_at", "between", stamp, value2=sizes["noext"]["created_at"])) == \
        ["a.data.json", "b.json", "noext"]
    assert paths(cond("@updated_at", "lt", stamp)) == []
    assert paths(cond("@filename", "fuzzy", "b.jsn")) == ["b.json"]
    assert paths({}, order_by=[{"field": "@size", "direction": "desc"}]) == ["noext", "a.data.json", "b.json"]
    assert paths({}, order_by=[{"field": "@filename"}]) == ["a.data.json", "b.json", "noext"]
    assert paths({}, order_by=[{"field": "@extension", "direction": "desc"}, "@path"]) == \
        ["a.data.json", "b.json", "noext"]
    similar = cond("@filename", "similar", "b data", threshold=0.1)
    assert paths(similar) == ["a.data.json", "b.json"]                         # score descending
    assert paths(similar, order_by=[{"field": "@score"}]) == ["b.json", "a.data.json"]
    # Any other @name is a document key, as in the seed era.
    put_file(client, "v", "/m/at.json", b'{"@owner": "me"}', "application/json")
    assert paths(cond("@owner", "eq", "me")) == ["at.json"]
    error = client.post("/v/_query", json.dumps({"path": "/m", "where": cond("@size", "fuzzy", "8")}),
                        headers=AUTH, status=400)
    assert "@size is a number" in error_of(error)


@pytest.mark.parametrize("where, message", [
    (cond("name", "ne", "x"), "Unknown operation: 'ne'"),
    (cond("name", "starts_with", "x"), "Unknown operation: 'starts_with'"),
    ({"field": "name", "value": "x"}, "Missing 'op' in where clause for field 'name'"),
    ({"field": "name", "op": "fuzzy"}, "Missing 'value' in where clause for field 'name'"),
    ({"op": "eq", "value": 1}, 'Invalid where clause structure: {"op":"eq","value":1}'),
    (cond("n", "between", 1), "Missing value2 for 'between' operation on field 'n'"),
    (cond("n", "in", 1), "'in' operation requires array value for field 'n'"),
    (cond("name", "contains", 1), "'contains' requires string value for field 'name'"),
    (cond("name", "similar", ["Smith"]), "'similar' requires string value for field 'name'"),
    (cond("name", "similar", {"threshold": 0.5}), "'similar' requires string value for field 'name'"),
    (cond("name", "phonetic", None), "'phonetic' requires string value for field 'name'"),
    (cond("name", "fuzzy", 3), "'fuzzy' requires string value for field 'name'"),
    (cond("name", "match", True), "'match' requires string value for field 'name'"),
    (cond("name", "similar", "x", threshold="high"), "'threshold' of 'similar' on field 'name' must be a number"),
    (cond(["name"], "fuzzy", "x"), "invalid field ['name']"),
    ({"or": [cond("name", "match", f"word{n} " * 40) for n in range(101)]},
     "query has more than 100 text conditions (similar, phonetic, fuzzy, match)"),
    (functools.reduce(lambda inner, _: {"not": inner}, range(40), cond("n", "eq", 1)),
     "Query nesting too deep (max 32 levels). Simplify the where clause"),
])
def test_query_language_errors_are_400_with_upstreams_messages(wordy, where, message):
    assert message in error_of(text_query(wordy, where, status=400))
    from_plugin = call_host(wordy, "t", "aeordb_query", {"path": "/w", "where": where}, table="errors")
    assert message in from_plugin["error"]


def decoded_cursor(cursor: str) -> dict:
    raw = base64.b64decode(cursor, validate=True)
    body = json.loads(raw)
    assert raw == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return body


def test_cursors_page_through_answers(wordy):
    spec = {"where": cond("name", "match", "Smith"), "limit": 3, "include_total": True}
    everything = text_query(wordy, spec["where"]).json["items"]
    assert len(everything) > 7
    pages, cursor = [], None
    while True:
        answer = text_query(wordy, spec["where"], limit=3, include_total=True,
                            **({"after": cursor} if cursor else {})).json
        assert answer["total"] == len(everything)       # the total counts every match, cursors or not
        assert ("prev_cursor" in answer) == bool(cursor)
        pages.append(answer["items"])
        if not answer["has_more"]:
            assert "next_cursor" not in answer
            break
        cursor = answer["next_cursor"]
        body = decoded_cursor(cursor)
        assert body["_hash"] == sha256_hex(f"file:{answer['items'][-1]['path']}".encode())
        assert set(body) == {"_hash", "_version"}
    assert sum(pages, []) == everything
    # before: the items ahead of the one named, then offset and limit from the start.
    middle = everything[5]["path"]
    named = base64.b64encode(json.dumps({"_hash": sha256_hex(f"file:{middle}".encode())}).encode()).decode()
    before = text_query(wordy, spec["where"], before=named).json
    assert before["items"] == everything[:5] and "prev_cursor" not in before
    assert text_query(wordy, spec["where"], before=named, limit=2, offset=1).json["items"] == everything[1:3]
    assert text_query(wordy, spec["where"], after=named, before=named).json["items"] == []
    # An @ field in order_by is carried in the cursor; a cursor naming nothing leaves the list whole.
    sized = text_query(wordy, spec["where"], limit=2, offset=1, order_by=[{"field": "@size"}, {"field": "@score"}]).json
    body = decoded_cursor(sized["prev_cursor"])
    assert body["@size"] == sized["items"][0]["size"] and body["@score"] == sized["items"][0]["score"]
    gone = base64.b64encode(json.dumps({"_hash": "ab" * 32}).encode()).decode()
    assert text_query(wordy, spec["where"], after=gone).json["items"] == everything
    # The plugin's answer is the same, cursors included.
    paged = {"path": "/w", "where": spec["where"], "limit": 2, "after": cursor_of(pages[0][-1])}
    assert call_host(wordy, "t", "aeordb_query", paged, table="cursor") == \
        wordy.post("/t/_query", json.dumps(paged), headers=AUTH).json


def cursor_of(item: dict) -> str:
    return base64.b64encode(json.dumps({"_hash": sha256_hex(f"file:{item['path']}".encode())}).encode()).decode()


@pytest.mark.parametrize("cursor, message", [
    ("not base64!", "Invalid cursor: "),
    ("é", "Invalid cursor: "),
    (base64.b64encode(b"{not json").decode(), "Invalid cursor JSON: "),
    (base64.b64encode(b'{"_version": "00"}').decode(), "Cursor missing _hash"),
    (base64.b64encode(b'["_hash"]').decode(), "Cursor missing _hash"),
    (base64.b64encode(b'{"_hash": "xyz"}').decode(), "Invalid cursor hash: "),
    (base64.b64encode(b'{"_hash": "abcd"}').decode(), "Invalid cursor hash: "),
    (17, "Invalid cursor: "),
])
def test_bad_cursors_are_400(wordy, cursor, message):
    for key in ("after", "before"):
        assert error_of(text_query(wordy, {}, status=400, **{key: cursor})).startswith(message)


def test_cursor_paging_is_stable_under_concurrent_inserts(tmp_path):
    client, _ = make_app(tmp_path)
    files = client.app.config["aeordb.files"]
    for number in range(0, 60, 2):
        put_file(client, "p", f"/c/k{number:03d}.json", json.dumps({"k": number}).encode(), "application/json")
    original = [f"/c/k{number:03d}.json" for number in range(0, 60, 2)]
    inserted = []

    def insert_ahead(cursor_path: str) -> None:
        """Documents sorting before the cursor's item (odd numbers below it), written by another thread."""
        below = int(cursor_path[4:7])
        for number in range(1, below, 2):
            path = f"/c/k{number:03d}.json"
            if path not in inserted:
                files.write("p", path, json.dumps({"k": number}).encode(), "application/json")
                inserted.append(path)
    seen, cursor, offset_pages = [], None, []
    while True:
        spec = {"path": "/c", "limit": 4, "order_by": [{"field": "k"}], **({"after": cursor} if cursor else {})}
        answer = client.post("/p/_query", json.dumps(spec), headers=AUTH).json
        seen += [item["path"] for item in answer["items"]]
        if not answer["has_more"]:
            break
        cursor = answer["next_cursor"]
        writer = threading.Thread(target=insert_ahead, args=(answer["items"][-1]["path"],))
        writer.start()
        writer.join()
    assert inserted and seen == original          # no item twice, none skipped
    # Paging by offset over the same writes would have shown items twice.
    shifted = client.post("/p/_query", json.dumps({"path": "/c", "limit": 4, "offset": 4, "order_by": ["k"]}),
                          headers=AUTH).json["items"]
    assert [item["path"] for item in shifted] != original[4:8]


def test_default_limit_hit_is_reported(tmp_path):
    client, _ = make_app(tmp_path, query_limit=2)
    for number in range(3):
        put_file(client, "q", f"/d/{number}.json", b'{"a": 1}', "application/json")
    answer = post_query(client, {"path": "/d"}).json
    assert answer["default_limit_hit"] is True and answer["default_limit"] == 2 and len(answer["items"]) == 2
    assert "default_limit_hit" not in post_query(client, {"path": "/d", "limit": 2}).json
    assert "default_limit_hit" not in post_query(client, {"path": "/d", "limit": 3}).json


def test_the_largest_text_queries_run(wordy):
    """100 text conditions of long queries stay within SQLite's bounds on columns and parameters."""
    for op in ("similar", "phonetic", "fuzzy", "match"):
        words = " ".join(WORDY_NAMES[len(FACT_WORDS):][:20])   # past MAX_PHONETIC_PATTERNS
        where = {"or": [cond("name", op, f"{words} {n}") for n in range(99)] + [cond("name", op, "Smith")]}
        items = text_query(wordy, where).json["items"]
        assert "/w/d000.json" in {item["path"] for item in items}, op


def test_a_huge_fuzzy_query_stops_at_its_time_limit(tmp_path):
    client, _ = make_app(tmp_path, query_timeout=0.3)
    spec = slow_query_spec(client, "q", documents=200)
    text = json.loads(client.get("/q/_files/docs/1.json", headers=AUTH).body)["text"]
    spec["where"] = {"or": [{"field": "text", "op": "fuzzy", "value": text[n:] + text[:n], "fuzziness": 40}
                            for n in range(1, 100)]}
    started = time.monotonic()
    answer = client.post("/q/_query", json.dumps(spec), headers=AUTH, status=400)
    assert "time limit of 0.3 s" in error_of(answer) and time.monotonic() - started < 3.0
    assert client.post("/q/_query", json.dumps({"path": "/docs", "limit": 1}), headers=AUTH).json["has_more"]


@pytest.mark.parametrize("leaf", [{"op": "fuzzy", "value": "b" * 8000, "fuzziness": 10 ** 9},
                                  {"op": "fuzzy", "value": "a" * 19999 + "b", "algorithm": "jaro_winkler"}])
def test_one_long_comparison_stops_at_the_query_time_limit(tmp_path, leaf):
    client, _ = make_app(tmp_path, query_timeout=0.3)
    put_file(client, "q", "/d/long.json", json.dumps({"name": "a" * 20000}).encode(), "application/json")
    spec = {"path": "/d", "where": {"field": "name", **leaf}}
    assert "time limit of 0.3 s" in error_of(client.post("/q/_query", json.dumps(spec), headers=AUTH, status=400))


@pytest.mark.parametrize("leaf, matches", [
    ({"op": "similar", "value": "Smith", "threshold": -1e999}, ["/d/smith.json", "/d/smyth.json"]),
    ({"op": "similar", "value": {"text": "Smith", "threshold": -1e400}}, ["/d/smith.json", "/d/smyth.json"]),
    ({"op": "similar", "value": "Smith", "threshold": 10 ** 400}, []),
    ({"op": "fuzzy", "value": "Smith", "algorithm": "jaro_winkler", "fuzziness": 10 ** 400},
     ["/d/smith.json", "/d/smyth.json"]),   # a score of 0 never matches
    ({"op": "fuzzy", "value": "Smith", "fuzziness": 10 ** 400}, ["/d/other.json", "/d/smith.json", "/d/smyth.json"]),
])
def test_text_operator_settings_past_any_range_act_as_their_bound(client, leaf, matches):
    for name, value in (("smith", "Smith"), ("smyth", "Smyth"), ("other", "Qqqq")):
        put_file(client, "q", f"/d/{name}.json", json.dumps({"name": value}).encode(), "application/json")
    spec = {"path": "/d", "where": {"field": "name", **leaf}, "order_by": [{"field": "@path"}]}
    body = json.dumps(spec).replace("-Infinity", "-1e999")
    assert [item["path"] for item in client.post("/q/_query", body, headers=AUTH).json["items"]] == matches


# HTTP API #####################################################################

def test_health_and_echo_round_trip(client):
    assert client.get("/_health").json == {"status": "ok", "engine": "pooling"}
    deploy(client, "mydb/public/users", wat(ECHO_WAT))
    answer = invoke(client, "mydb/public/users/compute", b"hi")
    envelope = json.loads(answer.body)
    assert envelope["arguments"] == [104, 105]
    assert answer.content_type == "application/octet-stream"


def test_health_needs_no_auth(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.get("/_health", headers=headers, status=200)
        assert response.json == {"status": "ok", "engine": client.app.config["aeordb.runtime"].wasm.mode}


def test_unknown_route_is_a_json_404(client):
    response = client.get("/db/s/t/f/_nothing", headers=AUTH, status=404)
    assert "error" in response.json


def test_wrong_methods_are_405_with_allow(client):
    cases = [("GET", "/db/s/t/_deploy", {"PUT"}), ("POST", "/db/s/t/_deploy", {"PUT"}),
             ("GET", "/db/s/t/f/_invoke", {"POST"}), ("PUT", "/db/s/t/f/_invoke", {"POST"}),
             ("POST", "/db/_plugins", {"GET"}), ("DELETE", "/db/_plugins", {"GET"}),
             ("GET", "/db/s/t/f/_remove", {"DELETE"}), ("POST", "/db/_files/x", {"GET", "PUT", "DELETE"}),
             ("PATCH", "/db/_files/x", {"GET", "PUT", "DELETE"}), ("GET", "/db/_query", {"POST"}),
             ("DELETE", "/_health", {"GET"}), ("POST", "/_health", {"GET"})]
    for method, path, allowed in cases:
        answer = client.request(path, method=method, headers=AUTH, body=b"", expect_errors=True)
        assert answer.status_int == 405, (method, path, answer.status)
        allow = {item.strip() for item in answer.headers["Allow"].split(",")}
        assert allowed <= allow and method not in allow, (method, path, allow)
        assert method in error_of(answer)


def test_invoke_over_the_request_limit_is_413(tmp_path):
    client, _ = make_app(tmp_path, max_request_size=10)
    deploy(client, "db/s/t", wat(ECHO_WAT))
    invoke(client, "db/s/t/f", b"0123456789")
    assert "limit" in error_of(invoke(client, "db/s/t/f", b"0123456789a", status=413))


BAD_AUTHORIZATIONS = [
    None,                                                        # missing
    f"Bearer wrong-{TOKEN[::-1]}",                               # wrong token
    "Bearer",                                                    # scheme alone
    "Bearer ",                                                   # scheme and a space
    "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode(),   # other scheme
    f"Token {TOKEN}",                                            # other scheme, right token
    f"Bearer {TOKEN} ",                                          # trailing space
    f"Bearer {TOKEN}x",                                          # a longer token
    f"Bearer {TOKEN[:-1]}",                                      # a prefix of it
    f"Bearer  {TOKEN}",                                          # two spaces
]


AUTH_ROUTES = [
    ("PUT", "/db/s/t/_deploy", "module"),
    ("POST", "/db/s/t/f/_invoke", b"hi"),
    ("GET", "/db/_plugins", b""),
    ("DELETE", "/db/s/t/f/_remove", b""),
    ("GET", "/db/_files/a.txt", b""),
    ("HEAD", "/db/_files/a.txt", b""),
    ("GET", "/db/_files/", b""),
    ("PUT", "/db/_files/a.txt", b"overwritten"),
    ("DELETE", "/db/_files/a.txt", b""),
    ("POST", "/db/_query", b'{"path": "/"}'),
]


@pytest.mark.parametrize("method, path, body", AUTH_ROUTES, ids=[f"{m} {p}" for m, p, _ in AUTH_ROUTES])
def test_auth_is_required_on_every_route(client, method, path, body):
    # Everything the route could touch exists, so only the token stands in the way.
    deploy(client, "db/s/t", answer_module(b"original"))
    client.put("/db/_files/a.txt", b"original", headers=AUTH)
    payload = bytes(wat(ECHO_WAT)) if body == "module" else body
    for authorization in BAD_AUTHORIZATIONS:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = client.request(path, method=method, body=payload, headers=headers, expect_errors=True)
        assert response.status_int == 401, (authorization, response.status)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        if method != "HEAD":
            assert "error" in response.json
            assert TOKEN not in response.text and TOKEN[::-1] not in response.text
    # Nothing changed behind the refusals.
    assert invoke(client, "db/s/t/f").body == b"original"
    assert client.get("/db/_files/a.txt", headers=AUTH).body == b"original"
    # And the right token passes on the same route.
    ok = client.request(path, method=method, body=payload, headers=AUTH, expect_errors=True)
    assert ok.status_int < 400, ok.status


def test_bad_authorization_is_401_without_echoing_the_token(deployed):
    client, _ = deployed
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    values = [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN} ", f"Bearer {TOKEN}  ", f" Bearer {TOKEN}",
              f"Bearer  {TOKEN}", f"Bearer\t{TOKEN}", f"Basic {basic}", "Basic x", f"Token {TOKEN}", TOKEN,
              f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer " + "a" * 5000, f"Bearer {TOKEN}\u00e9"]
    requests = [("GET", "/db/_plugins"), ("PUT", "/db/s/u/_deploy"), ("POST", "/db/s/t/f/_invoke"),
                ("DELETE", "/db/s/t/f/_remove"), ("GET", "/db/_files/x"), ("PUT", "/db/_files/x"),
                ("DELETE", "/db/_files/x"), ("POST", "/db/_query")]
    for value in values:
        headers = {} if value is None else {"Authorization": value}
        for method, path in requests:
            answer = client.request(path, method=method, headers=headers, body=b"{}", expect_errors=True)
            assert answer.status_int == 401, (value, method, path, answer.status)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert error_of(answer) and TOKEN.encode() not in answer.body
    # Nothing happened: the plugin is still there, no file was written, nothing deployed.
    assert [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json] == ["db/s/t"]
    assert client.get("/db/_files/", headers=AUTH).json["entries"] == []
    assert client.get("/_health").status_int == 200      # a public route


def test_access_log_shows_the_plugins_status(tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb")
    client, _ = make_app(tmp_path, access_log=True)
    deploy(client, "db/s/gone", answer_module(b'{"status_code":404,"body":[110,111]}'))
    invoke(client, "db/s/gone/f", status=404)
    assert any("POST /db/s/gone/f/_invoke 404 " in record.getMessage() for record in caplog.records)


def test_help_documents_the_options():
    for word in ("--data-dir", "--token", "--port", "--host", "--threads", "--timeout",
                 "--memory-limit", "AEORDB_PORT", "AEORDB_TOKEN", "AEORDB_DATA_DIR"):
        assert word in help_text(), word


def test_help_shows_no_none_default_and_the_query_limit():
    assert "AEORDB_TOKEN" in help_text()
    assert "default: None" not in help_text()
    assert "invoke or query body" in " ".join(help_text().split())


# Today's AeorDB routes ########################################################
# PUT/DELETE /plugins/{name}, POST /plugins/{name}/invoke and GET /plugins, as
# today's AeorDB serves them (AEORDB_TODAY.md section 1): the plugin at
# <default db>/plugins/{name}, with every guarantee of the seed routes.

TODAY_META_KEYS = ["plugin_id", "name", "path", "plugin_type", "created_at", "version", "author", "checksum",
                   "updated_at"]


def today_deploy(client, plugin: str, module: bytes, status=200, headers=None, **params):
    """PUT /plugins/{plugin}; ``params`` (name, plugin_type, version, author) go in the query string."""
    from urllib.parse import urlencode
    query = urlencode(params)
    return client.put(f"/plugins/{plugin}" + (f"?{query}" if query else ""), module,
                      headers=AUTH if headers is None else headers, status=status)


def today_invoke(client, name: str, body: bytes = b"", status=200, headers=None):
    return client.post(f"/plugins/{name}/invoke", body, headers=AUTH if headers is None else headers,
                       status=status)


def rfc3339_utc(text: str):
    import datetime
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", text), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def today_schema(client, name: str) -> jsonschema.Draft202012Validator:
    document = openapi_of(client)
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": document["components"]})


def test_today_deploy_answers_todays_metadata(client):
    import datetime
    import uuid
    module = wat(ECHO_WAT)
    meta = today_deploy(client, "with-meta", module, name="With Meta", version="1.2.3",
                        author="Plugin Author").json
    assert list(meta) == TODAY_META_KEYS   # upstream's key order
    assert uuid.UUID(meta["plugin_id"]).version == 4 and str(uuid.UUID(meta["plugin_id"])) == meta["plugin_id"]
    assert (meta["name"], meta["path"], meta["plugin_type"]) == ("With Meta", "with-meta", "wasm")
    assert (meta["version"], meta["author"]) == ("1.2.3", "Plugin Author")
    assert meta["checksum"] == "sha256:" + sha256_hex(module)
    assert meta["created_at"] == meta["updated_at"]
    assert abs(rfc3339_utc(meta["created_at"]) - datetime.datetime.now(datetime.timezone.utc)) \
        < datetime.timedelta(seconds=60)
    today_schema(client, "TodayPluginMeta").validate(meta)
    # Without version and author, both are null; the display name defaults to {name}.
    plain = today_deploy(client, "plain", module).json
    assert (plain["name"], plain["version"], plain["author"]) == ("plain", None, None)


def test_today_redeploy_keeps_id_and_creation(client):
    first = today_deploy(client, "calc", answer_module(b"one"), version="1", author="Ada").json
    assert today_invoke(client, "calc").body == b"one"
    second = today_deploy(client, "calc", answer_module(b"two"), name="Calculator").json
    assert (second["plugin_id"], second["created_at"]) == (first["plugin_id"], first["created_at"])
    assert rfc3339_utc(second["updated_at"]) > rfc3339_utc(first["updated_at"])
    assert second["checksum"] == "sha256:" + sha256_hex(answer_module(b"two")) != first["checksum"]
    # Replaced: the name, and version and author (omitted now, so null).
    assert (second["name"], second["version"], second["author"]) == ("Calculator", None, None)
    assert today_invoke(client, "calc").body == b"two"
    assert client.get("/plugins", headers=AUTH).json == {"items": [second]}


def test_today_list_is_items_sorted_by_path(client):
    assert client.get("/plugins", headers=AUTH).json == {"items": []}
    for name in ("zeta", "alpha", "m.id-1"):
        today_deploy(client, name, wat(ECHO_WAT))
    deploy(client, "default/s/t", wat(ECHO_WAT), name="seed-era")   # also in the default database
    deploy(client, "other/s/t", wat(ECHO_WAT))                      # another database: not listed
    listed = client.get("/plugins", headers=AUTH).json
    assert list(listed) == ["items"]
    assert [item["path"] for item in listed["items"]] == ["alpha", "default/s/t", "m.id-1", "zeta"]
    assert all(list(item) == TODAY_META_KEYS for item in listed["items"])
    check_answer(openapi_of(client), client.get("/plugins", headers=AUTH), "/plugins", "GET")


def test_today_invoke_envelope_carries_todays_metadata(client):
    today_deploy(client, "echo", wat(ECHO_WAT))
    answer = client.post("/plugins/echo/invoke?a=1", b"hi", headers={**AUTH, "Content-Type": "text/plain",
                                                                      "X-Request-Id": "req-1"}, status=200)
    envelope = json.loads(answer.body)
    assert envelope["arguments"] == [104, 105]
    assert envelope["metadata"] == {"name": "echo", "function_name": "echo", "path": "/plugins/echo",
                                    "plugin_path": "echo", "method": "POST", "query_string": "a=1",
                                    "content_type": "text/plain", "request_id": "req-1"}
    assert json.loads(today_invoke(client, "echo").body)["arguments"] == []


def test_seed_invoke_envelope_carries_both_eras_keys(client):
    """The same plugin through the seed route: name is the function, as function_name."""
    today_deploy(client, "echo", wat(ECHO_WAT))
    metadata = json.loads(invoke(client, "default/plugins/echo/run", b"x").body)["metadata"]
    assert {key: metadata[key] for key in ("name", "function_name", "path", "plugin_path")} == {
        "name": "run", "function_name": "run", "path": "/default/plugins/echo/run",
        "plugin_path": "default/plugins/echo"}
    assert envelope_of(client, b"", "db/s/t", "compute")["metadata"]["name"] == "compute"


def test_today_invoke_answers_as_the_plugin_says(client):
    today_deploy(client, "made", answer_module(b'{"status_code":201,"body":[111,107],"content_type":"text/plain",'
                                               b'"headers":{"x-made":"yes","set-cookie":"no"}}'))
    answer = today_invoke(client, "made", status=201)
    assert (answer.body, answer.content_type, answer.headers["x-made"]) == (b"ok", "text/plain", "yes")
    assert "set-cookie" not in answer.headers
    today_deploy(client, "trap", wat(TRAP_WAT))
    assert "unreachable" in error_of(today_invoke(client, "trap", b"x", status=500))


def test_today_delete(client):
    today_deploy(client, "gone", wat(ECHO_WAT))
    assert client.delete("/plugins/gone", headers=AUTH, status=200).json == {"removed": True, "path": "gone"}
    assert client.get("/plugins", headers=AUTH).json == {"items": []}
    assert client.get("/default/_plugins", headers=AUTH).json == []
    assert error_of(today_invoke(client, "gone", status=404)) == "Plugin not found: gone"
    assert error_of(client.delete("/plugins/gone", headers=AUTH, status=404)) == "Plugin not found: gone"


def test_today_routes_answer_todays_errors(client):
    assert error_of(today_invoke(client, "nope", status=404)) == "Plugin not found: nope"
    assert error_of(today_deploy(client, "p", b"", status=400)) == "Plugin body must not be empty"
    assert error_of(today_deploy(client, "p", wat(ECHO_WAT), status=400, plugin_type="WASM")) == \
        "Invalid plugin type: unknown plugin type: WASM"
    for plugin_type in ("native", "rule"):   # upstream's types, which do not run here
        assert error_of(today_deploy(client, "p", b"\x7fELF", status=400, plugin_type=plugin_type)) \
            .startswith("Invalid plugin type: ")
    assert error_of(today_deploy(client, "p", b"not a module", status=400)).startswith(
        "Invalid plugin: not a valid WebAssembly module")
    assert "imports" in error_of(today_deploy(client, "p", host_call_module("aeordb_nothing", b"{}"), status=400))
    assert "exceeds the limit" in error_of(client.put("/plugins/p", b"\0" * (16 * 1024 * 1024 + 1),
                                                      headers=AUTH, status=413))
    assert "version" in error_of(today_deploy(client, "p", wat(ECHO_WAT), status=400, version="v" * 129))
    assert client.get("/plugins", headers=AUTH).json == {"items": []}   # nothing was deployed
    assert error_of(client.get("/plugins/p", headers=AUTH, status=405))   # not a route upstream either


@pytest.mark.parametrize("name", [".hidden", "_reserved", ".", "..", "a" * 129, "a%20b", "%C3%A9t%C3%A9",
                                  "a%00b"])
def test_today_routes_refuse_bad_names(client, name):
    for method, path, body in (("PUT", f"/plugins/{name}", bytes(wat(ECHO_WAT))),
                               ("POST", f"/plugins/{name}/invoke", b""), ("DELETE", f"/plugins/{name}", b"")):
        answer = client.request(path, method=method, body=body, headers=AUTH, expect_errors=True)
        assert answer.status_int == 400 and "invalid plugin name" in error_of(answer), (method, answer.status)
    assert client.get("/plugins", headers=AUTH).json == {"items": []}
    assert client.get("/default/_plugins", headers=AUTH).json == []


def test_today_routes_need_credentials_and_scopes(client):
    today_deploy(client, "p", answer_module(b"original"))
    routes = [("PUT", "/plugins/p", bytes(wat(ECHO_WAT))), ("POST", "/plugins/p/invoke", b""), ("GET", "/plugins", b""),
              ("DELETE", "/plugins/p", b"")]
    for method, path, body in routes:
        answer = client.request(path, method=method, body=body, expect_errors=True)
        assert answer.status_int == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer"), path
    assert today_invoke(client, "p").body == b"original"   # nothing changed behind the refusals

    def key(scopes, databases):
        made = client.post_json("/_keys", {"name": "k", "scopes": scopes, "databases": databases},
                                headers=AUTH, status=201)
        return {"Authorization": f"Bearer {made.json['key']}"}

    invoker = key(["invoke"], ["default"])
    assert today_invoke(client, "p", headers=invoker).body == b"original"
    for method, path, body in routes[:1] + routes[2:]:
        answer = client.request(path, method=method, body=body, headers=invoker, expect_errors=True)
        assert answer.status_int == 403 and "lacks the scope 'deploy'" in error_of(answer), path
    elsewhere = key(["invoke", "deploy"], ["other"])   # the right scopes, not the default database
    for method, path, body in routes:
        answer = client.request(path, method=method, body=body, headers=elsewhere, expect_errors=True)
        assert answer.status_int == 403 and "database 'default'" in error_of(answer), path
    assert today_invoke(client, "p").body == b"original"
    deployer = key(["deploy"], ["default", "other"])
    assert today_deploy(client, "q", wat(ECHO_WAT), headers=deployer).json["path"] == "q"
    assert [item["path"] for item in client.get("/plugins", headers=deployer).json["items"]] == ["p", "q"]
    assert client.delete("/plugins/q", headers=deployer, status=200).json["removed"] is True
    everywhere = key(["invoke"], ["*"])
    assert today_invoke(client, "p", headers=everywhere).body == b"original"


def test_today_plugins_live_in_the_default_database(client):
    """Seen in the seed listing of the default database, and reaching its files both ways."""
    meta = today_deploy(client, "notes", host_call_module("aeordb_write_file", json.dumps(
        {"path": "/notes/1.json", "data": base64.b64encode(b'{"n": 1}').decode()}).encode()),
        version="3", author="Ada").json
    seed = client.get("/default/_plugins", headers=AUTH).json
    assert len(seed) == 1 and seed[0]["path"] == "default/plugins/notes"
    assert {key: seed[0][key] for key in ("plugin_id", "name", "created_at", "updated_at", "checksum", "version",
                                          "author")} == {key: meta[key] for key in ("plugin_id", "name",
                                          "created_at", "updated_at", "checksum", "version", "author")}
    assert seed[0]["sha256"] == meta["checksum"].removeprefix("sha256:") and seed[0]["deployed_at"]
    assert json.loads(today_invoke(client, "notes").body) == {"ok": True, "size": 8}
    assert client.get("/default/_files/notes/1.json", headers=AUTH).json == {"n": 1}
    found = client.post_json("/default/_query", {"path": "/notes", "where": {"field": "n", "op": "eq", "value": 1}},
                             headers=AUTH).json
    assert [item["path"] for item in found["items"]] == ["/notes/1.json"]
    put_file(client, "default", "/in.txt", b"from http", "text/plain")
    today_deploy(client, "reader", host_call_module("aeordb_read_file", b'{"path": "/in.txt"}'))
    assert base64.b64decode(json.loads(today_invoke(client, "reader").body)["data"]) == b"from http"
    # The seed routes reach it as default/plugins/<name>, and a seed deploy there is the same plugin.
    assert client.get("/default/plugins/notes/_stats", headers=AUTH).json["invocations"] == 1
    again = deploy(client, "default/plugins/notes", answer_module(b"seed"), name="Notes").json
    assert again["plugin_id"] == meta["plugin_id"] and today_invoke(client, "notes").body == b"seed"
    assert client.delete("/default/plugins/notes/f/_remove", headers=AUTH).json["removed"] is True
    today_invoke(client, "notes", status=404)


def test_today_default_db_setting(tmp_path, capsys):
    assert aeordb.Settings().default_db == "default"
    assert aeordb.parse_settings([], {"AEORDB_DEFAULT_DB": "main"}).default_db == "main"
    assert aeordb.parse_settings(["--default-db", "cli"], {"AEORDB_DEFAULT_DB": "main"}).default_db == "cli"
    assert "AEORDB_DEFAULT_DB" in help_text()
    client, _ = make_app(tmp_path, default_db="main")
    today_deploy(client, "w", host_call_module("aeordb_write_file", b'{"path": "/x", "data": "aGk="}'))
    assert [p["path"] for p in client.get("/main/_plugins", headers=AUTH).json] == ["main/plugins/w"]
    assert client.get("/default/_plugins", headers=AUTH).json == []
    today_invoke(client, "w")
    assert client.get("/main/_files/x", headers=AUTH).body == b"hi"
    client.get("/default/_files/x", headers=AUTH, status=404)
    for bad in ("_system", "a/b", "..", ""):
        with pytest.raises(aeordb.StartupError, match="--default-db"):
            make_app(tmp_path / "bad", default_db=bad)


def test_seed_deploy_takes_version_and_author_and_keeps_its_id(client):
    first = deploy(client, "db/s/t", wat(ECHO_WAT), version="2.0", author="Ada%20L").json
    assert (first["version"], first["author"]) == ("2.0", "Ada L")
    assert first["checksum"] == "sha256:" + first["sha256"] and first["created_at"] == first["updated_at"]
    assert {"plugin_id", "name", "path", "plugin_type", "deployed_at", "sha256", "size"} <= set(first)
    jsonschema.Draft202012Validator({"$ref": "#/components/schemas/PluginMeta",
                                     "components": openapi_of(client)["components"]}).validate(first)
    second = deploy(client, "db/s/t", answer_module(b"v3")).json
    assert (second["plugin_id"], second["created_at"]) == (first["plugin_id"], first["created_at"])
    assert "version" not in second and "author" not in second   # the seed answer omits what was not given
    assert second["deployed_at"] == second["updated_at"] != first["updated_at"]
    assert "author" in error_of(deploy(client, "db/s/t", wat(ECHO_WAT), status=400, author="x" * 129))


def test_plugin_id_survives_restarts_and_other_processes(tmp_path):
    """Two apps on one data dir (as two processes): a redeploy in either keeps the id and creation."""
    one, _ = make_app(tmp_path)
    two, _ = make_app(tmp_path)
    first = today_deploy(one, "shared", answer_module(b"one")).json
    second = today_deploy(two, "shared", answer_module(b"two")).json
    assert (second["plugin_id"], second["created_at"]) == (first["plugin_id"], first["created_at"])
    assert today_invoke(one, "shared").body == b"two"
    assert one.get("/plugins", headers=AUTH).json == {"items": [second]}
    restarted, _ = make_app(tmp_path)
    assert restarted.get("/plugins", headers=AUTH).json == {"items": [second]}


def test_a_plugin_deployed_by_an_older_version_gains_todays_fields(tmp_path):
    client, _ = make_app(tmp_path)
    deploy(client, "default/plugins/old", answer_module(b"old"))
    meta_file = tmp_path / "plugins" / "default" / "plugins" / "old" / "plugin.json"
    meta = json.loads(meta_file.read_text())
    older = {key: meta[key] for key in ("name", "path", "plugin_type", "deployed_at", "sha256", "size")}
    meta_file.write_text(json.dumps({**older, "plugin_id": "0123456789abcdef0123456789abcdef"}))
    again, _ = make_app(tmp_path)
    [item] = again.get("/plugins", headers=AUTH).json["items"]
    assert item == {"plugin_id": "0123456789abcdef0123456789abcdef", "name": "old", "path": "old",
                    "plugin_type": "wasm", "created_at": older["deployed_at"], "version": None, "author": None,
                    "checksum": "sha256:" + older["sha256"], "updated_at": older["deployed_at"]}
    redeployed = today_deploy(again, "old", answer_module(b"new")).json
    assert (redeployed["plugin_id"], redeployed["created_at"]) == (item["plugin_id"], older["deployed_at"])


def test_today_routes_match_the_openapi_document(client):
    document = openapi_of(client)
    check_answer(document, today_deploy(client, "p", wat(ECHO_WAT), version="1"), "/plugins/{name}", "PUT")
    check_answer(document, today_deploy(client, "q", b"", status=400), "/plugins/{name}", "PUT")
    check_answer(document, today_deploy(client, "_q", wat(ECHO_WAT), status=400), "/plugins/{name}", "PUT")
    check_answer(document, client.get("/plugins", headers=AUTH), "/plugins", "GET")
    check_answer(document, client.get("/plugins", status=401), "/plugins", "GET")
    check_answer(document, today_invoke(client, "nothing", status=404), "/plugins/{name}/invoke", "POST")
    check_answer(document, client.delete("/plugins/p", headers=AUTH), "/plugins/{name}", "DELETE")
    check_answer(document, client.delete("/plugins/p", headers=AUTH, status=404), "/plugins/{name}", "DELETE")


def test_today_routes_on_a_real_server(real_server):
    """As README's curl examples: deploy, invoke, list, remove over real HTTP; no token, no entry."""
    _, port = real_server
    module = (HERE / "examples" / "hello.wasm").read_bytes()
    status, _, body = http_request(port, "PUT", "/plugins/hello?version=1.0.0&author=Ada", module)
    assert status == 200 and json.loads(body)["path"] == "hello"
    status, headers, body = http_request(port, "POST", "/plugins/hello/invoke", b'{"input": "hello"}')
    assert (status, json.loads(body), headers["x-plugin"]) == (200, {"hello": "world"}, "hello")
    status, _, body = http_request(port, "GET", "/plugins")
    assert status == 200 and [item["version"] for item in json.loads(body)["items"]] == ["1.0.0"]
    status, _, _ = http_request(port, "DELETE", "/plugins/hello", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, body = http_request(port, "DELETE", "/plugins/hello")
    assert (status, json.loads(body)) == (200, {"removed": True, "path": "hello"})


# Hardening ####################################################################
# Hostile plugins cost only their own request, bad requests get clear 4xx
# answers, and faults and concurrency lose nothing.
#
# Most hostile modules below misbehave only when their request envelope is
# longer than 1000 bytes (an invoke body of HOSTILE_BODY), so the same plugin
# proves that its next, ordinary request succeeds.

# -- hostile modules -----------------------------------------------------------

def test_answer_ending_exactly_at_memory_end_is_fine(client):
    tail = b"0123456789"
    module = wat(f"""
(module
  (memory (export "memory") 1)
  (data (i32.const {65536 - len(tail)}) "{wat_string(tail)}")
  (func (export "handle") (param i32 i32) (result i64) (i64.const {packed(65536 - len(tail), len(tail))})))
""")
    deploy(client, "db/s/edge", module)
    assert invoke(client, "db/s/edge/f").body == tail


def test_answer_at_the_response_limit_is_fine(tmp_path):
    client, _ = make_app(tmp_path, max_response_size=1000)
    deploy(client, "db/s/big", misbehaving_module(f"(return (i64.const {packed(0, 1000)}))"))
    assert len(invoke(client, "db/s/big/f", HOSTILE_BODY).body) == 1000


def test_unprovided_imports_are_refused_at_deploy_naming_them(client):
    handle = '(memory (export "memory") 1) (func (export "handle") (param i32 i32) (result i64) (i64.const 0))'
    for imports, named in [
            ('(import "env" "mystery" (func))', "env.mystery"),
            ('(import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32 i32) (result i32)))',
             "wasi_snapshot_preview1.sock_open"),
            ('(import "aeordb" "aeordb_read_file" (func (param i32) (result i32)))', "aeordb.aeordb_read_file"),
            ('(import "aeordb" "aeordb_launch_missiles" (func (param i32 i32) (result i64)))',
             "aeordb.aeordb_launch_missiles"),
            ('(import "env" "table" (table 1 funcref))', "env.table"),
            ('(import "env" "counter" (global i32))', "env.counter")]:
        message = error_of(deploy(client, "db/s/imports", wat(f"(module {imports} {handle})"), status=400))
        assert named in message, message
    assert client.get("/db/_plugins", headers=AUTH).json == []


OVERSIZED_DECLARATIONS = {
    "exported_memory": '(memory (export "memory") 40000)',
    "hidden_second_memory": '(memory (export "memory") 1) (memory $hidden 40000)',
    "imported_memory": '(import "env" "memory" (memory 40000))',
    "exported_table": '(memory (export "memory") 1) (table (export "table") 200000 funcref)',
    "hidden_table": '(memory (export "memory") 1) (table 200000 funcref)',
    "hidden_externref_table": '(memory (export "memory") 1) (table 1 funcref) (table 300000 externref)',
}


@pytest.mark.parametrize("engine", ["pooling", "bounded-pooling", "on-demand"])
@pytest.mark.parametrize("case", sorted(OVERSIZED_DECLARATIONS))
def test_huge_initial_memory_or_table_is_refused_at_deploy(tmp_path, case, engine):
    client, _ = make_app(tmp_path, options={"engine": engine})
    module = wat(f'(module {OVERSIZED_DECLARATIONS[case]}'
                 ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    message = error_of(deploy(client, "db/s/huge", module, status=400))
    assert ("memory" if "memory" in case else "table") in message and "limit" in message, message
    assert client.get("/db/_plugins", headers=AUTH).json == []


# An alloc that works for small sizes and misbehaves (``bad``) for request-sized ones.
ALLOC_FOR_REQUEST = """
  (func (export "alloc") (param $size i32) (result i32)
    (if (i32.gt_u (local.get $size) (i32.const 1000)) (then {bad}))
    (i32.const 2048))
"""


# Imports aeordb_context; alloc misbehaves (``bad``) once handle armed it, i.e. for the host's answer.
CONTEXT_IMPORT = '(import "aeordb" "aeordb_context" (func $context (param i32 i32) (result i64)))'


ALLOC_FOR_HOST_ANSWER = """
  (global $armed (mut i32) (i32.const 0))
  (func $noop)
  (func (export "alloc") (param $size i32) (result i32)
    (if (global.get $armed) (then {bad}))
    (i32.const 4096))
"""


ARM_AND_CALL = ("(global.set $armed (i32.const 1))"
                "(drop (call $context (i32.const 1024) (i32.const 2)))"
                "(loop $spin (call $noop) (br $spin))")


HOSTILE_CASES = {
    "endless_loop": dict(hostile="(loop $forever (br $forever))", settings={"timeout": 0.5},
                         expect="time limit"),
    "deep_recursion": dict(
        hostile="(drop (call $deep (i32.const 0)))",
        extra="(func $deep (param i32) (result i32)"
              " (i32.add (call $deep (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))",
        expect="stack overflow"),
    # Grows 7 pages at a time (as an allocator asks for what it needs), so the
    # refused grow leaves memory just under the cap, then aborts as Rust does.
    "memory_growth_then_abort": dict(
        hostile="(block $full (loop $more"
                " (br_if $full (i32.eq (memory.grow (i32.const 7)) (i32.const -1))) (br $more)))"
                " unreachable",
        expect="memory limit"),
    # A Vec doubling at 40 MiB asks for far more than what is left under the 64 MiB cap.
    "memory_big_request_refused_then_abort": dict(
        hostile="(block $enough (loop $more (br_if $enough (i32.ge_u (memory.size) (i32.const 640)))"
                " (drop (memory.grow (i32.const 1))) (br $more)))"
                f" (if (i32.ne (memory.grow (i32.const 400)) (i32.const -1)) (then (return (i64.const {OK_AT_1024}))))"
                " unreachable",
        expect="memory limit"),
    "unreachable": dict(hostile="unreachable", expect="unreachable", not_expect="memory"),
    "division_by_zero": dict(
        hostile="(drop (i32.div_u (i32.const 1) (i32.sub (local.get $len) (local.get $len))))",
        expect="division by zero"),
    "answer_pointer_negative": dict(hostile=f"(return (i64.const {packed(0xFFFFFFF0, 16)}))",
                                    expect="bad pointer"),
    "answer_pointer_just_past_end": dict(hostile=f"(return (i64.const {packed(65536 - 10, 11)}))",
                                         expect="bad pointer"),
    "answer_length_huge": dict(hostile=f"(return (i64.const {packed(0, 0xFFFFFFFF)}))",
                               expect="response limit"),
    "answer_over_max_response_size": dict(hostile=f"(return (i64.const {packed(0, 1001)}))",
                                          settings={"max_response_size": 1000}, expect="response limit"),
    "alloc_traps_for_request": dict(hostile="", extra=ALLOC_FOR_REQUEST.format(bad="unreachable"),
                                    expect="unreachable"),
    "alloc_bad_pointer_for_request": dict(
        hostile="", extra=ALLOC_FOR_REQUEST.format(bad="(return (i32.const -256))"),
        expect="bad pointer"),
    "alloc_traps_for_host_answer": dict(
        hostile=ARM_AND_CALL, head=CONTEXT_IMPORT,
        extra=ALLOC_FOR_HOST_ANSWER.format(bad="unreachable"), expect="unreachable"),
    "alloc_bad_pointer_for_host_answer": dict(
        hostile=ARM_AND_CALL, head=CONTEXT_IMPORT,
        extra=ALLOC_FOR_HOST_ANSWER.format(bad="(return (i32.const 2147483632))"),
        expect="bad pointer for the answer of aeordb_context"),
}


@pytest.mark.parametrize("options", [{"fast_calls": True}, {"fast_calls": True, "engine": "on-demand"},
                                     {"fast_calls": False}], ids=["fast_path", "fast_ondemand", "public_api"])
@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_module_costs_only_its_request(tmp_path, case, options):
    spec = HOSTILE_CASES[case]
    client, _ = make_app(tmp_path, options=options, **spec.get("settings", {}))
    deploy(client, "db/s/hostile", misbehaving_module(spec["hostile"], spec.get("head", ""), spec.get("extra", "")))
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    started = time.monotonic()
    failed = invoke(client, "db/s/hostile/f", HOSTILE_BODY, status=500)
    elapsed = time.monotonic() - started
    message = error_of(failed)
    assert message.startswith("plugin "), message
    assert spec["expect"] in message and spec.get("not_expect", "@") not in message, message
    # A host function's failure interrupts the guest at once (deadline 0), not at the 5 s limit.
    assert elapsed < (2.0 if "timeout" in spec.get("settings", {}) else 3.0), elapsed
    assert invoke(client, "db/s/hostile/f", b"").body == b"ok"
    assert json.loads(invoke(client, "db/s/echo/f", b"hi").body)["arguments"] == [104, 105]
    assert invoke(client, "db/s/hostile/f", HOSTILE_BODY, status=500).json["error"] == message


def test_log_message_with_wild_arguments_is_harmless(client):
    calls = "".join(f"(call $log (i32.const {a}) (i32.const {b}) (i32.const {c}) (i32.const {d}))"
                    for a, b, c, d in [(-1, 5, -1, 5), (0, 0x7FFFFFFF, 0, 0x7FFFFFFF), (65530, 100, 0, 10),
                                       (60000, 4, 60000, 3), (1024, 2, 0, -7)])
    module = wat(f"""
(module
  (import "aeordb" "log_message" (func $log (param i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 60000) "\\ff\\fe\\00")
  (data (i32.const 60010) "ok")
  (func (export "handle") (param i32 i32) (result i64)
    {calls}
    (i64.const {packed(60010, 2)})))
""")
    deploy(client, "db/s/logs", module)
    assert invoke(client, "db/s/logs/f", b"x").body == b"ok"


def test_host_functions_survive_wild_pointers(client):
    """Out-of-memory, negative (high bit set) and huge pointers and lengths: {"error": ...}, no trap."""
    memory_size = 2 * 65536
    cases = [(-1, 10), (-16, 16), (0, -1), (-2147483648, 4), (16, 0x7FFFFFFF), (0, 16 * 1024 * 1024 + 1),
             (memory_size - 5, 10), (memory_size, 1), (memory_size + 4096, 0)]
    for function in aeordb.HOST_FUNCTION_NAMES:
        for ptr, length in cases:
            module = wat(f"""
(module
  (import "aeordb" "{function}" (func $host (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (func (export "handle") (param i32 i32) (result i64)
    (call $host (i32.const {ptr}) (i32.const {length}))))
""")
            deploy(client, "db/s/wild", module)
            answer = invoke(client, "db/s/wild/f")
            assert "error" in json.loads(answer.body), (function, ptr, length, answer.body)
    assert client.get("/_health").json["status"] == "ok"


BAD_HOST_ARGUMENTS = [b"\xff\xfe{}", b'{"path": "/\xc3\x28"}', b"not json", b"[1, 2]", b"42", b"",
                      b"[" * 50_000, b'{"path": 5}']


BAD_HOST_PATHS = ["etc/passwd", "/../etc/passwd", "/a/../../b", "/a\u0000b", "/\ud800", "/" + "a" * 2000,
                  "/a//b", "/."]


def test_host_functions_answer_errors_for_bad_arguments(client):
    """Invalid UTF-8, non-JSON, non-objects and bad paths: the plugin gets {"error": ...}."""
    calls = [(function, args) for function in aeordb.HOST_FUNCTION_NAMES for args in BAD_HOST_ARGUMENTS
             if function != "aeordb_context" or args != b'{"path": 5}']
    for function in ("aeordb_read_file", "aeordb_write_file", "aeordb_delete_file", "aeordb_file_metadata",
                     "aeordb_extract_file", "aeordb_query", "aeordb_aggregate"):
        for path in BAD_HOST_PATHS:
            args = {"path": path, "data": "aGk=", "aggregate": {"count": True}}
            calls.append((function, json.dumps(args).encode()))
    calls += [("aeordb_write_file", b'{"path": "/x", "data": "!!not base64!!"}'),
              ("aeordb_write_file", b'{"path": "/x", "data": "aGk=", "content_type": "text/a\\r\\nSet-Cookie: x"}'),
              ("aeordb_write_file", b'{"path": "/x", "data": 12}'),
              ("aeordb_query", b'{"path": "/", "where": {"field": "a", "op": "nope", "value": 1}}'),
              ("aeordb_query", b'{"path": "/", "where": "1=1; DROP TABLE files"}'),
              ("aeordb_aggregate", b'{"path": "/", "aggregate": {"sum": 5}}'),
              ("aeordb_extract_file", b'{"path": "/x", "mode": "words"}')]
    for function, args in calls:   # b"[" * 50_000 among them: past the recursion limit
        deploy(client, "db/s/bad", host_call_module(function, args))
        answer = json.loads(invoke(client, "db/s/bad/f").body)
        assert isinstance(answer.get("error"), str), (function, args[:80], answer)
    # Nothing was written by any of them.
    assert client.get("/db/_files/", headers=AUTH).json["entries"] == []


def test_host_function_called_thousands_of_times(client):
    """5,000 host calls in one invocation (writes in one transaction, then reads): all answered."""
    args = json.dumps({"path": "/counter.json", "data": base64.b64encode(b'{"n": 1}').decode()}).encode()
    module = wat(f"""
(module
  (import "aeordb" "aeordb_write_file" (func $write (param i32 i32) (result i64)))
  (import "aeordb" "aeordb_context" (func $context (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (data (i32.const 1024) "{wat_string(args)}")
  (data (i32.const 900) "{{}}")
  (func (export "handle") (param i32 i32) (result i64)
    (local $i i32) (local $answer i64)
    (loop $again
      (drop (call $write (i32.const 1024) (i32.const {len(args)})))
      (local.set $answer (call $context (i32.const 900) (i32.const 2)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 2500))))
    (local.get $answer)))
""")
    deploy(client, "db/s/busy", module)
    started = time.monotonic()
    answer = json.loads(invoke(client, "db/s/busy/f").body)
    assert answer["db"] == "db" and answer["remaining_ms"] > 0, answer
    assert time.monotonic() - started < 5.0
    assert client.get("/db/_files/counter.json", headers=AUTH).body == b'{"n": 1}'


def test_fuzzed_modules_are_200_or_400_never_500(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.3)
    base = host_call_module("aeordb_context", b"{}")
    rng = random.Random(20240404)
    outcomes = {200: 0, 400: 0}
    invoked = 0
    for round_ in range(300):
        data = bytearray(base)
        for _ in range(rng.choice((1, 1, 2, 3))):
            kind = rng.randrange(5)
            at = rng.randrange(len(data))
            if kind == 0:
                data[at] ^= rng.randrange(1, 256)
            elif kind == 1:
                del data[max(at, 1):]
            elif kind == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            elif kind == 3:
                data[at] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
            else:
                size = rng.randrange(1, 17)
                data[at:at] = data[rng.randrange(len(data)):][:size]
        if round_ % 50 == 0:
            data = bytearray(b"\0asm\x01\0\0\0" + bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
        answer = client.put("/db/s/fuzz/_deploy", bytes(data), headers=AUTH, expect_errors=True)
        assert answer.status_int in (200, 400), (round_, answer.status, answer.body[:300])
        outcomes[answer.status_int] += 1
        if answer.status_int == 400:
            error_of(answer)
        elif invoked < 40:
            invoked += 1
            result = client.post("/db/s/fuzz/f/_invoke", b"", headers=AUTH, expect_errors=True)
            assert result.status_int in (200, 500), (round_, result.status, result.body[:300])
            if result.status_int == 500:
                assert error_of(result).startswith("plugin")
    assert outcomes[400] > 100 and outcomes[200] > 5, outcomes
    deploy(client, "db/s/fuzz", wat(ECHO_WAT))
    assert json.loads(invoke(client, "db/s/fuzz/f", b"!").body)["arguments"] == [33]


# -- bad requests --------------------------------------------------------------

BAD_SEGMENTS = ["..", "%2e%2e", "%2E%2E", ".", "a%2Fb", "%2F", "a%00b", "%00", "%0d%0aX-Injected:%201",
                "%EF%BD%84%EF%BD%82", "d%D0%B0b", "a" * 10_000, "_reserved", "a%20b", "%C0%AE%C0%AE",
                "%FF", "a%5Cb"]


# In file paths '/' (hence %2F) separates segments, and any printable UTF-8 name is allowed.
BAD_FILE_SEGMENTS = ["..", "%2e%2e", ".", "a%00b", "%00", "a%0db", "a" * 10_000, "%FF", "%C0%AE%C0%AE"]


def bad_name_requests():
    for bad in BAD_SEGMENTS:
        yield "GET", f"/{bad}/_plugins"
        yield "POST", f"/{bad}/_query"
        for position in range(3):
            parts = ["db", "s", "t"]
            parts[position] = bad
            yield "PUT", "/" + "/".join(parts) + "/_deploy"
        for position in range(4):
            parts = ["db", "s", "t", "f"]
            parts[position] = bad
            yield "POST", "/" + "/".join(parts) + "/_invoke"
            yield "DELETE", "/" + "/".join(parts) + "/_remove"
        for method in ("GET", "PUT", "DELETE"):
            yield method, f"/{bad}/_files/x"
    for bad in BAD_FILE_SEGMENTS:
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            yield method, f"/db/_files/{bad}"
            yield method, f"/db/_files/a/{bad}/b"


def test_bad_names_are_400_or_404_never_500(deployed):
    client, _ = deployed
    checked = 0
    for method, path in bad_name_requests():
        body = bytes(wat(ECHO_WAT)) if path.endswith("_deploy") else b"{}"
        answer = client.request(path, method=method, headers=AUTH, body=body, expect_errors=True)
        assert answer.status_int in (400, 404), (method, path[:80], answer.status, answer.body[:200])
        if method != "HEAD":
            assert len(error_of(answer)) < 1000, path[:80]     # names are shown shortened
        checked += 1
    assert checked > 200
    # Query parameters of a deploy, too.
    for query in ("name=%0a", "name=" + "n" * 200, "name=a%00b", "plugin_type=native", "plugin_type=%0d"):
        error_of(client.put(f"/db/s/t/_deploy?{query}", wat(ECHO_WAT), headers=AUTH, status=400))
    # Nothing was created anywhere by those requests.
    assert [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json] == ["db/s/t"]
    assert client.get("/db/_files/", headers=AUTH).json["entries"] == []
    plugins_dir = client.app.config["aeordb.settings"].data_dir / "plugins"
    assert [p.parent.relative_to(plugins_dir).as_posix() for p in plugins_dir.rglob("plugin.json")] == ["db/s/t"]


def test_oversized_bodies_are_413_unread(tmp_path):
    limits = {"max_module_size": 1000, "max_request_size": 2000, "max_file_size": 3000}
    client, app = make_app(tmp_path, **limits)
    deploy(client, "db/s/t", wat(ECHO_WAT))
    routes = [("PUT", "/db/s/u/_deploy", 1000), ("POST", "/db/s/t/f/_invoke", 2000),
              ("PUT", "/db/_files/big", 3000), ("POST", "/db/_query", 2000)]
    for method, path, limit in routes:
        # Over the limit by one byte: 413 and a JSON error naming the limit.
        answer = client.request(path, method=method, headers=AUTH, body=b" " * (limit + 1), expect_errors=True)
        assert answer.status_int == 413, (path, answer.status)
        assert str(limit) in error_of(answer)
        # At the limit: accepted (a deploy of spaces is a bad module, 400, but not too large).
        answer = client.request(path, method=method, headers=AUTH, body=b" " * limit, expect_errors=True)
        assert answer.status_int in (200, 201, 400) and answer.status_int != 413, (path, answer.status)
        # A body announced as huge is refused from its Content-Length alone: nothing is read.
        for announced in (limit + 1, 10 ** 12):
            body = CountingInput()
            environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "127.0.0.1",
                       "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": body,
                       "CONTENT_LENGTH": str(announced), "HTTP_AUTHORIZATION": AUTH["Authorization"],
                       "wsgi.errors": sys.stderr}
            answer = webtest.TestRequest(environ).get_response(app)
            assert answer.status_int == 413 and body.read_bytes == 0, (path, announced, answer.status)
    assert client.get("/db/_files/", headers=AUTH).json["entries"] == [
        {"name": "big", "type": "file", "size": 3000}]


# -- faults and concurrency ----------------------------------------------------

def test_failed_commit_leaves_no_open_transaction(client):
    files = client.app.config["aeordb.files"]
    real = files._conn()
    files._local.conn = CommitFails(real)
    try:
        client.put("/db/_files/a.txt", b"a", headers=AUTH, status=503)
        assert not real.in_transaction            # else this thread would hold the write lock for good
        client.put("/db/_files/b.txt", b"b", headers=AUTH, status=201)
    finally:
        files._local.conn = real
    client.get("/db/_files/a.txt", headers=AUTH, status=404)
    assert client.get("/db/_files/b.txt", headers=AUTH).body == b"b"


def test_read_only_database_is_503_and_reads_keep_working(tmp_path, monkeypatch):
    import sqlite3
    client, app = make_app(tmp_path)
    files = app.config["aeordb.files"]
    client.put("/db/_files/docs/a.json", b'{"n": 1}', headers=AUTH, status=201)
    writer = host_call_module("aeordb_write_file", json.dumps({"path": "/docs/b.json", "data": "e30="}).encode())
    deploy(client, "db/s/writer", writer)
    files._conn()      # this thread's connection exists; swap it for a read-only one
    read_only = sqlite3.connect(f"file:{files.db_file}?mode=ro", uri=True, isolation_level=None,
                                check_same_thread=False)
    monkeypatch.setattr(files._local, "conn", read_only)
    for method, path, body in [("PUT", "/db/_files/docs/c.json", b"{}"), ("PUT", "/db/_files/docs/a.json", b"{}"),
                               ("DELETE", "/db/_files/docs/a.json", b"")]:
        answer = client.request(path, method=method, headers=AUTH, body=body, expect_errors=True)
        assert answer.status_int == 503 and "storage" in error_of(answer), (method, path, answer.body)
    assert "storage" in json.loads(invoke(client, "db/s/writer/f").body)["error"]
    # Reads keep working and nothing changed.
    assert client.get("/db/_files/docs/a.json", headers=AUTH).body == b'{"n": 1}'
    assert [e["name"] for e in client.get("/db/_files/docs", headers=AUTH).json["entries"]] == ["a.json"]
    assert client.post("/db/_query", b'{"path": "/docs"}', headers=AUTH).json["items"][0]["path"] == "/docs/a.json"
    monkeypatch.undo()
    read_only.close()
    client.put("/db/_files/docs/c.json", b"{}", headers=AUTH, status=201)
    assert json.loads(invoke(client, "db/s/writer/f").body)["ok"] is True


def test_disk_full_on_deploy_and_remove_is_503_without_partial_state(tmp_path, monkeypatch):
    import errno
    client, _ = make_app(tmp_path)
    deploy(client, "db/s/t", answer_module(b"v1"))
    real_write = aeordb.atomic_write

    def failing_write(only: str):
        def write(path, data):
            if only in path.name:
                raise disk_error()
            return real_write(path, data)
        return write

    for only in ("", "plugin.json", ".wasm"):
        monkeypatch.setattr(aeordb, "atomic_write", failing_write(only))
        message = error_of(deploy(client, "db/s/t", answer_module(b"v2"), status=503))
        assert "storage" in message and "No space" in message, message
        assert invoke(client, "db/s/t/f").body == b"v1"
        error_of(deploy(client, "db/s/new", answer_module(b"n"), status=503))
        assert [m["path"] for m in client.get("/db/_plugins", headers=AUTH).json] == ["db/s/t"]
        assert client.get("/_health").status_int == 200
    monkeypatch.setattr(aeordb, "atomic_write", real_write)
    # A remove whose unlink the disk refuses.
    real_unlink = Path.unlink

    def failing_unlink(self, *args, **kwargs):
        if self.name == "plugin.json":
            raise disk_error(errno.EROFS)
        return real_unlink(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", failing_unlink)
    assert "storage" in error_of(client.delete("/db/s/t/f/_remove", headers=AUTH, status=503))
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert invoke(client, "db/s/t/f").body == b"v1"
    # A restart sees v1 alone: no half-deployed v2, no stray module or temp file.
    reloaded, _ = make_app(tmp_path)
    assert [m["path"] for m in reloaded.get("/db/_plugins", headers=AUTH).json] == ["db/s/t"]
    assert invoke(reloaded, "db/s/t/f").body == b"v1"
    assert len(list((tmp_path / "plugins" / "db" / "s" / "t").glob("module-*.wasm"))) == 1
    assert not list((tmp_path / "plugins").glob("db/s/new/*"))
    assert temp_files(tmp_path) == []


def test_racing_deploys_and_removes_of_one_plugin_keep_its_files(tmp_path, monkeypatch):
    """Forces the interleavings the concurrency test only meets by chance.

    Each deploy pauses (bounded) right after writing its module file, letting
    the other thread's deploy or remove run into that gap if nothing prevents it.
    """
    _, app = make_app(tmp_path)
    registry = app.config["aeordb.registry"]
    real_write, real_lock = aeordb.atomic_write, registry._lock
    module_written, other_done = threading.Event(), threading.Event()

    def pausing_write(path, data):
        real_write(path, data)
        if path.name.startswith("module-") and threading.current_thread().name == "hz-first":
            module_written.set()
            # Until the other operation is over, or waits for the lock we may hold.
            wait_for(lambda: other_done.is_set() or registry._lock.waiting.is_set(), what="the other operation")

    monkeypatch.setattr(aeordb, "atomic_write", pausing_write)
    for second in ("deploy", "remove"):
        registry._lock = real_lock
        registry.deploy("db", "s", "t", answer_module(b"v0"), "t", "wasm")
        registry._lock = GatedLock(real_lock)
        module_written.clear()
        other_done.clear()
        outcome = {}

        def run_first():
            try:
                outcome["meta"] = registry.deploy("db", "s", "t", answer_module(b"v1-" + second.encode()),
                                                  "t", "wasm")
            except BaseException as exc:   # reported below: a thread's failure must fail the test
                outcome["error"] = exc
        first = threading.Thread(name="hz-first", target=run_first)
        first.start()
        assert module_written.wait(timeout=10)
        if second == "deploy":
            registry.deploy("db", "s", "t", answer_module(b"v2"), "t", "wasm")
        else:
            registry.remove("db", "s", "t")     # v0 (or v1) is deployed: never a 404
        other_done.set()
        first.join(timeout=10)
        assert not first.is_alive() and "meta" in outcome, outcome
        listed = registry.list("db")
        if second == "deploy":
            assert [meta["path"] for meta in listed] == ["db/s/t"]
        check_plugin_files(tmp_path, listed)
        reloaded, _ = make_app(tmp_path)
        assert reloaded.get("/db/_plugins", headers=AUTH).json == listed
        for meta in listed:
            assert invoke(reloaded, meta["path"] + "/f").status_int == 200


# Real-server tests ############################################################
# Everything that starts waitress in this process or `python aeordb.py` as a process.

def test_real_server_round_trip(tmp_path):
    with server_process(tmp_path) as (process, port):
        status, _, body = http_request(port, "PUT", "/mydb/public/users/_deploy?name=my-plugin",
                                       wat(ECHO_WAT))
        assert status == 200 and json.loads(body)["name"] == "my-plugin"
        status, headers, body = http_request(port, "POST", "/mydb/public/users/compute/_invoke", b"hi",
                                             {"Content-Type": "text/plain"})
        assert status == 200 and headers["content-type"] == "application/octet-stream"
        envelope = json.loads(body)
        assert envelope["arguments"] == [104, 105]
        assert envelope["metadata"]["content_type"] == "text/plain"
        status, _, body = http_request(port, "GET", "/mydb/_plugins")
        assert status == 200 and [p["path"] for p in json.loads(body)] == ["mydb/public/users"]
        status, headers, body = http_request(port, "GET", "/mydb/_plugins", headers={"Authorization": "Bearer x"})
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        status, _, body = http_request(port, "DELETE", "/mydb/public/users/compute/_remove")
        assert status == 200 and json.loads(body) == {"removed": True, "path": "mydb/public/users"}
        status, _, _ = http_request(port, "POST", "/mydb/public/users/compute/_invoke", b"hi")
        assert status == 404
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert f"127.0.0.1:{port}" in output
    assert TOKEN not in output


def test_path_traversal_on_a_real_server(real_server):
    _, port = real_server
    assert http_request(port, "PUT", "/f/_files/secret.txt", b"SECRET")[0] == 201
    # No Content-Type on the request: the type follows the extension.
    assert http_request(port, "GET", "/f/_files/secret.txt")[1]["content-type"].startswith("text/plain")
    for path in ("/f/_files/a/../secret.txt", "/f/_files/a/%2e%2e/secret.txt",
                 "/x/_files/..%2f..%2ff%2f_files%2fsecret.txt", "/f/_files/a/..%2Fsecret.txt"):
        status, _, body = http_request(port, "GET", path)
        assert status in (400, 404) and b"SECRET" not in body, (path, status)


def test_bad_names_on_a_real_server(real_server):
    """waitress decodes paths itself: the same answers there, never a 500 or a dropped connection."""
    _, port = real_server
    for method, path in list(bad_name_requests())[::7]:
        status, headers, body = http_request(port, method, path, b"{}")
        assert status in (400, 404), (method, path[:80], status, body[:200])
    status, _, _ = http_request(port, "GET", "/db/_plugins")
    assert status == 200


HOSTILE_PLUGIN_HEADERS = {
    "X-Ok": "yes", "x-lower": "fine", "Cache-Control": "no-store", "ETag": '"v1"', "Vary": "Accept",
    "Set-Cookie": "session=stolen", "Location": "http://evil.example/", "Content-Length": "1",
    "Transfer-Encoding": "chunked", "Server": "evil", "WWW-Authenticate": "Basic", "Connection": "close",
    "Access-Control-Allow-Origin": "*", "Strict-Transport-Security": "max-age=0", "Content-Type": "text/html",
    "X-Split": "a\r\nSet-Cookie: injected=1", "X-Lf": "a\nInjected: 1", "X-Cr": "a\rInjected: 1",
    "X-Nul": "a\u0000b", "X-Bad Name": "v", "X-Colon:Name": "v", "X-Crlf\r\nInjected": "v",
    "X-Unicode": "\u2603", "X-Latin": "caf\u00e9", "X-Tab": "a\tb",
}


def test_unsafe_plugin_headers_are_dropped(real_server):
    envelope = {"status_code": 201, "body": "hi", "content_type": "text/plain\r\nSet-Cookie: ct=1",
                "headers": HOSTILE_PLUGIN_HEADERS}
    client, port = real_server
    deploy(client, "db/s/h", answer_module(json.dumps(envelope).encode()))

    def check(status, headers, body):
        assert status == 201 and body == b"hi"
        names = {name.lower() for name in headers}
        assert {"x-ok", "x-lower", "cache-control", "etag", "vary"} <= names, names
        assert not names & {"set-cookie", "location", "transfer-encoding", "www-authenticate",
                            "access-control-allow-origin", "strict-transport-security", "x-split", "x-lf",
                            "x-cr", "x-nul", "x-bad name", "x-colon:name", "injected"}, names
        assert all("injected" not in str(v).lower() and "evil" not in str(v) for v in headers.values())
        assert headers.get("content-type", headers.get("Content-Type")) == "application/octet-stream"

    answer = invoke(client, "db/s/h/f", status=201)
    check(answer.status_int, dict(answer.headers), answer.body)
    check(*http_request(port, "POST", "/db/s/h/f/_invoke", b""))
    assert http_request(port, "GET", "/_health")[0] == 200


def test_oversized_bodies_on_a_real_server(tmp_path):
    """waitress's global cap (the one Server sets) refuses a huge Content-Length before any body."""
    client, app = make_app(tmp_path, max_module_size=1000, max_request_size=1000, max_file_size=1000)
    deploy(client, "db/s/t", wat(ECHO_WAT))
    with server_thread(app) as port:
        for method, path in [("PUT", "/db/s/u/_deploy"), ("POST", "/db/s/t/f/_invoke"),
                             ("PUT", "/db/_files/big")]:
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
                    f"Content-Length: {10 ** 10}\r\n\r\n").encode()
            started = time.monotonic()
            answer = send_raw(port, head, b"only a few bytes")
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert time.monotonic() - started < 3.0
            # Over the route's limit but under the global cap: the app refuses it from Content-Length.
            status, _, body = http_request(port, method, path, b"x" * 1500)
            assert status == 413 and "1000" in json.loads(body)["error"]
            # Chunked, so without Content-Length: refused all the same.
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, path, body=iter([b"y" * 800, b"y" * 800]), headers={**AUTH},
                         encode_chunked=True)
            assert conn.getresponse().status == 413
            conn.close()
        status, _, body = http_request(port, "GET", "/db/_files/")
        assert status == 200 and json.loads(body)["entries"] == []


START_LOOP_WAT = """
(module
  (memory (export "memory") 1)
  (func $start (loop $forever (br $forever)))
  (start $start)
  (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))
"""


def test_start_function_runs_without_the_gil(tmp_path):
    """A start function is guest code: while it spins, other requests are served."""
    client, app = make_app(tmp_path, timeout=2)
    deploy(client, "db/s/starts", wat(START_LOOP_WAT))
    deploy(client, "db/s/plain", wat(ECHO_WAT))

    runtime, started = app.config["aeordb.runtime"], threading.Event()
    real_invoke = runtime.invoke

    def observed_invoke(plugin, request, invocation):
        if plugin.key == "db/s/starts":
            started.set()
        return real_invoke(plugin, request, invocation)
    runtime.invoke = observed_invoke
    with server_thread(app) as port:
        outcome = {}
        spinner = threading.Thread(target=lambda: outcome.update(
            result=http_request(port, "POST", "/db/s/starts/f/_invoke", b"")))
        spinner.start()
        assert started.wait(10)
        status, _, body = http_request(port, "POST", "/db/s/plain/f/_invoke", b"hi", timeout=1.5)
        assert status == 200 and json.loads(body)["arguments"] == [104, 105]
        assert spinner.is_alive(), "the looping start function ended before the other request"
        spinner.join(15)
    status, _, body = outcome["result"]
    assert status == 500 and "time limit" in json.loads(body)["error"]


def spin_between_marks_module(count: int) -> bytes:
    write = write_step("/c.json", b'{"n": 1}')[1]
    return wat(f"""
(module
  (import "aeordb" "aeordb_write_file" (func $write (param i32 i32) (result i64)))
  (import "aeordb" "log_message" (func $log (param i32 i32 i32 i32)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (data (i32.const 1024) "info")
  (data (i32.const 1032) "written")
  (data (i32.const 1040) "spun")
  (data (i32.const 1048) "{wat_string(write)}")
  (func (export "handle") (param i32 i32) (result i64)
    (local $r i64) (local $i i32)
    (local.set $r (call $write (i32.const 1048) (i32.const {len(write)})))
    (call $log (i32.const 1024) (i32.const 4) (i32.const 1032) (i32.const 7))
    (local.set $i (i32.const {count}))
    (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i)))
    (call $log (i32.const 1024) (i32.const 4) (i32.const 1040) (i32.const 4))
    (local.get $r)))
""")


def test_concurrent_invocations_do_not_see_uncommitted_writes(real_server):
    """P writes /c.json, logs "written", spins, logs "spun" and returns (commit after that).

    Every read that *completed* before P logged "spun" happened before the commit, so it
    must miss the file: HTTP GET answers 404 and a reading plugin answers "no file".
    P's "written" line holds it (inside its invocation) until a first pair of reads is done.
    """
    import logging
    _, port = real_server
    written, spun, reads_done = threading.Event(), threading.Event(), threading.Event()

    class Marks(logging.Handler):
        def emit(self, record):   # runs in P's thread, inside its log_message call
            message = record.getMessage()
            if "[c/s/p request=" in message:
                if message.endswith("written"):
                    written.set()
                    reads_done.wait(10)
                else:
                    spun.set()

    handler, plugin_logger = Marks(), logging.getLogger("aeordb.plugin")
    old_level = plugin_logger.level
    plugin_logger.addHandler(handler)
    plugin_logger.setLevel(logging.INFO)
    reader = host_call_module("aeordb_read_file", json_args({"path": "/c.json"}))
    try:
        assert http_request(port, "PUT", "/c/s/q/_deploy", reader)[0] == 200
        assert http_request(port, "PUT", "/c/s/p/_deploy", spin_between_marks_module(1_000_000))[0] == 200
        done = threading.Event()
        result = {}

        def run_p():
            try:
                result["p"] = http_request(port, "POST", "/c/s/p/run/_invoke", b"")
            finally:
                done.set()
        thread = threading.Thread(target=run_p)
        thread.start()
        assert written.wait(10)
        early = 0
        while not done.is_set():
            status, _, body = http_request(port, "GET", "/c/_files/c.json")
            q_status, _, q_body = http_request(port, "POST", "/c/s/q/run/_invoke", b"")
            if not spun.is_set():          # both reads finished before P's commit
                assert status == 404, body
                assert q_status == 200 and "no file" in json.loads(q_body)["error"]
                early += 1
            reads_done.set()               # P may go on to its commit
        thread.join(10)
        assert result["p"][0] == 200 and json.loads(result["p"][2]) == {"ok": True, "size": 8}
        status, _, body = http_request(port, "GET", "/c/_files/c.json")
        assert (status, json.loads(body)) == (200, {"n": 1})
        q_status, _, q_body = http_request(port, "POST", "/c/s/q/run/_invoke", b"")
        assert base64.b64decode(json.loads(q_body)["data"]) == b'{"n": 1}'
        assert early > 0, "no read landed while P was running"
    finally:
        reads_done.set()
        plugin_logger.removeHandler(handler)
        plugin_logger.setLevel(old_level)


def test_concurrent_clients_keep_the_registry_consistent(tmp_path):
    """6 threads deploy, invoke, list and remove shared and own plugins at once against waitress."""
    _, app = make_app(tmp_path)
    registry = app.config["aeordb.registry"]
    trap = wat(TRAP_WAT)
    problems: list = []
    counts = {"ok": 0}
    lock = threading.Lock()

    def worker(index: int, port: int) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        own = f"t{index}"
        for done in range(1, 201):
            target = rng.choice(("shared", "shared", own))
            kind = rng.choice(("deploy", "deploy", "invoke", "invoke", "list", "remove", "trap"))
            if kind == "deploy":
                method, path, body = "PUT", f"/db/s/{target}/_deploy", answer_module(f"{target}|{index}|{done}".encode())
            elif kind == "invoke":
                method, path, body = "POST", f"/db/s/{target}/f/_invoke", b"x"
            elif kind == "list":
                method, path, body = "GET", "/db/_plugins", None
            elif kind == "remove":
                method, path, body = "DELETE", f"/db/s/{target}/f/_remove", None
            else:
                method, path, body = "POST", "/db/s/trap/f/_invoke", b""
            try:
                conn.request(method, path, body=body, headers=AUTH)
                response = conn.getresponse()
                status, data = response.status, response.read()
                ctype = response.getheader("Content-Type", "")
            except (OSError, http.client.HTTPException) as exc:
                problems.append((method, path, repr(exc)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            try:
                if kind == "invoke" and status == 200:
                    assert data.split(b"|")[0].decode() == target and ctype == "application/octet-stream"
                elif kind == "trap":
                    assert status == 500 and "unreachable" in json.loads(data)["error"]
                else:
                    payload = json.loads(data)
                    assert ctype == "application/json"
                    if kind == "deploy":
                        assert status == 200 and payload["path"] == f"db/s/{target}"
                    elif kind == "list":
                        assert status == 200 and all(isinstance(m["path"], str) and m["sha256"] for m in payload)
                    elif kind == "remove":
                        assert status in (200, 404)
                    else:
                        assert status == 404 and payload["error"]
            except (AssertionError, ValueError, KeyError, TypeError) as exc:
                problems.append((method, path, status, data[:200], repr(exc)))
            with lock:
                counts["ok"] += 1
        conn.close()

    with server_thread(app, threads=6) as port:
        assert http_request(port, "PUT", "/db/s/trap/_deploy", trap)[0] == 200
        workers = [threading.Thread(target=worker, args=(i, port)) for i in range(6)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in workers)
        assert not problems, problems[:5]
        assert counts["ok"] > 300, counts
        listed = json.loads(http_request(port, "GET", "/db/_plugins")[2])
        for meta in listed:
            status, _, body = http_request(port, "POST", f"/{meta['path']}/f/_invoke", b"")
            assert status == (500 if meta["path"] == "db/s/trap" else 200), (meta, status, body[:200])
    # The registry, its files on disk and a fresh load all agree.
    assert listed == registry.list("db")
    check_plugin_files(tmp_path, listed)
    assert temp_files(tmp_path) == []
    reloaded, _ = make_app(tmp_path)
    assert reloaded.get("/db/_plugins", headers=AUTH).json == listed


def test_sigkill_mid_stream_loses_no_acknowledged_change(tmp_path):
    """SIGKILL while a client deploys, removes, writes and deletes; every acknowledged change survives."""
    data_dir = tmp_path / "data"
    expected: dict = {}        # key -> value (bytes) or None: the acknowledged state
    in_flight: dict = {}       # key -> value the unanswered request would have set
    unexpected: list = []
    stop = threading.Event()

    def stream(port: int) -> None:
        rng = random.Random(99)
        for number in range(100_000):
            if stop.is_set():
                return
            kind = rng.choice(("deploy", "deploy", "remove", "write", "write", "write", "delete"))
            if kind in ("deploy", "remove"):
                key = f"p{rng.randrange(8)}"
                value = f"{key}-v{number}".encode() if kind == "deploy" else None
                method, path = ("PUT", f"/db/s/{key}/_deploy") if value else ("DELETE", f"/db/s/{key}/f/_remove")
                body = answer_module(value) if value else None
            else:
                key = f"f{rng.randrange(12)}"
                value = (f"{key}-{number}|".encode() * rng.randrange(1, 20_000)) if kind == "write" else None
                method, path, body = ("PUT" if value else "DELETE"), f"/db/_files/{key}", value
            in_flight.clear()
            in_flight[key] = value
            try:
                status, _, answer = http_request(port, method, path, body, timeout=10)
            except OSError:
                return                       # the server is gone: this change is unacknowledged
            if status in (200, 201) or (status == 404 and value is None):
                expected[key] = value
            else:
                unexpected.append((method, path, status, answer[:200]))
            in_flight.clear()

    with server_process(data_dir) as (process, port):
        # serve() hands waitress the global body cap: a huge Content-Length is refused before any body.
        head = (f"PUT /db/_files/huge HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                f"Content-Length: {10 ** 12}\r\n\r\n").encode()
        assert send_raw(port, head, b"abc").startswith(b"HTTP/1.1 413")
        client = threading.Thread(target=stream, args=(port,), daemon=True)
        client.start()
        def enough() -> bool:
            acknowledged = dict(expected)    # a copy: the client thread keeps adding keys
            return len(acknowledged) >= 12 and sum(v is not None for v in acknowledged.values()) >= 6
        wait_for(lambda: enough() or not client.is_alive(), timeout=30, what="12 acknowledged changes")
        assert enough() and client.is_alive(), unexpected
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        stop.set()
        client.join(timeout=15)
        output = process.stdout.read()
    assert not client.is_alive() and not unexpected, unexpected
    assert TOKEN.encode() not in output
    # Leftovers of interrupted writes, as a crash at another moment would leave them.
    for planted in (data_dir / "plugins" / "db" / "s" / "p0" / f"plugin.json{aeordb.TEMP_MARK}x1",
                    data_dir / "cache" / f"deadbeef.cwasm{aeordb.TEMP_MARK}x2"):
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(b"torn")
    with server_process(data_dir) as (process, port):
        assert temp_files(data_dir) == []
        listed = {meta["path"]: meta for meta in json.loads(http_request(port, "GET", "/db/_plugins")[2])}
        for key in sorted(set(expected) | set(in_flight)):
            allowed = {expected.get(key, None)} | ({in_flight[key]} if key in in_flight else set())
            if key.startswith("p"):
                if f"db/s/{key}" in listed:
                    status, _, body = http_request(port, "POST", f"/db/s/{key}/f/_invoke", b"")
                    assert status == 200 and body in allowed, (key, status, body, allowed)
                else:
                    assert None in allowed, (key, allowed)
            else:
                status, _, body = http_request(port, "GET", f"/db/_files/{key}")
                assert (body if status == 200 else None) in allowed, (key, status, body[:80], allowed)
                assert status in (200, 404)
        # Nothing listed that was never deployed, every listed plugin answers.
        assert set(listed) <= {f"db/s/p{k}" for k in range(8)}
        for path in listed:
            assert http_request(port, "POST", f"/{path}/f/_invoke", b"")[0] == 200



# -- devices: address space, start-up, shutdown, private data -----------------

# Grows its memory by 16 MiB and writes to every page of it, then answers "ok".
TOUCH_16_MIB_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param i32 i32) (result i64)
    (local $p i32)
    (if (i32.eq (memory.grow (i32.const 256)) (i32.const -1)) (then unreachable))
    (local.set $p (i32.const 65536))
    (block $done (loop $touch
      (br_if $done (i32.ge_u (local.get $p) (i32.const 16842752)))
      (i32.store (local.get $p) (local.get $p))
      (local.set $p (i32.add (local.get $p) (i32.const 4096)))
      (br $touch)))
    (i32.store16 (i32.const 0) (i32.const 0x6b6f))
    (i64.const 2)))
"""


@pytest.mark.parametrize("address_space, engine", [
    (None, "pooling"), (400 * aeordb.GiB, "pooling"),
    (8 * aeordb.GiB, "bounded-pooling"), (2 * aeordb.GiB, "on-demand")],
    ids=["unlimited", "400GiB-39bit-like", "8GiB", "2GiB"])
def test_serves_under_address_space_limits(tmp_path, address_space, engine):
    """Under RLIMIT_AS (a service manager, a 39-bit arm64 kernel) the engine fits instead of aborting."""
    with server_process(tmp_path, address_space=address_space) as (process, port):
        status, _, body = http_request(port, "GET", "/_health")
        assert status == 200 and json.loads(body)["engine"] == engine
        for table, module in (("echo", ECHO_WAT), ("bomb", MEMORY_BOMB_WAT), ("touch", TOUCH_16_MIB_WAT)):
            assert http_request(port, "PUT", f"/db/s/{table}/_deploy", wat(module))[0] == 200
        status, _, body = http_request(port, "POST", "/db/s/echo/f/_invoke", b"hi")
        assert status == 200 and json.loads(body)["arguments"] == [104, 105]
        status, _, body = http_request(port, "POST", "/db/s/bomb/f/_invoke", b"")
        assert status == 500 and "memory limit" in json.loads(body)["error"]
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(
            http_request(port, "POST", "/db/s/touch/f/_invoke", b""))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [(status, body) for status, _, body in outcomes] == [(200, b"ok")] * 8
        assert process.poll() is None


def test_choose_mode_takes_the_fastest_engine_that_fits(monkeypatch):
    limits = (64 << 20, 100_000, aeordb.pool_slots(8))
    fits = {"pooling": False, "bounded-pooling": True}
    planned = {aeordb.Wasm.planned_reservation(mode, *limits): mode for mode in fits}
    monkeypatch.setattr(aeordb, "can_reserve", lambda size: fits.get(planned.get(size // 2), True))
    assert aeordb.Wasm.choose_mode("auto", *limits) == "bounded-pooling"
    fits["bounded-pooling"] = False
    assert aeordb.Wasm.choose_mode("auto", *limits) == "on-demand"
    with pytest.raises(aeordb.StartupError, match="pooling needs about"):
        aeordb.Wasm.choose_mode("pooling", *limits)
    assert aeordb.Wasm.choose_mode("on-demand", *limits) == "on-demand"
    # The pool grows with the workers: one instance and two memories each, and headroom.
    assert aeordb.pool_slots(1) == 32 and aeordb.pool_slots(20) == 80 and aeordb.pool_slots(100) == 256


def test_can_reserve_asks_the_kernel():
    assert aeordb.can_reserve(1 << 30)
    assert not aeordb.can_reserve(1 << 62)   # past any 64-bit address space


def test_an_instance_without_memory_is_a_503_not_a_crash(client, monkeypatch):
    deploy(client, "db/s/t", wat(ECHO_WAT))

    def refused(*args, **kwargs):
        raise aeordb.GuestFailure(Exception("mmap failed: Cannot allocate memory (os error 12)"), None)
    monkeypatch.setattr(aeordb, "run_guest", refused)
    answer = invoke(client, "db/s/t/f", b"x", status=503)
    assert "no memory left" in error_of(answer) and answer.headers["Retry-After"] == "1"


def startup_failures(tmp: Path, busy_port: int) -> dict:
    """Command-line arguments that each make ``python aeordb.py`` refuse to start."""
    (tmp / "a-file").write_text("x")
    (tmp / "dir-token" / "token").mkdir(parents=True)
    (tmp / "bad-token").mkdir()
    (tmp / "bad-token" / "token").write_bytes(b"\xff\xfe not-a-token \x00")
    (tmp / "not-sqlite").mkdir()
    (tmp / "not-sqlite" / "aeordb.sqlite3").write_text("these are someone's notes")
    return {
        "port in use": ["--port", str(busy_port)],
        "address not available": ["--host", "192.0.2.1"],
        "data dir not creatable": ["--data-dir", "/proc/no-such-dir/data"],
        "data dir not writable": ["--data-dir", "/proc/1"],
        "data dir is a file": ["--data-dir", str(tmp / "a-file")],
        "token too short": ["--token", "short"],
        "token file is a directory": ["--data-dir", str(tmp / "dir-token")],
        "token file not a token": ["--data-dir", str(tmp / "bad-token")],
        "database not sqlite": ["--data-dir", str(tmp / "not-sqlite")],
    }


def test_startup_errors_are_one_line_and_exit_2(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    processes = {}
    for case, extra in startup_failures(tmp_path, busy.getsockname()[1]).items():
        args = ["--port", str(free_port()), "--data-dir", str(tmp_path / case.replace(" ", "-"))]
        token = [] if "token" in case else ["--token", TOKEN]
        processes[case] = subprocess.Popen([sys.executable, str(HERE / "aeordb.py"), *args, *token, *extra],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for case, process in processes.items():
            out, err = process.communicate(timeout=60)
            assert process.returncode == 2, (case, out, err)
            assert out == "", (case, out)   # no banner, and no token printed
            assert err.count("\n") == 1 and err.startswith("aeordb.py: cannot start: "), (case, err)
            assert "Traceback" not in err
    finally:
        busy.close()


def test_startup_error_messages_name_the_problem(tmp_path):
    (tmp_path / "data" / "token").mkdir(parents=True)
    with pytest.raises(aeordb.StartupError, match="cannot read the token file"):
        make_app(tmp_path / "data", token=None)
    (tmp_path / "data" / "token").rmdir()
    (tmp_path / "data" / "token").write_bytes(b"\xff" * 20)
    with pytest.raises(aeordb.StartupError, match="does not hold a token"):
        make_app(tmp_path / "data", token=None)
    with pytest.raises(aeordb.StartupError, match="must be 16-4096 visible ASCII"):
        make_app(tmp_path / "other", token="fifteen-chars!!")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "aeordb.sqlite3").write_text("shopping list")
    with pytest.raises(aeordb.StartupError, match="is not an SQLite database"):
        make_app(tmp_path / "notes")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    with pytest.raises(aeordb.StartupError, match="Address already in use"):
        aeordb.bind_listener("127.0.0.1", busy.getsockname()[1])
    busy.close()


def test_damaged_database_keeps_plugins_serving(tmp_path):
    client, _ = make_app(tmp_path)
    put_file(client, "db", "/a.txt", b"hello")
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    deploy(client, "db/s/reader", host_call_module("aeordb_read_file", b'{"path": "/a.txt"}'))
    database = tmp_path / "aeordb.sqlite3"
    client.app.config["aeordb.files"].checkpoint()
    damaged = bytearray(database.read_bytes())
    damaged[16:24] = b"\xff" * 8   # page size and format bytes of the header
    database.write_bytes(bytes(damaged))
    for name in ("aeordb.sqlite3-wal", "aeordb.sqlite3-shm"):
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / name).unlink()
    again, _ = make_app(tmp_path)
    assert json.loads(invoke(again, "db/s/echo/f", b"ok").body)["arguments"] == [111, 107]
    for method, path in (("GET", "/db/_files/a.txt"), ("PUT", "/db/_files/b.txt"), ("POST", "/db/_query")):
        answer = again.request(path, method=method, body=b"{}", headers=AUTH, expect_errors=True)
        assert answer.status_int == 503 and "aeordb.sqlite3 is damaged" in error_of(answer), (method, path)
    assert "aeordb.sqlite3 is damaged" in json.loads(invoke(again, "db/s/reader/f").body)["error"]
    assert again.get("/_health").json["status"] == "ok"


def test_data_dir_is_private_and_old_modes_are_tightened(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "token").write_text(TOKEN)   # world-readable, as an older version or an operator left it
    (data / "token").chmod(0o644)
    client, _ = make_app(data, token=None)
    put_file(client, "db", "/a.txt", b"secret")
    deploy(client, "db/s/t", wat(ECHO_WAT))
    invoke(client, "db/s/t/f")
    modes = {str(p.relative_to(data)): p.stat().st_mode & 0o777 for p in [data, *data.rglob("*")]}
    for name in ("token", "aeordb.sqlite3", "aeordb.sqlite3-wal", "aeordb.sqlite3-shm",
                 "plugins/db/s/t/plugin.json"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    assert {mode for name, mode in modes.items() if (data / name).is_dir() or name == "."} == {0o700}
    assert {mode for name, mode in modes.items() if (data / name).is_file()} == {0o600}, modes
    assert any(name.endswith(".cwasm") for name in modes) and any(name.endswith(".wasm") for name in modes)
    # What an older version left world-readable is tightened at the next start.
    data.chmod(0o755)
    (data / "aeordb.sqlite3").chmod(0o644)
    (data / "plugins" / "db").chmod(0o755)
    make_app(data, token=None)
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "aeordb.sqlite3").stat().st_mode & 0o777 == 0o600
    assert (data / "plugins" / "db").stat().st_mode & 0o777 == 0o700


def test_configured_token_is_the_only_truth(tmp_path, caplog):
    import logging
    caplog.set_level(logging.WARNING, logger="aeordb")
    _, app = make_app(tmp_path, token=None)
    stale = app.config["aeordb.token"]
    new = "a-new-token-for-the-device-0123"
    client, _ = make_app(tmp_path, token=new)
    assert not (tmp_path / "token").exists()   # it would disagree with the token in force
    assert "removed" in caplog.text and stale not in caplog.text and new not in caplog.text
    assert client.get("/db/_plugins", headers={"Authorization": f"Bearer {new}"}).json == []
    assert client.get("/db/_plugins", headers={"Authorization": f"Bearer {stale}"},
                      expect_errors=True).status_int == 401
    # The same token given again keeps an agreeing file.
    (tmp_path / "token").write_text(new + "\n")
    make_app(tmp_path, token=new)
    assert (tmp_path / "token").read_text().strip() == new


def test_bearer_scheme_is_case_insensitive(client):
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert client.get("/db/_plugins", headers={"Authorization": f"{scheme} {TOKEN}"}).json == []


def test_wal_is_bounded(client):
    files = client.app.config["aeordb.files"]
    assert files._conn().execute("PRAGMA journal_size_limit").fetchone()[0] == aeordb.WAL_SIZE_LIMIT


def read_all_available(process) -> str:
    out, _ = process.communicate(timeout=30)
    return out.decode(errors="replace")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_finishes_requests_in_flight_and_checkpoints(tmp_path, signum):
    with server_process(tmp_path) as (process, port):
        assert http_request(port, "PUT", "/db/_files/kept.txt", b"acknowledged")[0] == 201
        assert http_request(port, "PUT", "/db/s/t/_deploy", wat(ECHO_WAT))[0] == 200
        # A connection the server has accepted (one request answered on it), then a
        # request in flight on it: its head is sent, its body not yet.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/_health")
        assert conn.getresponse().read() and conn.sock is not None
        raw = conn.sock
        raw.sendall(b"POST /db/s/t/f/_invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                    + b"\r\nContent-Length: 2\r\n\r\n")
        process.send_signal(signum)

        def refuses_new_connections() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True
        wait_for(refuses_new_connections, what="the listener closed")
        assert process.poll() is None, "the server exited with a request in flight"
        raw.sendall(b"hi")
        reply = b""
        while not reply.endswith(b"}"):
            chunk = raw.recv(65536)
            if not chunk:
                break
            reply += chunk
        conn.close()
        assert reply.startswith(b"HTTP/1.1 200") and b'"arguments":[104,105]' in reply, reply[:300]
        assert process.wait(timeout=30) == 0, read_all_available(process)
    # Everything acknowledged is in the main database file: a copy of it alone is a backup.
    assert not (tmp_path / "aeordb.sqlite3-wal").exists() or (tmp_path / "aeordb.sqlite3-wal").stat().st_size == 0
    import shutil
    shutil.copy(tmp_path / "aeordb.sqlite3", tmp_path / "copy.sqlite3")
    copy = sqlite3.connect(tmp_path / "copy.sqlite3")
    assert copy.execute("SELECT data FROM files WHERE path='/kept.txt'").fetchone()[0] == b"acknowledged"
    copy.close()


def test_service_unit_runs_hardened_with_real_options():
    unit = (HERE / "examples" / "aeordb.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                       ("Restart", "on-failure"), ("RestartPreventExitStatus", "2"), ("User", "aeordb")):
        assert settings.get(key) == value, key
    assert "MemoryMax" in settings and "LimitAS" in settings and "ReadWritePaths" in settings
    assert "MemoryDenyWriteExecute" not in settings   # wasmtime's JIT needs writable-then-executable code
    command = settings["ExecStart"].split()
    assert command[1].endswith("aeordb.py")
    parsed = aeordb.parse_settings(command[2:], environ={})
    assert str(parsed.data_dir) in settings["ReadWritePaths"].split()


# -- worker processes ------------------------------------------------------------

def worker_pids(server) -> set:
    """The pids of a ``--workers`` server's running worker processes (its children that are not
    zombies; /proc/<pid>/task/<pid>/children may miss some, says the kernel's documentation)."""
    pids = set()
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, parent = process_state(int(entry.name))
            if parent == server.pid and state != "Z":
                pids.add(int(entry.name))
    return pids


def process_state(pid: int) -> tuple:
    """(state letter, parent pid) of process ``pid``, from /proc; FileNotFoundError once it is gone."""
    state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return process_state(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def worker_of(headers: dict) -> str:
    """Which process answered: a request id is that process's prefix and a number."""
    return headers["x-request-id"].rsplit("-", 1)[0]


@contextlib.contextmanager
def workers_server(data_dir: Path, workers: int, *extra_args: str, **options):
    """server_process with ``--workers``, once every worker serves (each connection lands on any
    worker that listens, and a worker listens once it has built its app)."""
    with server_process(data_dir, "--workers", str(workers), *extra_args, **options) as (process, port):
        wait_until_serving(process, port, workers)
        yield process, port


def wait_until_serving(process, port: int, workers: int) -> None:
    """Until each of the server's ``workers`` worker processes has answered a request."""
    seen = set()

    def all_serving() -> bool:
        with contextlib.suppress(ConnectionResetError):   # a worker's socket closed while it waits to restart
            seen.add(worker_of(http_request(port, "GET", "/_health")[1]))
        pids = worker_pids(process)   # the request ids of a process start with 6 hex digits, then its pid
        return len(pids) == workers and {f"{pid:x}" for pid in pids} <= {prefix[6:] for prefix in seen}
    wait_for(all_serving, timeout=30, what=f"{workers} workers serving")


def invoke_answers(port: int, path: str, count: int) -> tuple:
    """``count`` invocations of ``path``, each on a new connection: (set of (status, body), workers that answered)."""
    answers, workers = set(), set()
    for _ in range(count):
        status, headers, body = http_request(port, "POST", f"/{path}/f/_invoke", b"")
        answers.add((status, body if status == 200 else json.loads(body)["error"].split(":")[0]))
        workers.add(worker_of(headers))
    return answers, workers


def test_workers_setting_takes_a_number_or_auto():
    assert aeordb.parse_settings(["--workers", "3"]).workers == 3
    assert aeordb.parse_settings(["--workers", "auto"]).workers == 0
    assert aeordb.parse_settings([], {"AEORDB_WORKERS": "AUTO"}).workers == 0
    assert aeordb.parse_settings([]).workers == 1
    for bad in ("-1", "many", "65"):
        with pytest.raises(SystemExit):
            aeordb.parse_settings(["--workers", bad])
    assert "auto or 0: one per usable core" in help_text()
    assert aeordb.usable_cores() == len(os.sched_getaffinity(0))


def test_each_worker_gets_its_own_socket_on_the_port_or_all_share_one(monkeypatch):
    group = aeordb.bind_listeners("127.0.0.1", 0, 3)
    try:
        assert len(group) == 3 and len({s.getsockname() for s in group}) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in group)
        for s in group:
            s.listen()
        # The port is taken: a second server fails like a single one would, not joins the group.
        with pytest.raises(aeordb.StartupError, match="in use"):
            aeordb.bind_listeners("127.0.0.1", group[0].getsockname()[1], 2)
    finally:
        for s in group:
            s.close()
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    shared = aeordb.bind_listeners("127.0.0.1", 0, 3)
    assert len(shared) == 1
    shared[0].close()


def test_every_worker_serves_each_change_on_the_very_next_request(tmp_path):
    with workers_server(tmp_path, 2) as (process, port):
        assert len(worker_pids(process)) == 2
        put = functools.partial(http_request, port, "PUT")
        assert put("/db/s/t/_deploy", answer_module(b"one"))[0] == 200
        answers, workers = invoke_answers(port, "db/s/t", 50)
        assert answers == {(200, b"one")} and len(workers) == 2
        assert put("/db/s/t/_deploy", answer_module(b"two"))[0] == 200
        answers, workers = invoke_answers(port, "db/s/t", 50)
        assert answers == {(200, b"two")} and len(workers) == 2
        listings = {http_request(port, "GET", "/db/_plugins")[2] for _ in range(20)}
        assert len(listings) == 1 and b'"db/s/t"' in listings.pop()
        assert http_request(port, "DELETE", "/db/s/t/f/_remove")[0] == 200
        answers, workers = invoke_answers(port, "db/s/t", 50)
        assert answers == {(404, "no plugin deployed at db/s/t")} and len(workers) == 2
        assert {http_request(port, "GET", "/db/_plugins")[2] for _ in range(20)} == {b"[]"}


def test_keys_statistics_logs_and_metrics_are_every_workers(tmp_path):
    with workers_server(tmp_path, 2) as (process, port):
        status, _, body = http_request(port, "POST", "/_keys", json.dumps({"name": "k", "scopes": ["invoke"], "databases": ["db"]}).encode())
        assert status == 201
        key = {"Authorization": f"Bearer {json.loads(body)['key']}"}
        assert http_request(port, "PUT", "/db/s/t/_deploy", wat(ECHO_WAT))[0] == 200
        assert http_request(port, "PUT", "/db/s/trap/_deploy", wat(TRAP_WAT))[0] == 200
        workers = set()
        for _ in range(30):
            status, headers, _ = http_request(port, "POST", "/db/s/t/f/_invoke", b"hi", headers=key)
            assert status == 200
            workers.add(worker_of(headers))
        for _ in range(6):
            status, headers, _ = http_request(port, "POST", "/db/s/trap/f/_invoke", b"")
            assert status == 500
            workers.add(worker_of(headers))
        assert len(workers) == 2

        def stats() -> tuple:
            _, headers, body = http_request(port, "GET", "/db/s/t/_stats")
            return json.loads(body)["invocations"], worker_of(headers)

        def agreed(count: int) -> bool:   # each worker publishes what it counted within ACTIVITY_SHARE_INTERVAL
            answers = {stats() for _ in range(10)}
            return {n for n, _ in answers} == {count} and len({worker for _, worker in answers}) == 2
        wait_for(lambda: agreed(30), what="every worker's invocations in every worker's statistics")
        answers = {stats() for _ in range(20)}
        assert {count for count, _ in answers} == {30} and len({worker for _, worker in answers}) == 2
        for _ in range(10):
            _, headers, body = http_request(port, "GET", "/db/s/trap/_logs")
            assert len(json.loads(body)["lines"]) == 6
            _, headers, body = http_request(port, "GET", "/_metrics")
            assert 'aeordb_invocations_total{db="db",schema="s",table="t",outcome="ok"} 30' in body.decode()
            assert 'aeordb_deploys_total 2' in body.decode()
        # Removed and deployed again, it is a new plugin: what was counted of the old one is gone everywhere.
        assert http_request(port, "DELETE", "/db/s/t/f/_remove")[0] == 200
        assert http_request(port, "PUT", "/db/s/t/_deploy", wat(ECHO_WAT))[0] == 200
        for _ in range(3):
            assert http_request(port, "POST", "/db/s/t/f/_invoke", b"hi", headers=key)[0] == 200
        wait_for(lambda: agreed(3), what="the new plugin's statistics in every worker")
        key_id = json.loads(http_request(port, "GET", "/_keys")[2])[0]["id"]
        assert http_request(port, "DELETE", f"/_keys/{key_id}")[0] == 200
        assert {http_request(port, "POST", "/db/s/t/f/_invoke", b"", headers=key)[0] for _ in range(20)} == {401}
    assert sorted(p.name for p in (tmp_path / "activity").iterdir()) == []


def test_a_killed_worker_is_replaced_and_no_acknowledged_change_is_lost(tmp_path):
    with workers_server(tmp_path, 2) as (process, port):
        assert http_request(port, "PUT", "/db/s/t/_deploy", answer_module(b"kept"))[0] == 200
        acknowledged, stop = {}, threading.Event()

        def writer(number: int) -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                path = f"/db/_files/w{number}/{n}.txt"
                with contextlib.suppress(OSError):   # a connection the killed worker held
                    if http_request(port, "PUT", path, f"{number}-{n}".encode())[0] == 201:
                        acknowledged[path] = f"{number}-{n}".encode()
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        for thread in writers:
            thread.start()
        try:
            wait_for(lambda: len(acknowledged) >= 30, what="acknowledged writes")
            before = worker_pids(process)
            victim = min(before)
            os.kill(victim, signal.SIGKILL)

            def one_replaced() -> bool:
                pids = worker_pids(process)   # one look: the victim may die between two
                return len(pids) == 2 and victim not in pids
            wait_for(one_replaced, what="a replacement worker")
            count = len(acknowledged)
            wait_for(lambda: len(acknowledged) >= count + 30, what="writes after the replacement")
        finally:
            stop.set()
            for thread in writers:
                thread.join()
        replaced = worker_pids(process)
        for path, data in acknowledged.items():
            assert http_request(port, "GET", path)[2] == data, path
        answers, workers = invoke_answers(port, "db/s/t", 30)
    log = process.stdout.read().decode()
    assert len(replaced - before) == 1, (before, replaced, log)
    assert answers == {(200, b"kept")} and len(workers) == 2, (answers, workers, log)
    assert f"(pid {victim}) was killed by SIGKILL" in log and "starting another" in log
    assert process.returncode == 0


def test_workers_stop_when_their_parent_is_killed(tmp_path):
    with workers_server(tmp_path, 2) as (process, port):
        workers = worker_pids(process)
        process.kill()
        process.wait()
        wait_for(lambda: not any(running(pid) for pid in workers), what="the workers' exit")
        # Nothing holds the port: a new server starts on it.
        with contextlib.closing(aeordb.bind_listener("127.0.0.1", port)) as listener:
            listener.listen()


# aeordb.py whose fork fails once (its third call), and whose app cannot be built while a file exists.
FAILING_STARTS = ("-c", """
import os, sys
sys.argv[0] = "aeordb.py"
import aeordb
forks, real_fork, real_create_app = [], os.fork, aeordb.create_app
def fork():
    forks.append(1)
    if len(forks) == 3:
        raise BlockingIOError(11, "Resource temporarily unavailable")
    return real_fork()
def create_app(settings):
    if os.path.exists(os.environ["BROKEN_MARK"]):
        raise aeordb.StartupError("broken on purpose")
    return real_create_app(settings)
os.fork, aeordb.create_app = fork, create_app
sys.exit(aeordb.main(sys.argv[1:]))
""")


class OutputLines:
    """The lines a process writes to its stdout, collected by a thread as they come."""

    def __init__(self, process):
        self.lines: list = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, b"")),
                                       daemon=True)
        self.thread.start()

    def count(self, text: str) -> int:
        return sum(text in line.decode() for line in list(self.lines))


def test_failed_restarts_cost_only_the_worker_being_restarted(tmp_path):
    broken = tmp_path / "broken"
    with workers_server(tmp_path / "data", 2, python=FAILING_STARTS, env={"BROKEN_MARK": str(broken)}) as (
            process, port):
        output = OutputLines(process)
        assert http_request(port, "PUT", "/db/s/t/_deploy", answer_module(b"up"))[0] == 200
        # The replacement's fork fails (a process limit): the other worker serves, and a later fork succeeds.
        victim = min(worker_pids(process))
        os.kill(victim, signal.SIGKILL)
        wait_until_serving(process, port, 2)
        assert victim not in worker_pids(process)
        assert output.count("could not be started (Resource temporarily unavailable); starting another in") == 1
        # A replacement that cannot start is tried again, later and later, and meanwhile its
        # socket is closed: no new connection waits for it (those it held when it closed are reset).
        broken.touch()
        os.kill(min(worker_pids(process)), signal.SIGKILL)
        wait_for(lambda: output.count("exited with status 2") >= 2, what="two failed replacements")

        def invoked() -> tuple:
            for _ in range(3):
                with contextlib.suppress(ConnectionResetError):
                    return http_request(port, "POST", "/db/s/t/f/_invoke", b"", timeout=5)[:3:2]
            return "reset three times"
        for _ in range(30):
            assert invoked() == (200, b"up")
        broken.unlink()
        wait_until_serving(process, port, 2)
        assert process.poll() is None
    output.thread.join(timeout=10)
    assert output.count("cannot start: broken on purpose") >= 2


def test_a_looping_plugin_is_stopped_at_its_limit_in_every_worker(tmp_path):
    with workers_server(tmp_path, 2, "--timeout", "0.3") as (process, port):
        assert http_request(port, "PUT", "/db/s/loop/_deploy", wat(LOOP_WAT))[0] == 200
        workers, statuses = set(), set()
        for _ in range(30):   # until both workers answered (each connection lands on either)
            if len(workers) == 2:
                break
            started = time.monotonic()
            status, headers, body = http_request(port, "POST", "/db/s/loop/f/_invoke", b"")
            assert time.monotonic() - started < 5, "the time limit did not stop the plugin"
            statuses.add((status, "time limit" in json.loads(body)["error"]))
            workers.add(worker_of(headers))
        assert statuses == {(500, True)} and len(workers) == 2


def test_several_workers_on_a_fresh_data_dir_agree_on_one_token(tmp_path):
    data_dir = tmp_path / "fresh"
    with workers_server(data_dir, 3, token=False) as (process, port):
        token = (data_dir / "token").read_text().strip()
        workers = set()
        for _ in range(40):
            status, headers, _ = http_request(port, "GET", "/db/_plugins",
                                              headers={"Authorization": f"Bearer {token}"})
            assert status == 200
            workers.add(worker_of(headers))
        assert len(workers) == 3
    out = process.stdout.read().decode()
    assert out.count(f"new token: {token}") == 1 and "workers:   3 processes (a socket each)" in out


def test_concurrent_deploys_through_different_workers_leave_one_consistent_plugin(tmp_path):
    with workers_server(tmp_path, 2) as (process, port):
        modules = {f"v{n}".encode(): answer_module(f"v{n}".encode()) for n in range(12)}
        barrier = threading.Barrier(len(modules))
        results = {}

        def deploy_one(answer: bytes) -> None:
            barrier.wait()
            status, headers, body = http_request(port, "PUT", "/db/s/t/_deploy", modules[answer])
            results[answer] = (status, worker_of(headers), json.loads(body))
        threads = [threading.Thread(target=deploy_one, args=(answer,)) for answer in modules]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {status for status, _, _ in results.values()} == {200}
        assert len({worker for _, worker, _ in results.values()}) == 2
        answers, workers = invoke_answers(port, "db/s/t", 40)
        assert len(answers) == 1 and len(workers) == 2
        (status, winner), = answers
        listed = {http_request(port, "GET", "/db/_plugins")[2] for _ in range(10)}
        assert len(listed) == 1
        meta, = json.loads(listed.pop())
        assert meta["sha256"] == hashlib.sha256(modules[winner]).hexdigest()
        folder = tmp_path / "plugins" / "db" / "s" / "t"
        assert sorted(p.name for p in folder.iterdir()) == ["module-" + meta["sha256"] + ".wasm", "plugin.json"]


def test_workers_stop_together_on_sigterm_and_fall_back_to_one_shared_socket(tmp_path):
    without_reuse_port = ("-c", "import socket, sys; del socket.SO_REUSEPORT; sys.argv[0] = 'aeordb.py'; "
                                "import aeordb; sys.exit(aeordb.main(sys.argv[1:]))")
    with server_process(tmp_path, "--workers", "2", python=without_reuse_port) as (process, port):
        workers = worker_pids(process)
        assert len(workers) == 2
        assert http_request(port, "PUT", "/db/s/t/_deploy", answer_module(b"shared"))[0] == 200
        answers, _ = invoke_answers(port, "db/s/t", 10)
        assert answers == {(200, b"shared")}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert not any(running(pid) for pid in workers)
    assert "workers:   2 processes (one shared socket)" in process.stdout.read().decode()


# -- a plugin or a client costs only itself -------------------------------------

def slow_query_spec(client, db: str, documents: int = 600) -> dict:
    """Fills /docs of ``db`` with 4 KiB JSON documents; answers a query that scans them for seconds."""
    files = client.app.config["aeordb.files"]
    words = " ".join(f"word{n}" for n in range(500))[:4000]
    with files.batch():
        for n in range(documents):
            files.write(db, f"/docs/{n}.json", json.dumps({"n": n, "text": words}).encode(), "application/json")
    # About 4 s of SQLite work on the development machine, in 43 KB of JSON.
    return {"path": "/docs", "where": {"or": [{"field": "text", "op": "contains", "value": f"z{n}"}
                                              for n in range(900)]}}


def test_a_host_query_stops_at_the_invocations_time_limit_and_rolls_back(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.5)
    spec = slow_query_spec(client, "slow")
    steps = [write_step("/written-first.txt", b"rolled back"), ("aeordb_query", json_args(spec))]
    started = time.monotonic()
    answer = run_sequence(client, "slow", steps, status=500)
    elapsed = time.monotonic() - started
    assert "time limit of 0.5 s exceeded" in error_of(answer)
    assert elapsed < 3.0, elapsed   # the query alone runs for many seconds
    assert client.get("/slow/_files/written-first.txt", headers=AUTH, expect_errors=True).status_int == 404
    # The thread's next statements have no deadline left over.
    assert client.get("/slow/_files/docs/1.json", headers=AUTH).json["n"] == 1


def test_an_http_query_stops_at_its_time_limit(tmp_path):
    client, _ = make_app(tmp_path, query_timeout=0.3)
    spec = slow_query_spec(client, "q")
    started = time.monotonic()
    answer = client.post("/q/_query", json.dumps(spec), headers=AUTH, status=400)
    assert "time limit of 0.3 s" in error_of(answer) and time.monotonic() - started < 3.0
    aggregate = {**spec, "aggregate": {"count": True}}
    answer = client.post("/q/_query", json.dumps(aggregate), headers=AUTH, status=400)
    assert "time limit of 0.3 s" in error_of(answer)
    assert client.post("/q/_query", json.dumps({"path": "/docs", "limit": 1}), headers=AUTH).json["has_more"]


@pytest.mark.parametrize("spec, bound", [
    ({"order_by": [{"field": f"f{n}"} for n in range(5000)]}, "order_by has 5000 fields; at most 32"),
    ({"aggregate": {"sum": [f"f{n}" for n in range(3000)]}}, "computes 3000 sum/avg/min/max fields; at most 256"),
    ({"aggregate": {"count": True, "group_by": [f"f{n}" for n in range(1200)]}}, "group_by has 1200 fields; at most 32"),
], ids=["order_by", "aggregate", "group_by"])
def test_oversized_query_inputs_are_400_naming_the_bound(populated, spec, bound):
    assert bound in error_of(post_query(populated, {"path": "/users", **spec}, status=400))


def test_query_inputs_at_their_bounds_are_served(populated):
    order = [{"field": f"f{n}"} for n in range(31)] + [{"field": "age", "direction": "desc"}]
    assert post_query(populated, {"path": "/users", "order_by": order}).json["items"]
    aggregate = {"sum": [f"f{n}" for n in range(255)] + ["age"], "group_by": [f"g{n}" for n in range(32)]}
    answer = post_query(populated, {"path": "/users", "aggregate": aggregate}).json
    assert answer["groups"] and answer["sum"]["age"] > 0


def test_plugin_logs_are_capped_in_lines_and_bytes(client, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb.plugin")
    line = b"x" * 6000   # three of these pass the 16 KiB budget
    steps = [("log_message", b"info", line)] * 3 + [("log_message", b"info", b"after the budget")] * 2
    run_sequence(client, "lg", steps + [("aeordb_context", b"{}")])
    lines = [r.getMessage() for r in caplog.records if r.name == "aeordb.plugin"]
    assert len(lines) == 4, [text[:80] for text in lines]
    prefix = lines[0].split("] ", 1)[0] + "] "
    assert re.fullmatch(r"\[lg/s/seq request=\S+\] ", prefix), prefix
    assert lines[0] == prefix + "x" * 6000 and lines[1] == lines[0]
    assert lines[2] == prefix + "x" * (16 * 1024 - 12000) + " [truncated]"
    assert "log limit reached" in lines[3] and "16 KiB" in lines[3]
    assert sum(len(text) for text in lines) < 17 * 1024
    caplog.clear()
    run_sequence(client, "lg", [("log_message", b"warn", b"n")] * 150 + [("aeordb_context", b"{}")], table="many")
    lines = [r.getMessage() for r in caplog.records if r.name == "aeordb.plugin"]
    assert len(lines) == 101 and "100 lines" in lines[-1]


def test_a_database_quota_refuses_puts_and_rolls_back_plugin_writes(tmp_path):
    client, _ = make_app(tmp_path, max_db_size=2000)   # a file counts its bytes, its path and 256
    put_file(client, "small", "/a.bin", b"a" * 600, status=201)                    # 600 + 6 + 256 = 862
    answer = put_file(client, "small", "/b.bin", b"b" * 1000, status=507)          # + 1262: over
    assert "quota of 2000 bytes" in error_of(answer) and "database small" in error_of(answer)
    put_file(client, "small", "/a.bin", b"a" * 900, status=200)   # a replacement counts its own size once
    put_file(client, "other", "/c.bin", b"c" * 900, status=201)   # each database has its own quota
    steps = [write_step("/d.bin", b"d" * 50), write_step("/e.bin", b"e" * 600), ("aeordb_context", b"{}")]
    answer = run_sequence(client, "small", steps, status=507)
    assert "quota of 2000 bytes" in error_of(answer)
    listing = client.get("/small/_files/", headers=AUTH).json["entries"]
    assert [entry["name"] for entry in listing] == ["a.bin"]   # d.bin rolled back with the call
    client.delete("/small/_files/a.bin", headers=AUTH)
    put_file(client, "small", "/b.bin", b"b" * 1000, status=201)   # deleting gave the room back
    assert client.app.config["aeordb.files"].stored_bytes() == {"other": 1162, "small": 1262}


def test_empty_files_count_against_the_quota(tmp_path):
    client, _ = make_app(tmp_path, max_db_size=3000)
    statuses = [put_file(client, "db", f"/{n:03d}", b"", status="*").status_int for n in range(20)]
    assert statuses[:11] == [201] * 11 and set(statuses[11:]) == {507}   # 260 bytes each


def test_database_sizes_start_from_an_older_database(tmp_path):
    client, _ = make_app(tmp_path)
    put_file(client, "db", "/a.bin", b"a" * 300)
    put_file(client, "db", "/b.bin", b"b" * 200)
    files = client.app.config["aeordb.files"]
    with files._writing() as conn:   # as an older version left it: no sizes, schema version 0
        conn.execute("DELETE FROM db_sizes")
        conn.execute("PRAGMA user_version = 0")
    again, _ = make_app(tmp_path, max_db_size=1100)
    assert again.app.config["aeordb.files"].stored_bytes() == {"db": 1024}
    put_file(again, "db", "/c.bin", b"c" * 101, status=507)


def test_zero_means_no_quota():
    assert aeordb.parse_settings(["--max-db-size", "0"], environ={}).max_db_size == 0
    with pytest.raises(SystemExit):
        aeordb.parse_settings(["--max-file-size", "0"], environ={})


def test_a_held_write_lock_never_takes_the_readers_threads(tmp_path):
    client, app = make_app(tmp_path, timeout=2.0)
    files = app.config["aeordb.files"]
    deploy(client, "db/s/holder", sequence_module([write_step("/held.txt", b"x")], tail="loop"))
    deploy(client, "db/s/reader", host_call_module("aeordb_read_file", b'{"path": "/r.txt"}'))
    put_file(client, "db", "/r.txt", b"read me")
    with server_thread(app, threads=8) as port:
        outcome = {}
        holder = threading.Thread(target=lambda: outcome.update(
            holder=http_request(port, "POST", "/db/s/holder/f/_invoke", b"")))
        holder.start()
        wait_for(files._write_lock.locked, what="the plugin holding the write lock")
        writers, written = [], []
        for n in range(16):
            writer = threading.Thread(target=lambda n=n: written.append(
                http_request(port, "PUT", f"/db/_files/w{n}.txt", b"w")))
            writer.start()
            writers.append(writer)
        wait_for(lambda: files._lock_waiters == files.max_lock_waiters, what="writers waiting")
        slowest = 0.0
        for _ in range(10):
            for method, path, body in (("GET", "/_health", None), ("GET", "/db/_files/r.txt", None),
                                       ("POST", "/db/s/reader/f/_invoke", b"")):
                started = time.monotonic()
                status, _, answer = http_request(port, method, path, body)
                slowest = max(slowest, time.monotonic() - started)
                assert status == 200, (path, answer)
        assert holder.is_alive(), "the lock was not held while the readers ran"
        assert slowest < 1.0, slowest
        holder.join(30)
        for writer in writers:
            writer.join(30)
    status, _, body = outcome["holder"]
    assert status == 500 and "time limit" in json.loads(body)["error"]
    statuses = sorted(status for status, _, _ in written)
    assert set(statuses) <= {201, 503} and statuses.count(201) >= files.max_lock_waiters, statuses
    assert 503 in statuses
    for status, headers, body in written:
        if status == 503:
            assert "write lock" in json.loads(body)["error"] and headers["retry-after"] == "1"
    assert client.get("/db/_files/held.txt", headers=AUTH, expect_errors=True).status_int == 404



def test_a_request_without_the_token_is_refused_before_its_body(tmp_path):
    with guarded_server(tmp_path) as (client, port):
        for extra in (b"", b"Expect: 100-continue\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                started = time.monotonic()
                sock.sendall(b"PUT /db/_files/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n"
                             + extra + b"\r\n")   # announces 64 MiB and sends none of it
                status, headers, body = read_response(sock)
                assert status == 401 and time.monotonic() - started < 2.0
                assert headers["www-authenticate"].startswith("Bearer") and headers["connection"] == "close"
                assert json.loads(body) == {"error": "missing or invalid bearer token"}
                assert sock.recv(10) == b""   # closed: the body is never read
        # With the token the same route takes its body; the public route needs none.
        assert http_request(port, "PUT", "/db/_files/big.bin", b"x" * 100_000)[0] == 201
        assert http_request(port, "GET", "/_health", headers={"Authorization": "nope"})[0] == 200


WAITRESS_ERRORS = {
    "431 headers too large": (b"GET /_health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
    "413 over the outer cap": (b"PUT /db/_files/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                               + b"\r\nContent-Length: 999999999999\r\n\r\n", 413),
    "400 bad request line": (b"GARBAGE\r\n\r\n", 400),
    "400 bad content-length": (b"PUT /db/_files/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                               + b"\r\nContent-Length: ten\r\n\r\n", 400),
    "501 unknown transfer encoding": (b"POST /db/_query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                      + TOKEN.encode() + b"\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
}


def test_errors_waitress_writes_are_json_too(tmp_path):
    with guarded_server(tmp_path) as (client, port):
        for case, (raw, expected) in WAITRESS_ERRORS.items():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(raw)
                status, headers, body = read_response(sock)
            assert status == expected, (case, status, body)
            assert headers["content-type"] == "application/json", case
            assert json.loads(body)["error"], case


def test_a_slow_request_head_is_dropped_at_its_deadline(tmp_path):
    with guarded_server(tmp_path, header_timeout=1.0) as (client, port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        started, dropped = time.monotonic(), False
        sock.sendall(b"GET /_health HTTP/1.1\r\n")
        try:
            for _ in range(60):   # one header byte every 0.1 s: never a whole head
                sock.sendall(b"X")
                assert http_request(port, "GET", "/_health", timeout=2)[0] == 200   # others are served
                time.sleep(0.1)   # the slow client's pace, not a wait for the server
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
        if not dropped:
            dropped = sock.recv(10) == b""
        sock.close()
        elapsed = time.monotonic() - started
        assert dropped and 1.0 <= elapsed < 4.0, (dropped, elapsed)


def test_the_open_file_limit_is_checked_against_the_connection_limit(monkeypatch, caplog):
    import logging
    import resource
    caplog.set_level(logging.WARNING, logger="aeordb")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert aeordb.fit_open_files(100) == 100
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 100 + aeordb.FILES_BESIDE_CONNECTIONS
    monkeypatch.setattr(resource, "getrlimit", lambda which: (164, 164))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: None)
    assert aeordb.fit_open_files(1000) == 100 and "allows 100 connections, not 1000" in caplog.text


def test_deploys_compile_one_module_per_core_at_a_time(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.3)   # a deploy waits up to the time limit for a core
    slots = aeordb.Wasm._compile_slots
    taken = 0
    while slots.acquire(blocking=False):
        taken += 1
    try:
        assert taken == (os.cpu_count() or 1)
        answer = deploy(client, "db/s/t", wat(ECHO_WAT), status=503)
        assert "compiled, one per core" in error_of(answer) and answer.headers["Retry-After"] == "5"
        assert client.get("/db/_plugins", headers=AUTH).json == []
    finally:
        for _ in range(taken):
            slots.release()
    deploy(client, "db/s/t", wat(ECHO_WAT))
    assert aeordb.Settings().max_module_size == 16 * aeordb.MiB


def test_large_bodies_in_flight_are_bounded_by_the_memory_budget(tmp_path):
    client, app = make_app(tmp_path, memory_budget=2 * aeordb.MiB, timeout=1.0, max_request_size=4 * aeordb.MiB)
    budget = app.config["aeordb.budget"]
    deploy(client, "db/s/loop", wat(LOOP_WAT))
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    big = b"x" * (1536 * 1024)
    with server_thread(app) as port:
        outcome = {}
        spinning = threading.Thread(target=lambda: outcome.update(
            first=http_request(port, "POST", "/db/s/loop/f/_invoke", big)))
        spinning.start()
        wait_for(lambda: budget.used == len(big), what="the first large body counted")
        status, headers, body = http_request(port, "POST", "/db/s/echo/f/_invoke", big)
        assert status == 503 and "memory budget of 2097152 bytes" in json.loads(body)["error"]
        assert headers["retry-after"] == "1"
        assert http_request(port, "POST", "/db/s/echo/f/_invoke", b"small")[0] == 200   # small ones pass
        spinning.join(20)
        assert outcome["first"][0] == 500 and budget.used == 0   # given back, failed or not
        status, _, body = http_request(port, "POST", "/db/s/echo/f/_invoke", big)
        assert status == 200 and bytes(json.loads(body)["arguments"]) == big
    assert budget.used == 0


# -- WASI, reactors, AssemblyScript and the raw entry point ----------------------

WASI = "wasi_snapshot_preview1"


def wasi_module(body: str, imports: str = "", data: str = "", extra: str = "") -> bytes:
    """A module importing ``imports`` whose handle runs ``body`` (ending with an i64 answer).

    Memory layout: data segments from 1024, scratch at 4096, answers built at 8192.
    """
    return wat(f"""
(module
  {imports}
  (memory (export "memory") 2)
  {data}
  {extra}
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    {body}))
""")


FD_WRITE = f'(import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))'


def test_wasi_output_goes_to_the_plugin_log_not_the_answer(client, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb.plugin")
    module = wasi_module(imports=FD_WRITE, data='''
      (data (i32.const 1024) "hello from stdout\\nsecond")
      (data (i32.const 1100) "oops on stderr\\n")
      (data (i32.const 2048) "\\00\\04\\00\\00\\18\\00\\00\\00")   ;; iovec: 1024, 24
      (data (i32.const 2056) "\\4c\\04\\00\\00\\0f\\00\\00\\00")   ;; iovec: 1100, 15''', body='''
      (drop (call $fd_write (i32.const 1) (i32.const 2048) (i32.const 1) (i32.const 3000)))
      (drop (call $fd_write (i32.const 2) (i32.const 2056) (i32.const 1) (i32.const 3000)))
      (i32.store (i32.const 8192) (i32.load (i32.const 3000)))   ;; bytes written, as the answer
      (i64.or (i64.shl (i64.const 8192) (i64.const 32)) (i64.const 4))''')
    deploy(client, "db/s/w", module)
    answer = invoke(client, "db/s/w/f")
    assert answer.body == (15).to_bytes(4, "little")   # its own answer, nothing of the output
    lines = [r.getMessage() for r in caplog.records if r.name == "aeordb.plugin"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("[db/s/w") and lines[0].endswith("stdout: hello from stdout")
    assert lines[1].endswith("stderr: oops on stderr")
    assert lines[2].endswith("stdout: second")   # what had no newline, at the end of the call
    assert all("request=" in line for line in lines)


def test_wasi_reaches_nothing_of_the_host(client):
    imports = "\n".join([
        f'(import "{WASI}" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))',
        f'(import "{WASI}" "environ_sizes_get" (func $environ_sizes (param i32 i32) (result i32)))',
        f'(import "{WASI}" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))',
        f'(import "{WASI}" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))',
        f'(import "{WASI}" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))',
        f'(import "{WASI}" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))',
        f'(import "{WASI}" "random_get" (func $random (param i32 i32) (result i32)))'])
    module = wasi_module(imports=imports, data='(data (i32.const 1024) "/etc/passwd")'
                         ' (data (i32.const 2048) "\\00\\0c\\00\\00\\10\\00\\00\\00")', body='''
      ;; answer 8 little-endian u32: path_open errno, environ count, environ bytes, args count,
      ;; args bytes, stdin bytes read, preopen errno, clock errno; then 8 bytes of time, 16 random
      (i32.store (i32.const 8192) (call $path_open (i32.const 3) (i32.const 0) (i32.const 1024) (i32.const 11)
                                                   (i32.const 0) (i64.const 2) (i64.const 2) (i32.const 0) (i32.const 4000)))
      (drop (call $environ_sizes (i32.const 8196) (i32.const 8200)))
      (drop (call $args_sizes (i32.const 8204) (i32.const 8208)))
      (drop (call $fd_read (i32.const 0) (i32.const 2048) (i32.const 1) (i32.const 8212)))
      (i32.store (i32.const 8216) (call $prestat (i32.const 3) (i32.const 4000)))
      (i32.store (i32.const 8220) (call $clock (i32.const 0) (i64.const 1) (i32.const 8224)))
      (drop (call $random (i32.const 8232) (i32.const 16)))
      (i64.or (i64.shl (i64.const 8192) (i64.const 32)) (i64.const 56))''')
    deploy(client, "db/s/sealed", module)
    answer = invoke(client, "db/s/sealed/f").body
    path_open, env_count, env_bytes, args_count, args_bytes, stdin_read, prestat, clock = \
        [int.from_bytes(answer[i:i + 4], "little") for i in range(0, 32, 4)]
    assert path_open != 0 and prestat != 0   # no directory to open anything in
    assert (env_count, env_bytes, args_count, args_bytes, stdin_read) == (0, 0, 0, 0, 0)
    now_ns = int.from_bytes(answer[32:40], "little")
    assert clock == 0 and abs(now_ns / 1e9 - time.time()) < 60
    assert answer[40:56] != bytes(16)   # random_get works
    first = answer[40:56]
    assert invoke(client, "db/s/sealed/f").body[40:56] != first


def test_wasi_proc_exit_fails_the_call_naming_the_code(client):
    module = wasi_module(imports=f'(import "{WASI}" "proc_exit" (func $exit (param i32)))',
                         body="(call $exit (i32.const 3)) (i64.const 0)")
    deploy(client, "db/s/exit", module)
    assert "exited with code 3" in error_of(invoke(client, "db/s/exit/f", status=500))


POLL_ONEOFF = f'(import "{WASI}" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))'


def sleeping_module(nanoseconds: int) -> bytes:
    """Sleeps ``nanoseconds`` with one relative clock subscription of poll_oneoff; answers 'woke'."""
    subscription = (b"\x2a" + bytes(7) + bytes(8) + (1).to_bytes(4, "little") + bytes(4)
                    + nanoseconds.to_bytes(8, "little") + bytes(8) + bytes(8))
    return wasi_module(imports=POLL_ONEOFF, data=f'(data (i32.const 1024) "{wat_string(subscription)}")'
                       ' (data (i32.const 8192) "woke")', body='''
      (drop (call $poll (i32.const 1024) (i32.const 2048) (i32.const 1) (i32.const 3000)))
      (if (i32.ne (i32.load (i32.const 3000)) (i32.const 1)) (then unreachable))   ;; one event
      (if (i64.ne (i64.load (i32.const 2048)) (i64.const 42)) (then unreachable))   ;; its userdata
      (i64.or (i64.shl (i64.const 8192) (i64.const 32)) (i64.const 4))''')


def test_wasi_sleep_works_and_stops_at_the_time_limit(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.5)
    deploy(client, "db/s/nap", sleeping_module(20_000_000))   # 20 ms
    started = time.monotonic()
    assert invoke(client, "db/s/nap/f").body == b"woke" and time.monotonic() - started >= 0.02
    deploy(client, "db/s/coma", sleeping_module(60 * 10**9))   # a minute
    started = time.monotonic()
    assert "time limit of 0.5 s exceeded" in error_of(invoke(client, "db/s/coma/f", status=500))
    assert 0.45 <= time.monotonic() - started < 2.0


def test_wasi_reactors_are_initialized_before_alloc_and_handle(client):
    module = wat("""
(module
  (memory (export "memory") 2)
  (global $ready (mut i32) (i32.const 0))
  (global $heap (mut i32) (i32.const 65536))
  (func (export "_initialize") (global.set $ready (i32.const 1)))
  (func (export "alloc") (param $n i32) (result i32) (local $p i32)
    (if (i32.eqz (global.get $ready)) (then unreachable))
    (local.set $p (global.get $heap)) (global.set $heap (i32.add (local.get $p) (local.get $n))) (local.get $p))
  (func (export "handle") (param i32 i32) (result i64)
    (if (i32.eqz (global.get $ready)) (then unreachable))
    (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $ready)))
    (global.set $ready (i32.add (global.get $ready) (i32.const 1)))
    (i64.const 1)))
""")
    deploy(client, "db/s/reactor", module)
    for _ in range(3):   # a fresh instance, initialized once, every call
        assert invoke(client, "db/s/reactor/f", b"x").body == b"1"


def test_a_wasi_command_is_refused_saying_how_to_build_a_reactor(client):
    module = wat('(module (memory (export "memory") 1) (func (export "_start")))')
    message = error_of(deploy(client, "db/s/cmd", module, status=400))
    assert "WASI command" in message and "-buildmode=c-shared" in message
    assert "-mexec-model=reactor" in message and "cdylib" in message


def test_assemblyscript_abort_fails_the_call_with_its_message(client):
    def as_string(text: str) -> bytes:
        encoded = text.encode("utf-16-le")
        return len(encoded).to_bytes(4, "little") + encoded
    module = wasi_module(imports='(import "env" "abort" (func $abort (param i32 i32 i32 i32)))',
                         data=f'(data (i32.const 1020) "{wat_string(as_string("Index out of range ✓"))}")'
                              f' (data (i32.const 2044) "{wat_string(as_string("~lib/array.ts"))}")',
                         body="(call $abort (i32.const 1024) (i32.const 2048) (i32.const 106) (i32.const 42))"
                              " unreachable")
    deploy(client, "db/s/as", module)
    message = error_of(invoke(client, "db/s/as/f", status=500))
    assert "aborted: Index out of range ✓ at ~lib/array.ts:106:42" in message
    wild = wasi_module(imports='(import "env" "abort" (func $abort (param i32 i32 i32 i32)))',
                       body="(call $abort (i32.const -8) (i32.const 2147483647) (i32.const 1) (i32.const 2))"
                            " unreachable")
    deploy(client, "db/s/wild", wild)
    assert "aborted: ? at ?:1:2" in error_of(invoke(client, "db/s/wild/f", status=500))


@pytest.mark.parametrize("imports, expected, found", [
    (f'(import "{WASI}" "fd_write" (func (param i32) (result i32)))',
     "wasi_snapshot_preview1.fd_write must be (i32, i32, i32, i32) -> i32", "found func (i32) -> i32"),
    ('(import "aeordb" "aeordb_query" (func (param i32 i32) (result i32)))',
     "aeordb.aeordb_query must be (i32, i32) -> i64", "found func (i32, i32) -> i32"),
    ('(import "env" "abort" (func (param i32 i32)))',
     "env.abort must be (i32, i32, i32, i32) -> ()", "found func (i32, i32) -> ()"),
], ids=["wasi", "aeordb", "abort"])
def test_a_known_import_with_the_wrong_signature_is_named(client, imports, expected, found):
    message = error_of(deploy(client, "db/s/sig", wasi_module(imports=imports, body="(i64.const 0)"), status=400))
    assert "wrong signature" in message and expected in message and found in message


RAW_ECHO_WAT = f"""
(module
  (import "aeordb" "aeordb_set_response" (func $set_response (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (data (i32.const 1024) "{{\\"status_code\\": 201, \\"content_type\\": \\"text/plain\\", \\"headers\\": {{\\"x-raw\\": \\"yes\\", \\"set-cookie\\": \\"no\\"}}}}")
  (func (export "handle_raw") (param $ptr i32) (param $len i32) (result i64)
    ;; a body starting with 's' sets the response first
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0)) (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 115)))
      (then (drop (call $set_response (i32.const 1024) (i32.const 99)))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len)))))
"""


def test_handle_raw_takes_and_answers_raw_bytes(client):
    deploy(client, "db/s/raw", wat(RAW_ECHO_WAT))
    body = bytes(range(256)) * 4096   # 1 MiB, every byte value
    answer = invoke(client, "db/s/raw/f", body)
    assert answer.body == body and answer.status_int == 200 and answer.content_type == "application/octet-stream"
    answer = invoke(client, "db/s/raw/f", b"set it", status=201)
    assert answer.body == b"set it" and answer.content_type == "text/plain"
    assert answer.headers["x-raw"] == "yes" and "set-cookie" not in answer.headers
    assert invoke(client, "db/s/raw/f", b"").body == b""


def test_handle_raw_keeps_every_limit_and_rollback(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.5, max_response_size=1000)
    write = write_step("/raw.txt", b"rolled back")
    module = wat(f"""
(module
  (import "aeordb" "aeordb_write_file" (func $write (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  {ALLOC_WAT}
  (data (i32.const 1024) "{wat_string(write[1])}")
  (func (export "handle_raw") (param $ptr i32) (param $len i32) (result i64)
    (drop (call $write (i32.const 1024) (i32.const {len(write[1])})))
    (if (i32.eq (local.get $len) (i32.const 4)) (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $len) (i32.const 5)) (then unreachable))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len)))))
""")
    deploy(client, "db/s/raw", module)
    assert "time limit" in error_of(invoke(client, "db/s/raw/f", b"loop", status=500))
    assert "unreachable" in error_of(invoke(client, "db/s/raw/f", b"traps", status=500))
    assert "response limit" in error_of(invoke(client, "db/s/raw/f", b"x" * 2000, status=500))
    assert client.get("/db/_files/raw.txt", headers=AUTH, expect_errors=True).status_int == 404
    assert invoke(client, "db/s/raw/f", b"kept!!").body == b"kept!!"
    assert client.get("/db/_files/raw.txt", headers=AUTH).body == b"rolled back"


def test_set_response_is_checked_like_an_envelope(client):
    for args, fragment in ((b'{"status_code": 700}', "outside 200-599"), (b'{"status_code": "ok"}', "takes"),
                           (b'{"status_code": 200, "headers": {"x-a": 5}}', "takes")):
        answer = json.loads(invoke(client, deploy(client, "db/s/set",
                                                  host_call_module("aeordb_set_response", args)) and "db/s/set/f").body)
        assert fragment in answer["error"], answer


def test_a_module_exporting_both_entry_points_is_refused(client):
    module = wat('(module (memory (export "memory") 1)'
                 ' (func $h (param i32 i32) (result i64) (i64.const 0))'
                 ' (export "handle" (func $h)) (export "handle_raw" (func $h)))')
    assert "ambiguous" in error_of(deploy(client, "db/s/both", module, status=400))


# Behaviours that hold and must keep holding ###################################

# -- HTTP parsing on aeordb's own Server ---------------------------------------

def raw_exchange(port: int, raw: bytes, count: int = 1) -> list:
    """Send ``raw`` on one new connection; answer the first ``count`` responses."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return read_responses(sock, count)


def assert_json_error(answer: tuple, status: int) -> str:
    got, headers, body = answer
    assert got == status, (got, body[:300])
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


def test_many_and_huge_headers_are_served_or_a_json_431(tmp_path):
    auth = f"Authorization: {AUTH['Authorization']}\r\n".encode()
    with guarded_server(tmp_path) as (client, port):
        # 1,000 small headers, the token last among them: parsed whole, the request served.
        many = b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(1000))
        [answer] = raw_exchange(port, b"PUT /db/_files/many HTTP/1.1\r\nHost: x\r\n" + many + auth
                                + b"Content-Length: 4\r\n\r\nmany")
        assert answer[0] == 201, answer
        # 10,000 headers (about 170 KB, under waitress's 256 KiB head cap): served too.
        lots = b"".join(b"X-Header-%05d: v\r\n" % i for i in range(10_000))
        [answer] = raw_exchange(port, b"GET /db/_files/many HTTP/1.1\r\nHost: x\r\n" + lots + auth + b"\r\n")
        assert answer[0] == 200 and answer[2] == b"many", answer[:1]
        # Over the head cap, by many headers or by one huge one: a JSON 431, and the body is never stored.
        for head in (b"".join(b"X-Header-%05d: %s\r\n" % (i, b"v" * 20) for i in range(20_000)),
                     b"X-Huge: " + b"h" * 400_000 + b"\r\n"):
            [answer] = raw_exchange(port, b"PUT /db/_files/big HTTP/1.1\r\nHost: x\r\n" + auth + head
                                    + b"Content-Length: 3\r\n\r\nbig")
            assert_json_error(answer, 431)
        assert http_request(port, "GET", "/db/_files/big")[0] == 404
        assert http_request(port, "GET", "/_health")[0] == 200


def test_chunked_bodies_are_capped_with_json_413s(tmp_path):
    limits = {"max_module_size": 1000, "max_request_size": 1000, "max_file_size": 1000}
    with guarded_server(tmp_path, **limits) as (client, port):
        cap = client.app.config["aeordb.settings"].max_body_size          # 1000 + 64 KiB
        head = (b"PUT /db/_files/%s HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH["Authorization"].encode()
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n")

        def chunked(total: int, size: int = 8192) -> bytes:
            sizes = [size] * (total // size) + ([total % size] if total % size else [])
            return b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes) + b"0\r\n\r\n"
        # Past the outer cap: waitress stops reading and answers a JSON 413 itself.
        [answer] = raw_exchange(port, head % b"outer" + chunked(cap + 8192))
        assert str(cap) in assert_json_error(answer, 413)
        # Under the outer cap, over the route's limit: the app's JSON 413 names the limit.
        [answer] = raw_exchange(port, head % b"route" + chunked(1001, 100))
        assert "1000" in assert_json_error(answer, 413)
        # One chunk announcing far more than the cap: refused once the cap is passed.
        [answer] = raw_exchange(port, head % b"liar" + b"%x\r\n" % (10 ** 12) + b"l" * (cap + 1))
        assert_json_error(answer, 413)
        # A chunk size that is no number: a JSON 400.
        [answer] = raw_exchange(port, head % b"bad" + b"zz\r\nabc\r\n0\r\n\r\n")
        assert_json_error(answer, 400)
        # At the route's limit, chunked: stored whole.
        [answer] = raw_exchange(port, head % b"fits" + chunked(1000, 300))
        assert answer[0] == 201, answer
        status, _, body = http_request(port, "GET", "/db/_files/")
        assert status == 200 and json.loads(body)["entries"] == [{"name": "fits", "type": "file", "size": 1000}]


def test_conflicting_content_lengths_are_a_json_400(tmp_path):
    auth = f"Authorization: {AUTH['Authorization']}\r\n".encode()
    with guarded_server(tmp_path) as (client, port):
        for lengths in (b"Content-Length: 5\r\nContent-Length: 6\r\n", b"Content-Length: 5\r\nContent-Length: 5\r\n",
                        b"Content-Length: 5, 6\r\n", b"Content-Length: -5\r\n", b"Content-Length: +5\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                # A smuggled second request rides behind the body: it must never run.
                sock.sendall(b"PUT /db/_files/cl HTTP/1.1\r\nHost: x\r\n" + auth + lengths + b"\r\n"
                             + b"hello!" + b"DELETE /db/_files/kept HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
                [answer] = read_responses(sock, 1)
                assert "Content-Length" in assert_json_error(answer, 400), lengths
                assert answer[1]["connection"] == "close"
                assert sock.recv(10) == b""
        assert http_request(port, "GET", "/db/_files/cl")[0] == 404
        # Transfer-Encoding: chunked beside a Content-Length: the chunked framing wins, nothing is smuggled.
        assert http_request(port, "PUT", "/db/_files/kept", b"kept")[0] == 201
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"PUT /db/_files/te HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 40\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                         b"GET /db/_files/te HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
            (put_status, _, _), (get_status, _, body) = read_responses(sock, 2)
        assert put_status == 201 and get_status == 200 and body == b"abc"
        assert http_request(port, "GET", "/db/_files/kept")[2] == b"kept"


def test_a_pipelined_answer_does_not_wait_for_the_request_behind_it(tmp_path):
    """The answer to /_health goes out while the looping plugin pipelined behind it runs to its
    time limit: when it has been read, the plugin's answer has not arrived yet."""
    with guarded_server(tmp_path, timeout=1) as (client, port):
        deploy(client, "db/s/spin", wat(GUEST_LOOPS["handle"]))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /_health HTTP/1.1\r\nHost: x\r\n\r\n"
                         + b"POST /db/s/spin/f/_invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                         + f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode())
            status, _, body = read_responses(sock, 1)[0]
            assert status == 200 and json.loads(body)["status"] == "ok"
            sock.settimeout(0)
            with pytest.raises(BlockingIOError):   # nothing more yet: the plugin still runs
                sock.recv(1, socket.MSG_PEEK)
            sock.settimeout(10)
            status, _, body = read_responses(sock, 1)[0]
            assert status == 500 and "time limit" in json.loads(body)["error"]


def test_pipelined_requests_are_answered_in_order(tmp_path):
    auth = f"Authorization: {AUTH['Authorization']}\r\n".encode()
    with guarded_server(tmp_path) as (client, port):
        deploy(client, "db/s/echo", wat(ECHO_WAT))
        requests = [b"GET /_health HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"PUT /db/_files/p HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5\r\n\r\nfirst",
                    b"GET /db/_files/p HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
                    b"PUT /db/_files/p HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 6\r\n\r\nsecond",
                    b"POST /db/s/echo/f/_invoke HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 2\r\n\r\nok",
                    b"GET /db/_files/p HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
                    b"GET /nowhere HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"".join(requests))          # all in one send
            answers = read_responses(sock, len(requests))
            assert [status for status, _, _ in answers] == [200, 201, 200, 200, 200, 200, 404]
            assert answers[2][2] == b"first" and answers[5][2] == b"second"
            assert json.loads(answers[4][2])["arguments"] == [111, 107]
            assert_json_error(answers[6], 404)
            # The connection stays open for more.
            sock.sendall(requests[0])
            assert read_responses(sock, 1)[0][0] == 200
        # A request without the token in a pipeline ends the connection: what follows it never runs.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(requests[0] + b"PUT /db/_files/q HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nq"
                         + b"PUT /db/_files/p HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5\r\n\r\nthird")
            first, refused = read_responses(sock, 2)
            assert first[0] == 200 and refused[0] == 401 and refused[1]["connection"] == "close"
            assert sock.recv(10) == b""
        assert http_request(port, "GET", "/db/_files/p")[2] == b"second"
        assert http_request(port, "GET", "/db/_files/q")[0] == 404


@pytest.mark.parametrize("send_buffer", [aeordb.SEND_BUFFER, 1], ids=["buffered", "as-waitress-sends"])
def test_answers_around_the_send_buffer_arrive_whole_and_in_order(tmp_path, monkeypatch, send_buffer):
    """An answer within the send buffer goes out from the serving loop, a larger one from the worker
    thread as it is written (as waitress sends every answer by default): each arrives whole, in order."""
    monkeypatch.setattr(aeordb, "SEND_BUFFER", send_buffer)
    client, app = make_app(tmp_path)
    deploy(client, "db/s/raw", wat(RAW_ECHO_WAT))
    server = aeordb.Server(app, app.config["aeordb.settings"], aeordb.bind_listener("127.0.0.1", 0))
    assert server.waitress.adj.send_bytes == send_buffer
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = server.waitress.socket.getsockname()[1]
        wait_until_healthy(port)
        sizes = sorted({0, 100, max(0, aeordb.SEND_BUFFER - 300), aeordb.SEND_BUFFER + 1, 1 << 20})
        bodies = [random.Random(size).randbytes(size) for size in sizes]
        auth = f"Authorization: {AUTH['Authorization']}\r\n".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"".join(b"POST /db/s/raw/f/_invoke HTTP/1.1\r\nHost: x\r\n" + auth
                                  + b"Content-Length: %d\r\n\r\n" % len(body) + body for body in bodies))
            answers = read_responses(sock, len(bodies))
        assert [(status, body) for status, _, body in answers] == [(200, body) for body in bodies]
    finally:
        server.stop()
        thread.join(timeout=20)


def test_two_thousand_concurrent_connections_are_all_served(tmp_path):
    """2,000 connections opened at once against the default --connection-limit (100): all are
    served in turn (the rest wait in the listen backlog or retry their SYN), none is refused."""
    import errno
    import resource
    import selectors
    connections = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 200
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the open-file limit ({hard}) is under {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    request = b"GET /_health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    selector = selectors.DefaultSelector()
    answers: dict = {}
    try:
        with server_process(tmp_path / "data") as (process, port):
            for number in range(connections):
                sock = socket.socket()
                sock.setblocking(False)
                assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
                selector.register(sock, selectors.EVENT_WRITE, [number, b""])
            deadline = time.monotonic() + 60
            while len(answers) < connections:
                assert time.monotonic() < deadline, f"only {len(answers)} of {connections} answered"
                assert process.poll() is None, process.stdout.read()[-2000:]
                for key, events in selector.select(timeout=1):
                    sock, (number, _) = key.fileobj, key.data
                    if events & selectors.EVENT_WRITE:
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        assert error == 0, (number, os.strerror(error))
                        sock.sendall(request)          # a few bytes: the socket's buffer takes them
                        selector.modify(sock, selectors.EVENT_READ, key.data)
                        continue
                    chunk = sock.recv(65536)
                    key.data[1] += chunk
                    if not chunk:                          # Connection: close: the whole answer is in
                        selector.unregister(sock)
                        sock.close()
                        answers[number] = key.data[1]
            assert all(answer.startswith(b"HTTP/1.1 200 ") and b'"status": "ok"' in answer
                       for answer in answers.values()), [a for a in answers.values() if b" 200 " not in a][:3]
            assert http_request(port, "GET", "/_health")[0] == 200   # and it still serves
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_connection_limit_past_1024_descriptors_keeps_serving(tmp_path):
    """--connection-limit allows 10,000: past 1,023 descriptors the serving loop must poll(), not select()."""
    with server_process(tmp_path / "data", "--connection-limit", "1500") as (process, port):
        held = []
        try:
            for _ in range(1100):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                held[-1].sendall(b"GET /_health HTTP/1.1\r\nHost: x\r\n\r\n")
            for sock in held:
                assert read_response(sock)[0] == 200
        finally:
            for sock in held:
                sock.close()
        assert process.poll() is None and http_request(port, "GET", "/_health")[0] == 200


# -- plugins at scale and on damaged disks --------------------------------------

def test_memory_bombs_from_32_clients_each_hit_the_memory_limit(tmp_path):
    with guarded_server(tmp_path, memory_limit=16 * aeordb.MiB) as (client, port):
        deploy(client, "db/s/bomb", wat(MEMORY_BOMB_WAT))
        deploy(client, "db/s/echo", wat(ECHO_WAT))
        bombs: list = []
        echoes: list = []
        done = threading.Event()

        def bomb() -> None:
            bombs.append(http_request(port, "POST", "/db/s/bomb/f/_invoke", b"boom", timeout=60))

        def echo() -> None:
            while not done.is_set() or not echoes:
                status, _, body = http_request(port, "POST", "/db/s/echo/f/_invoke", b"ok", timeout=60)
                echoes.append((status, body))
        echoing = threading.Thread(target=echo)
        echoing.start()
        clients = [threading.Thread(target=bomb) for _ in range(32)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        done.set()
        echoing.join(60)
        assert len(bombs) == 32 and not echoing.is_alive()
        for status, headers, body in bombs:
            assert status == 500 and "memory limit" in json.loads(body)["error"], (status, body[:300])
        assert echoes and all(status == 200 and json.loads(body)["arguments"] == [111, 107]
                              for status, body in echoes), echoes[:3]
        status, _, body = http_request(port, "POST", "/db/s/echo/f/_invoke", b"ok")
        assert status == 200 and json.loads(body)["arguments"] == [111, 107]


def test_three_thousand_plugins_load_and_serve(tmp_path):
    """3,000 plugins (one deployed, the rest copied as an operator would copy folders) load on a
    restart, list, serve, and a deploy and a remove among them still work."""
    count = 3000
    client, _ = make_app(tmp_path)
    deploy(client, "db/s0/t0", wat(ECHO_WAT), name="p0")
    source = tmp_path / "plugins" / "db" / "s0" / "t0"
    meta = json.loads((source / "plugin.json").read_text())
    module_name = f"module-{meta['sha256']}.wasm"
    module = (source / module_name).read_bytes()
    for number in range(1, count):
        folder = tmp_path / "plugins" / "db" / f"s{number // 100}" / f"t{number}"
        folder.mkdir(parents=True)
        (folder / module_name).write_bytes(module)
        (folder / "plugin.json").write_text(json.dumps({**meta, "name": f"p{number}", "plugin_id": f"id{number}"}))
    started = time.monotonic()
    again, _ = make_app(tmp_path)
    loaded = time.monotonic() - started
    listed = again.get("/db/_plugins", headers=AUTH).json
    assert len(listed) == count and loaded < 20, (len(listed), loaded)
    assert {(m["path"], m["name"]) for m in listed} == {
        (f"db/s{n // 100}/t{n}", f"p{n}") for n in range(count)}
    for number in random.Random(3).sample(range(count), 25) + [0, count - 1]:
        path = f"db/s{number // 100}/t{number}"
        assert json.loads(invoke(again, f"{path}/f", b"ok").body)["metadata"]["plugin_path"] == path
    deploy(again, "db/s7/t777", answer_module(b"replaced"))
    assert invoke(again, "db/s7/t777/f").body == b"replaced"
    again.delete("/db/s29/t2999/f/_remove", headers=AUTH, status=200)
    invoke(again, "db/s29/t2999/f", status=404)
    assert len(again.get("/db/_plugins", headers=AUTH).json) == count - 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not-an-object", "no-sha256",
                                    "wrong-sha256", "not-utf8"])
def test_a_corrupt_plugin_json_costs_only_its_plugin(tmp_path, caplog, damage):
    import logging
    client, _ = make_app(tmp_path)
    deploy(client, "db/s/bad", answer_module(b"bad"))
    kept = [deploy(client, f"db/s/ok{n}", answer_module(b"ok%d" % n)).json for n in range(3)]
    meta_file = tmp_path / "plugins" / "db" / "s" / "bad" / "plugin.json"
    text = meta_file.read_text()
    meta = json.loads(text)
    meta_file.write_bytes({"garbage": os.urandom(300),
                           "truncated": text[:len(text) // 2].encode(),
                           "empty": b"",
                           "not-an-object": b"[1, 2, 3]",
                           "no-sha256": json.dumps({k: v for k, v in meta.items() if k != "sha256"}).encode(),
                           "wrong-sha256": json.dumps({**meta, "sha256": "0" * 64}).encode(),
                           "not-utf8": b'{"name": "\xff\xfe"}'}[damage])
    caplog.set_level(logging.ERROR, logger="aeordb")
    again, _ = make_app(tmp_path)
    assert "cannot load plugin in" in caplog.text and str(meta_file.parent) in caplog.text
    assert again.get("/_health").json["status"] == "ok"
    assert again.get("/db/_plugins", headers=AUTH).json == kept
    assert "no plugin deployed at db/s/bad" in error_of(invoke(again, "db/s/bad/f", status=404))
    for n in range(3):
        assert invoke(again, f"db/s/ok{n}/f").body == b"ok%d" % n
    # A deploy to its path repairs it.
    deploy(again, "db/s/bad", answer_module(b"repaired"))
    assert invoke(make_app(tmp_path)[0], "db/s/bad/f").body == b"repaired"


def test_a_garbage_module_file_runs_from_its_verified_artifact_or_not_at_all(tmp_path):
    client, _ = make_app(tmp_path)
    module = answer_module(b"original")
    deploy(client, "db/s/t", module)
    deploy(client, "db/s/u", answer_module(b"other"))
    sha = sha256_hex(module)
    (tmp_path / "plugins" / "db" / "s" / "t" / f"module-{sha}.wasm").write_bytes(os.urandom(len(module)))
    again, _ = make_app(tmp_path)            # its artifact is intact and verified: it still runs
    assert invoke(again, "db/s/t/f").body == b"original"
    for artifact in (tmp_path / "cache").glob(f"{sha}-*.cwasm"):
        artifact.write_bytes(b"garbage")
    third, _ = make_app(tmp_path)            # nothing trustworthy left: not loaded, the others serve
    invoke(third, "db/s/t/f", status=404)
    assert invoke(third, "db/s/u/f").body == b"other"


# -- crashes under load --------------------------------------------------------

def test_sigkill_under_mixed_load_loses_no_acknowledged_write(tmp_path):
    """Three cycles of SIGKILL while 4 writers PUT and DELETE, a reader reads and queries and a plugin
    writes: after each, every acknowledged write is there and PRAGMA integrity_check is ok.
    (The issue's figure is 25 cycles: a soak, scaled down to 3 for CI.)"""
    data_dir = tmp_path / "data"
    acknowledged: dict = {}     # key -> content (None: deleted), as last answered
    in_flight: dict = {}        # key -> content sent and not answered (one per client thread)
    plugin_write = b"written by the plugin"
    acks: list = []             # one item per acknowledged write, for the kill's trigger

    def writer(port: int, index: int, cycle: int, stop: threading.Event, problems: list) -> None:
        rng = random.Random(f"{cycle}-{index}")
        for number in range(100_000):
            if stop.is_set():
                return
            key = f"w{index}-{rng.randrange(6)}"
            value = None if rng.random() < 0.15 else f"{key}|{cycle}|{number}|".encode() * rng.randrange(1, 3000)
            in_flight[key] = value
            try:
                status, _, body = http_request(port, "PUT" if value else "DELETE", f"/db/_files/{key}", value,
                                               timeout=10)
            except (OSError, http.client.HTTPException):
                return                        # the server is gone: this write is unacknowledged
            if status == 201 or (value is None and status in (200, 404)):
                acknowledged[key] = value
                acks.append(key)
            elif status == 200 and value is not None:
                acknowledged[key] = value       # replaced
                acks.append(key)
            elif status != 503:                 # 503: the write lock was busy, nothing was written
                problems.append((key, status, body[:200]))
            del in_flight[key]

    def other_load(port: int, stop: threading.Event, problems: list) -> None:
        for number in range(100_000):
            if stop.is_set():
                return
            try:
                if number % 3 == 0:
                    in_flight["from-plugin"] = plugin_write
                    status, _, body = http_request(port, "POST", "/db/s/writer/f/_invoke", b"", timeout=10)
                    if status == 200:
                        acknowledged["from-plugin"] = plugin_write
                    del in_flight["from-plugin"]
                    status = 200 if status == 503 else status   # the write lock was busy: nothing written
                elif number % 3 == 1:
                    status, _, body = http_request(port, "GET", f"/db/_files/w0-{number % 6}", timeout=10)
                    status = 200 if status == 404 else status
                else:
                    status, _, body = http_request(port, "POST", "/db/_query", b"{}", timeout=10)
            except (OSError, http.client.HTTPException):
                return
            if status != 200:
                problems.append(("other", number, status, body[:200]))

    def check_survivors(port: int) -> None:
        for key in sorted(set(acknowledged) | set(in_flight)):
            allowed = {acknowledged.get(key)} | ({in_flight[key]} if key in in_flight else set())
            status, _, body = http_request(port, "GET", f"/db/_files/{key}")
            assert status in (200, 404) and (body if status == 200 else None) in allowed, \
                (key, status, body[:60], [a[:60] if a else a for a in allowed])
            # What survived is the new baseline: a write in flight at the kill either landed or not.
            acknowledged[key] = body if status == 200 else None

    for cycle in range(3):
        stop, problems = threading.Event(), []
        with server_process(data_dir) as (process, port):
            check_survivors(port)
            in_flight.clear()
            if cycle == 0:
                status, _, _ = http_request(port, "PUT", "/db/s/writer/_deploy", host_call_module(
                    "aeordb_write_file", json_args({"path": "/from-plugin",
                                                     "data": base64.b64encode(plugin_write).decode()})))
                assert status == 200
            before = len(acks)
            threads = [threading.Thread(target=writer, args=(port, i, cycle, stop, problems), daemon=True)
                       for i in range(4)]
            threads.append(threading.Thread(target=other_load, args=(port, stop, problems), daemon=True))
            for thread in threads:
                thread.start()
            wait_for(lambda: len(acks) - before >= 40 or not all(t.is_alive() for t in threads), timeout=30,
                     what="40 acknowledged writes")
            assert all(t.is_alive() for t in threads) and not problems, problems[:5]
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=10) == -signal.SIGKILL
            stop.set()
            for thread in threads:
                thread.join(15)
            assert not any(t.is_alive() for t in threads) and not problems, problems[:5]
        with contextlib.closing(sqlite3.connect(data_dir / "aeordb.sqlite3")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with server_process(data_dir) as (process, port):
        check_survivors(port)
        assert acknowledged.get("from-plugin") == plugin_write   # the plugin's write was acknowledged at least once
        assert http_request(port, "POST", "/db/s/writer/f/_invoke", b"")[0] == 200
    with contextlib.closing(sqlite3.connect(data_dir / "aeordb.sqlite3")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# Not in the suite: the issue's 5-minute mixed soak with no RSS trend (a soak, not a CI test).


# -- the lean invoke path ------------------------------------------------------
#
# App serves the invoke route before bottle's router; app.wsgi is bottle's own
# dispatch of the same route. Each request here goes both ways with the same
# X-Request-Id and must come back the same, byte for byte, logged and counted
# the same.

ACCESS_LINE = re.compile(r"(\S+ \S+ \d{3}) [0-9.]+ms (request=\S+)")


@dataclasses.dataclass
class BothPaths:
    app: aeordb.App
    lean: webtest.TestApp      # the app as servers call it: the lean path first
    bottle: webtest.TestApp    # bottle's own dispatch
    fell_through: list         # paths the lean path left to bottle
    caplog: pytest.LogCaptureFixture

    def same(self, method: str, path: str, body: bytes = b"", status="*", headers: dict | None = None,
             lean: bool = True, **kwargs):
        """Send one request both ways; assert identical answers, access-log lines and counts, and
        whether the lean path served it (``lean``) or left it to bottle; answer the lean path's answer."""
        headers = {**AUTH, "X-Request-Id": f"same-{random.getrandbits(32)}", **(headers or {})}
        answers, logged, counted = [], [], []
        activity = self.app.config["aeordb.activity"]
        for client in (self.lean, self.bottle):
            self.fell_through.clear()
            records, before = len(self.caplog.records), collections.Counter(activity.http_requests)
            answers.append(client.request(path, method=method, body=body, headers=headers, status=status,
                                          **kwargs))
            logged.append([ACCESS_LINE.fullmatch(r.getMessage()).groups() for r in self.caplog.records[records:]
                           if r.name == "aeordb" and ACCESS_LINE.fullmatch(r.getMessage())])
            counted.append(collections.Counter(activity.http_requests) - before)
            if client is self.lean:
                assert len(self.fell_through) == (0 if lean else 1), self.fell_through
        via_lean, via_bottle = answers
        assert (via_lean.status, via_lean.headerlist, via_lean.body) == (
            via_bottle.status, via_bottle.headerlist, via_bottle.body)
        assert logged[0] == logged[1] and counted[0] == counted[1]
        if lean:   # a routed request: one access line and one count
            assert len(logged[0]) == 1 and logged[0][0][0] == f"POST {path.split('?')[0]} {via_lean.status_int}"
            assert sum(counted[0].values()) == 1
        return via_lean


def both_paths(client: webtest.TestApp, app: aeordb.App, monkeypatch, caplog) -> BothPaths:
    import logging
    caplog.set_level(logging.INFO, logger="aeordb")
    fell_through = []
    bottle_wsgi = app.wsgi

    def counted(environ, start_response):
        fell_through.append(environ["PATH_INFO"])
        return bottle_wsgi(environ, start_response)
    monkeypatch.setattr(app, "wsgi", counted)
    return BothPaths(app, client, webtest.TestApp(bottle_wsgi), fell_through, caplog)


@pytest.fixture
def both(tmp_path, monkeypatch, caplog):
    return both_paths(*make_app(tmp_path, max_request_size=64 * 1024, access_log=True), monkeypatch, caplog)


def test_create_app_is_a_bottle_app_serving_the_invoke_route_both_ways(both):
    assert isinstance(both.app, aeordb.bottle.Bottle)
    assert ("POST", "/<db>/<schema>/<table>/<function>/_invoke") in [(r.method, r.rule) for r in both.app.routes]
    assert [pattern.pattern for pattern, _ in both.app.lean_routes] == [
        "/(?P<db>[^/]+)/(?P<schema>[^/]+)/(?P<table>[^/]+)/(?P<function>[^/]+)/_invoke",
        "/plugins/(?P<name>[^/]+)/invoke"]


def test_todays_invoke_route_is_lean_too_and_answers_as_bottle_does(both):
    assert both.lean.put("/plugins/echo", wat(ECHO_WAT), headers=AUTH).status_int == 200
    answer = both.same("POST", "/plugins/echo/invoke?x=1", b"hi", status=200)
    metadata = json.loads(answer.body)["metadata"]
    assert (metadata["name"], metadata["path"], metadata["plugin_path"], metadata["query_string"]) == (
        "echo", "/plugins/echo", "echo", "x=1")
    assert both.same("POST", "/plugins/nothing/invoke", b"", status=404).json == {"error": "Plugin not found: nothing"}
    assert both.same("POST", "/plugins/.hidden/invoke", b"", status=400).json["error"].startswith("invalid plugin name")
    key = make_key(both.lean, ["invoke"], ["elsewhere"]).json["key"]
    assert both.same("POST", "/plugins/echo/invoke", b"", status=403, headers=bearer(key)).status_int == 403
    key = make_key(both.lean, ["invoke"], ["default"]).json["key"]
    assert both.same("POST", "/plugins/echo/invoke", b"", status=200, headers=bearer(key)).status_int == 200


def test_lean_invoke_answers_as_bottle_does(both):
    deploy(both.lean, "db/s/echo", wat(ECHO_WAT))
    answer = both.same("POST", "/db/s/echo/f/_invoke?a=1&b=%20", b"hello", status=200,
                       content_type="text/plain; charset=utf-8")
    metadata = json.loads(answer.body)["metadata"]
    assert (metadata["path"], metadata["plugin_path"], metadata["method"], metadata["query_string"],
            metadata["content_type"]) == ("/db/s/echo/f", "db/s/echo", "POST", "a=1&b=%20",
                                          "text/plain; charset=utf-8")
    assert metadata["request_id"] == answer.headers["X-Request-Id"]
    assert answer.content_type == aeordb.DEFAULT_CONTENT_TYPE
    assert answer.headers["Content-Length"] == str(len(answer.body))
    assert json.loads(both.same("POST", "/db/s/echo/f/_invoke", b"", status=200).body)["arguments"] == []


@pytest.mark.parametrize("answer", [
    {"status_code": 201, "content_type": "text/plain; charset=utf-8", "body": "made"},
    {"status_code": 200, "body": [111, 107],
     "headers": {"X-Twice": "first", "x-twice": "second", "x_under": "u", "ETag": '"e"', "vary": "Accept"}},
    {"status_code": 200, "body": "ok", "headers": {"x-request-id": "the plugin's", "X-Later": "l"}},
    {"status_code": 200, "body": "ok", "content_type": "text/plain; name=caf\u00e9",
     "headers": {"x-unicode": "\u00e9t\u00e9 \u2713"}},
    {"status_code": 204, "body": "dropped", "headers": {"content-language": "en", "x-kept": "k"}},
    {"status_code": 304, "body": "dropped", "headers": {"content-encoding": "gzip", "ETag": '"v1"',
                                                        "last-modified": "Wed, 21 Oct 2015 07:28:00 GMT"}},
    {"status_code": 418, "body": "teapot"},
    {"status_code": 599, "body": "no reason phrase"},
], ids=["201", "headers", "plugin-request-id", "unicode", "204", "304", "418", "599"])
def test_lean_invoke_writes_plugin_answers_as_bottle_does(both, answer):
    deploy(both.lean, "db/s/answer", answer_module(json.dumps(answer).encode()))
    got = both.same("POST", "/db/s/answer/f/_invoke", b"x", status=answer["status_code"])
    if answer["status_code"] in (204, 304):
        assert got.body == b"" and "Content-Type" not in got.headers and "Content-Length" not in got.headers
    else:
        assert got.headers["Content-Length"] == str(len(got.body)) and got.body
    assert got.headers["X-Request-Id"].startswith("same-")


def test_lean_invoke_sends_raw_answers_as_bottle_does(both):
    deploy(both.lean, "db/s/raw", answer_module(b"not an envelope"))
    answer = both.same("POST", "/db/s/raw/f/_invoke", b"x", status=200)
    assert answer.body == b"not an envelope" and answer.content_type == aeordb.DEFAULT_CONTENT_TYPE


def test_lean_invoke_errors_are_bottles(both):
    deploy(both.lean, "db/s/trap", wat(TRAP_WAT))
    assert "unreachable" in error_of(both.same("POST", "/db/s/trap/f/_invoke", b"x", status=500))
    assert "no plugin deployed at db/s/none" in error_of(both.same("POST", "/db/s/none/f/_invoke", status=404))
    assert "invalid schema name '_s'" in error_of(both.same("POST", "/db/_s/t/f/_invoke", status=400))
    assert "exceeds the limit" in error_of(both.same("POST", "/db/s/trap/f/_invoke", b"x" * (64 * 1024 + 1),
                                                     status=413))


def test_lean_invoke_time_limit_is_bottles(tmp_path, monkeypatch, caplog):
    both = both_paths(*make_app(tmp_path, timeout=0.2, access_log=True), monkeypatch, caplog)
    deploy(both.lean, "db/s/loop", wat(LOOP_WAT))
    assert "time limit" in error_of(both.same("POST", "/db/s/loop/f/_invoke", status=500))


def test_lean_invoke_over_the_memory_budget_is_bottles_503(tmp_path, monkeypatch, caplog):
    both = both_paths(*make_app(tmp_path, access_log=True), monkeypatch, caplog)
    deploy(both.lean, "db/s/trap", wat(TRAP_WAT))
    budget = both.app.config["aeordb.budget"]
    budget.used = budget.capacity   # as if other large requests were in flight
    try:
        answer = both.same("POST", "/db/s/trap/f/_invoke", b"x" * aeordb.LARGE_BODY, status=503)
        assert budget.used == budget.capacity   # nothing left reserved by the refused requests
    finally:
        budget.used = 0
    assert "memory budget" in error_of(answer) and answer.headers["Retry-After"]


def test_lean_invoke_unexpected_errors_are_bottles_500(both, monkeypatch):
    deploy(both.lean, "db/s/trap", wat(TRAP_WAT))
    monkeypatch.setattr(both.app.config["aeordb.runtime"], "invoke", lambda *args: 1 / 0)
    answer = both.same("POST", "/db/s/trap/f/_invoke", status=500)
    assert error_of(answer) == "internal error: ZeroDivisionError"
    assert sum("unexpected error on POST /db/s/trap/f/_invoke" in r.getMessage() for r in both.caplog.records) == 2


def test_lean_invoke_credentials_are_bottles(both):
    deploy(both.lean, "db/s/echo", wat(ECHO_WAT))
    deploy(both.lean, "other/s/echo", wat(ECHO_WAT))
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eA=="}):
        answer = both.same("POST", "/db/s/echo/f/_invoke", headers=headers, status=401)
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="aeordb"'
    reader = make_key(both.lean, ["read"], ["db"]).json["key"]
    assert "invoke" in error_of(both.same("POST", "/db/s/echo/f/_invoke", headers=bearer(reader), status=403))
    invoker = make_key(both.lean, ["invoke"], ["db"]).json["key"]
    assert "other" in error_of(both.same("POST", "/other/s/echo/f/_invoke", headers=bearer(invoker), status=403))
    answer = both.same("POST", "/db/s/echo/f/_invoke", b"ok", headers=bearer(invoker), status=200)
    assert json.loads(answer.body)["arguments"] == [111, 107]


def test_what_the_lean_path_leaves_to_bottle_is_answered_by_bottle(both):
    deploy(both.lean, "db/s/echo", wat(ECHO_WAT))
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        answer = both.same(method, "/db/s/echo/f/_invoke", status=405, lean=False)
        assert answer.headers["Allow"] == "POST"
    assert "not valid UTF-8" in error_of(both.same("POST", "/db/s/echo/f%FF/_invoke", status=400, lean=False))
    assert "invalid function name" in error_of(both.same("POST", "/db/s/echo/f%C3%A9/_invoke", status=400,
                                                         lean=False))
    for path in ("/db/s/echo/_invoke", "/db/s/echo/f/g/_invoke", "/db/s/echo/f/_invoke/"):
        assert error_of(both.same("POST", path, status=404, lean=False)) == "no such route"
    # A body without a Content-Length (bottle reads it to its end) goes to bottle too.
    import io
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/db/s/echo/f/_invoke", "SCRIPT_NAME": "", "QUERY_STRING": "",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_AUTHORIZATION": AUTH["Authorization"], "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
               "wsgi.url_scheme": "http", "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False}
    statuses = []
    body = b"".join(both.app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses == ["200 OK"] and json.loads(body)["arguments"] == [] and both.fell_through == [environ["PATH_INFO"]]


def test_lean_invoke_through_a_real_server(real_server, monkeypatch):
    client, port = real_server
    app = client.app
    fell_through = []
    bottle_wsgi = app.wsgi
    monkeypatch.setattr(app, "wsgi", lambda environ, start_response: (
        fell_through.append(environ["PATH_INFO"]), bottle_wsgi(environ, start_response))[1])
    deploy(client, "db/s/answer", answer_module(b'{"status_code":201,"body":"made","headers":{"x-made":"yes"}}'))
    fell_through.clear()
    activity = app.config["aeordb.activity"]
    before = activity.http_requests[("/<db>/<schema>/<table>/<function>/_invoke", 2)]
    status, headers, body = http_request(port, "POST", "/db/s/answer/f/_invoke", b"x",
                                         {"X-Request-Id": "through-waitress"})
    assert (status, body, headers["x-made"], headers["x-request-id"]) == (201, b"made", "yes", "through-waitress")
    assert headers["content-type"] == aeordb.DEFAULT_CONTENT_TYPE and headers["content-length"] == "4"
    assert http_request(port, "GET", "/db/s/answer/f/_invoke")[0] == 405
    assert fell_through == ["/db/s/answer/f/_invoke"]   # the GET only
    assert activity.http_requests[("/<db>/<schema>/<table>/<function>/_invoke", 2)] == before + 1
    status, headers, body = http_request(port, "POST", "/db/s/answer/f/_invoke", b"x",
                                         {"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(body) == {"error": "missing or invalid bearer token"}


# Examples ######################################################################
#
# Every committed example plugin (examples/<language>/echo.wasm and notes.wasm,
# built by real toolchains from the sources beside them) behaves the same; the
# Zig ones are also rebuilt from source here, with the pip-installed toolchain.

EXAMPLE_LANGUAGES = ["zig", "c", "rust", "go", "assemblyscript"]
WASI_EXAMPLES = {"c", "rust", "go"}   # their echo prints a line to stderr with the language's own printing


def plugin_lines(caplog, key: str) -> list:
    pattern = re.compile(rf"\[{re.escape(key)} request=\S+\] (.*)")
    return [match.group(1) for match in (pattern.fullmatch(r.getMessage()) for r in caplog.records
                                         if r.name == "aeordb.plugin") if match]


def check_example_echo(client, language: str, module: bytes, caplog) -> None:
    deploy(client, f"{language}/public/echo", module)
    answer = invoke(client, f"{language}/public/echo/any", b"hello", headers={"Content-Type": "text/plain"})
    assert answer.body == b"hello" and answer.content_type == "text/plain"
    assert answer.headers["x-plugin-language"] == language
    answer = invoke(client, f"{language}/public/echo/any", b"")
    assert answer.body == b"" and answer.content_type == "application/octet-stream"
    blob = random.Random(language).randbytes(1 << 20)
    answer = invoke(client, f"{language}/public/echo/any", blob, headers={"Content-Type": "application/x-blob"})
    assert answer.body == blob and answer.content_type == "application/x-blob"
    if language in WASI_EXAMPLES:
        assert "stderr: echo: 1048576 bytes" in plugin_lines(caplog, f"{language}/public/echo")


def check_example_notes(client, language: str, module: bytes, caplog) -> None:
    key = f"{language}/public/notes"
    deploy(client, key, module)
    compact = lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert invoke(client, f"{key}/list").json == {"notes": []}
    texts = ["hi", 'quote " backslash \\ tab \t nl \n ctl \x01 é ✓ 😀']
    for seq, text in enumerate(texts, 1):
        answer = invoke(client, f"{key}/add", json.dumps({"text": text}).encode(), status=201)
        assert answer.body == compact({"seq": seq, "text": text}) and answer.content_type == "application/json"
        stored = client.get(f"/{language}/_files/notes/{seq:08d}.json", headers=AUTH)
        assert json.loads(stored.body) == {"seq": seq, "text": text}
    for bad in [b'{"txt":"x"}', b'{"text":3}', b"[1]", b"not json", b""]:
        answer = invoke(client, f"{key}/add", bad, status=400)
        assert answer.json == {"error": "body must be a JSON object with a string 'text'"}, bad
    answer = invoke(client, f"{key}/list")
    assert answer.json == {"notes": [{"seq": 2, "text": texts[1]}, {"seq": 1, "text": texts[0]}]}
    assert answer.headers["x-plugin-language"] == language
    assert invoke(client, f"{key}/nope", status=404).json == {"error": "unknown function 'nope'"}
    lines = plugin_lines(caplog, key)
    assert len(lines) == 10, lines   # one line per call
    for want in ("notes: add seq=1", "notes: add seq=2", "notes: list 2", "notes: unknown nope"):
        assert want in lines, (want, lines)


@pytest.mark.parametrize("language", EXAMPLE_LANGUAGES)
def test_example_plugins_behave_alike_in_every_language(tmp_path, language, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb.plugin")
    client, _ = make_app(tmp_path)
    folder = HERE / "examples" / language
    check_example_echo(client, language, (folder / "echo.wasm").read_bytes(), caplog)
    check_example_notes(client, language, (folder / "notes.wasm").read_bytes(), caplog)


def test_zig_examples_rebuild_from_source_and_behave_alike(tmp_path, caplog):
    """The Zig kit's source, proven on every run: rebuilt with the pip-installed toolchain (ziglang)."""
    import logging
    import shutil
    caplog.set_level(logging.INFO, logger="aeordb.plugin")
    for name in ("aeordb.zig", "echo.zig", "notes.zig", "build.sh"):
        shutil.copy(HERE / "examples" / "zig" / name, tmp_path / name)
    built = subprocess.run(["sh", str(tmp_path / "build.sh")], env={**os.environ, "PYTHON": sys.executable},
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    client, _ = make_app(tmp_path / "data")
    for name, check in (("echo", check_example_echo), ("notes", check_example_notes)):
        fresh = (tmp_path / f"{name}.wasm").read_bytes()
        assert fresh == (HERE / "examples" / "zig" / f"{name}.wasm").read_bytes(), f"{name}.wasm is not its source's build"
        check(client, "zig", fresh, caplog)


# Keys and observability #######################################################

def make_key(client, scopes, databases, status=201, **more):
    return client.post("/_keys", json.dumps({"name": "device", "scopes": scopes, "databases": databases, **more}),
                       headers=AUTH, status=status)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_an_invoke_only_key_for_one_database(tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb")
    client, _ = make_app(tmp_path)
    deploy(client, "mydb/s/t", wat(ECHO_WAT))
    deploy(client, "other/s/t", wat(ECHO_WAT))
    created = make_key(client, ["invoke"], ["mydb"]).json
    key = created["key"]
    assert key.startswith("aeo_") and len(key) > 40
    assert set(created) == {"id", "key", "name", "scopes", "databases", "created_at", "expires_at"}
    assert json.loads(client.post("/mydb/s/t/f/_invoke", b"hi", headers=bearer(key)).body)["arguments"] == [104, 105]
    denied = client.put("/mydb/s/u/_deploy", wat(ECHO_WAT), headers=bearer(key), status=403)
    assert "lacks the scope 'deploy'" in error_of(denied)
    denied = client.post("/other/s/t/f/_invoke", b"hi", headers=bearer(key), status=403)
    assert "may not use database 'other'" in error_of(denied)
    assert "admin token" in error_of(client.get("/_keys", headers=bearer(key), status=403))
    listed = client.get("/_keys", headers=AUTH).json
    assert listed == [{name: created[name] for name in created if name != "key"}]
    assert client.delete(f"/_keys/{created['id']}", headers=AUTH).json == {"revoked": True, "id": created["id"]}
    client.post("/mydb/s/t/f/_invoke", b"hi", headers=bearer(key), status=401)
    client.delete(f"/_keys/{created['id']}", headers=AUTH, status=404)
    text = caplog.text
    assert key not in text and key[4:] not in text   # the secret is never logged
    assert f"key created: id={created['id']}" in text and f"key revoked: id={created['id']}" in text


def test_every_route_checks_its_scope(tmp_path):
    client, _ = make_app(tmp_path)
    deploy(client, "db/s/t", wat(ECHO_WAT))
    put_file(client, "db", "/a.txt", b"x")
    routes = [("invoke", "POST", "/db/s/t/f/_invoke", b"x"), ("deploy", "PUT", "/db/s/u/_deploy", bytes(wat(ECHO_WAT))),
              ("deploy", "GET", "/db/_plugins", b""), ("read", "GET", "/db/_files/a.txt", b""),
              ("read", "HEAD", "/db/_files/a.txt", b""), ("read", "POST", "/db/_query", b'{"path": "/"}'),
              ("write", "PUT", "/db/_files/b.txt", b"y"), ("write", "DELETE", "/db/_files/b.txt", b""),
              ("metrics", "GET", "/_metrics", b""), ("metrics", "GET", "/db/s/t/_logs", b""),
              ("metrics", "GET", "/db/s/t/_stats", b""), ("deploy", "DELETE", "/db/s/u/f/_remove", b"")]
    keys = {scope: make_key(client, [scope], ["db"]).json["key"] for scope in aeordb.SCOPES}
    for scope, method, path, body in routes:
        for other, key in keys.items():
            answer = client.request(path, method=method, body=body, headers=bearer(key), expect_errors=True)
            if other == scope:
                assert answer.status_int < 400, (scope, path, answer.status)
            else:
                assert answer.status_int == 403, (scope, other, path, answer.status)


def test_keys_are_stored_hashed_owner_only_and_survive_restarts(tmp_path):
    client, _ = make_app(tmp_path)
    key = make_key(client, ["read"], ["*"]).json["key"]
    stored = (tmp_path / "keys.json").read_text()
    assert key not in stored and hashlib.sha256(key.encode()).hexdigest() in stored
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    again, _ = make_app(tmp_path)
    assert again.get("/anydb/_files/", headers=bearer(key)).json["entries"] == []


def test_expired_and_malformed_keys(client):
    expired = make_key(client, ["read"], ["*"], expires_at="2020-01-01T00:00:00Z").json["key"]
    client.get("/db/_files/", headers=bearer(expired), status=401)
    later = make_key(client, ["read"], ["*"], expires_at="2999-01-01T00:00:00Z").json["key"]
    client.get("/db/_files/", headers=bearer(later))
    for spec, fragment in (({"name": "", "scopes": ["read"], "databases": ["*"]}, "'name'"),
                           ({"name": "k", "scopes": ["root"], "databases": ["*"]}, "'scopes'"),
                           ({"name": "k", "scopes": [], "databases": ["*"]}, "'scopes'"),
                           ({"name": "k", "scopes": ["read"], "databases": []}, "'databases'"),
                           ({"name": "k", "scopes": ["read"], "databases": ["_sys"]}, "database name"),
                           ({"name": "k", "scopes": ["read"], "databases": ["*"], "expires_at": "soon"}, "expires_at")):
        assert fragment in error_of(client.post("/_keys", json.dumps(spec), headers=AUTH, status=400))
    client.get("/db/_files/", headers=bearer("aeo_" + "x" * 43), status=401)


def test_malformed_key_requests_and_limits_are_400_not_500(client):
    spec = {"name": "k", "scopes": [["read"]], "databases": ["*"]}
    assert "'scopes'" in error_of(client.post("/_keys", json.dumps(spec), headers=AUTH, status=400))
    deploy(client, "db/s/t", wat(ECHO_WAT))
    for limit in ("%B2", "1" * 5000, "-1", "1e2", str(aeordb.RING_LINES + 1)):
        assert "limit must be" in error_of(client.get(f"/db/s/t/_logs?limit={limit}", headers=AUTH, status=400))


def test_a_damaged_keys_file_refuses_keys_but_not_the_token(tmp_path):
    client, _ = make_app(tmp_path)
    key = make_key(client, ["read"], ["*"]).json["key"]
    records = json.loads((tmp_path / "keys.json").read_text())
    del records["keys"][0]["sha256"]
    (tmp_path / "keys.json").write_text(json.dumps(records))
    client.get("/db/_files/", headers=bearer(key), status=401)
    client.get("/db/_files/", headers=AUTH, status=200)


def test_a_create_in_another_process_cannot_undo_a_revoke(tmp_path, monkeypatch):
    """Two stores on one data dir, as two processes have: the revoke waits for the create in flight."""
    here, there = aeordb.KeyStore(tmp_path), aeordb.KeyStore(tmp_path)
    victim = here.create("victim", ["read"], ["*"], None)
    creating, release, revoking = threading.Event(), threading.Event(), threading.Event()
    real_save, real_flock = there._save, aeordb.fcntl.flock

    def slow_save(keys):   # "there" has read the file and is about to write it back
        creating.set()
        assert release.wait(30)
        real_save(keys)

    def watched_flock(handle, operation):
        if threading.current_thread().name == "revoker":
            revoking.set()
        real_flock(handle, operation)
    there._save = slow_save
    monkeypatch.setattr(aeordb.fcntl, "flock", watched_flock)
    creator = threading.Thread(target=there.create, args=("other", ["read"], ["*"], None))
    creator.start()
    assert creating.wait(30)
    revoker = threading.Thread(target=here.revoke, args=(victim["id"],), name="revoker")
    revoker.start()
    assert revoking.wait(30)   # the revoke is at the lock the create holds
    release.set()
    creator.join(30)
    revoker.join(30)
    assert [key["name"] for key in aeordb.KeyStore(tmp_path).list()] == ["other"]
    assert here.find(victim["key"]) is None and there.find(victim["key"]) is None


def test_metrics_show_a_key_only_its_databases(client):
    deploy(client, "a/s/t", wat(ECHO_WAT))
    deploy(client, "b/s/t", wat(ECHO_WAT))
    put_file(client, "a", "/x.txt", b"x")
    put_file(client, "b", "/y.txt", b"y")
    key = make_key(client, ["metrics"], ["a"]).json["key"]
    mine = parse_metrics(client.get("/_metrics", headers=bearer(key)).text)
    databases = {dict(labels).get("db") for _, labels in mine} - {None}
    assert databases == {"a"}
    everything = parse_metrics(client.get("/_metrics", headers=AUTH).text)
    assert {dict(labels).get("db") for _, labels in everything} - {None} == {"a", "b"}


def test_a_removed_plugins_late_activity_is_not_kept():
    activity = aeordb.Activity()
    activity.line("db/s/t", "INFO", "r1", "before")
    activity.removed("db/s/t")
    activity.line("db/s/t", "INFO", "r2", "late")   # an invocation that was running at the remove
    activity.invocation("db/s/t", "ok", 0.01, 1, 1, None, collections.Counter({"aeordb_read_file": 1}))
    assert activity.logs("db/s/t", 10) == [] and activity.stats("db/s/t")["invocations"] == 0
    assert activity.line_bytes == 0
    activity.deployed("db/s/t", 0.1)
    activity.line("db/s/t", "INFO", "r3", "redeployed")
    assert [line["message"] for line in activity.logs("db/s/t", 10)] == ["redeployed"]


def test_request_ids_on_every_response_and_in_the_metadata(client):
    deploy(client, "db/s/t", wat(ECHO_WAT))
    answer = invoke(client, "db/s/t/f", b"", headers={"X-Request-Id": "client-chosen.id:1"})
    assert answer.headers["X-Request-Id"] == "client-chosen.id:1"
    assert json.loads(answer.body)["metadata"]["request_id"] == "client-chosen.id:1"
    answer = invoke(client, "db/s/t/f", b"", headers={"X-Request-Id": "bad id with spaces"})
    made = answer.headers["X-Request-Id"]
    assert made != "bad id with spaces" and json.loads(answer.body)["metadata"]["request_id"] == made
    others = [client.get("/_health"), client.get("/db/_plugins", status=401),
              client.get("/no/such/route/here/at/all", headers=AUTH, status=404),
              client.post("/_health", status=405), invoke(client, "db/s/none/f", status=404)]
    ids = [response.headers["X-Request-Id"] for response in others]
    assert all(ids) and len(set(ids + [made])) == len(ids) + 1


def test_failures_deploys_and_removes_are_logged_for_the_operator(tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="aeordb")
    client, _ = make_app(tmp_path, timeout=0.3)
    key = make_key(client, ["deploy", "invoke"], ["db"]).json
    client.put("/db/s/loop/_deploy", wat(LOOP_WAT), headers=bearer(key["key"]))
    answer = client.post("/db/s/loop/run/_invoke", b"", headers={**bearer(key["key"]), "X-Request-Id": "r-1"},
                         status=500)
    failures = [r for r in caplog.records if r.levelno == logging.WARNING and "invocation failed" in r.getMessage()]
    assert len(failures) == 1
    line = failures[0].getMessage()
    for part in ("plugin=db/s/loop", "function=run", "status=500", "outcome=time_limit", "request=r-1",
                 "cause=plugin invocation failed: time limit of 0.3 s exceeded", "duration="):
        assert part in line, (part, line)
    assert error_of(answer) in line
    client.delete("/db/s/loop/run/_remove", headers=bearer(key["key"]))
    audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit:")]
    assert any("deployed db/s/loop" in a and f"by=key 'device' ({key['id']})" in a for a in audit), audit
    assert any("removed db/s/loop" in a and f"({key['id']})" in a for a in audit), audit
    caplog.clear()
    for _ in range(20):
        client.get("/db/_plugins", headers={"Authorization": "Bearer nope"}, status=401)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refused) <= 2 and "without a valid credential" in refused[0]


def test_plugin_logs_and_stats(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.3)
    steps = [("log_message", b"info", b"line one"), ("log_message", b"warn", b"line two")]
    deploy(client, "db/s/seq", sequence_module(steps + [("aeordb_context", b"{}")]))
    for n in range(3):
        invoke(client, "db/s/seq/run", headers={"X-Request-Id": f"req-{n}"})
    deploy(client, "db/s/trap", wat(TRAP_WAT))
    invoke(client, "db/s/trap/run", status=500)
    lines = client.get("/db/s/seq/_logs?limit=4", headers=AUTH).json["lines"]
    assert [(l["level"], l["request_id"], l["message"]) for l in lines] == [
        ("WARNING", "req-1", "line two"), ("INFO", "req-2", "line one"), ("WARNING", "req-2", "line two")][-4:] \
        or len(lines) == 4
    assert lines[-1] == {**lines[-1], "level": "WARNING", "request_id": "req-2", "message": "line two"}
    assert all(set(line) == {"time", "level", "request_id", "message"} for line in lines)
    assert len(client.get("/db/s/seq/_logs", headers=AUTH).json["lines"]) == 6
    failed = client.get("/db/s/trap/_logs", headers=AUTH).json["lines"]
    assert len(failed) == 1 and failed[0]["level"] == "ERROR" and "unreachable" in failed[0]["message"]
    stats = client.get("/db/s/seq/_stats", headers=AUTH).json
    assert stats["invocations"] == 3 and stats["outcomes"]["ok"] == 3 and stats["last_error"] is None
    assert stats["duration_ms"]["p50"] > 0 and stats["duration_ms"]["p99"] >= stats["duration_ms"]["p50"]
    assert stats["version"]["sha256"] == client.get("/db/_plugins", headers=AUTH).json[0]["sha256"]
    trap = client.get("/db/s/trap/_stats", headers=AUTH).json
    assert trap["outcomes"]["plugin_error"] == 1 and "unreachable" in trap["last_error"]["message"]
    client.get("/db/s/seq/_logs?limit=x", headers=AUTH, status=400)
    client.get("/db/s/none/_stats", headers=AUTH, status=404)


def test_the_log_ring_is_bounded_per_plugin(client):
    steps = [("log_message", b"info", b"x" * 900)] * 50 + [("aeordb_context", b"{}")]
    deploy(client, "db/s/chatty", sequence_module(steps))
    for _ in range(5):
        invoke(client, "db/s/chatty/run")
    lines = client.get("/db/s/chatty/_logs?limit=200", headers=AUTH).json["lines"]
    assert 0 < len(lines) <= aeordb.RING_LINES
    assert sum(len(line["message"]) + 64 for line in lines) <= aeordb.RING_BYTES


def parse_metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_in_the_prometheus_text_format(client):
    deploy(client, "db/s/t", host_call_module("aeordb_read_file", b'{"path": "/a.txt"}'))
    deploy(client, "db/s/trap", wat(TRAP_WAT))
    put_file(client, "db", "/a.txt", b"hello")
    before = parse_metrics(client.get("/_metrics", headers=AUTH).text)
    plugin = (("db", "db"), ("schema", "s"), ("table", "t"))
    for _ in range(3):
        invoke(client, "db/s/t/run", b"body")
    invoke(client, "db/s/trap/run", status=500)
    answer = client.get("/_metrics", headers=AUTH)
    assert answer.content_type == "text/plain" and "version=0.0.4" in answer.headers["Content-Type"]
    after = parse_metrics(answer.text)
    ok = ("aeordb_invocations_total", tuple(sorted(plugin + (("outcome", "ok"),))))
    assert after[ok] - before.get(ok, 0) == 3
    trap = ("aeordb_invocations_total", (("db", "db"), ("outcome", "plugin_error"), ("schema", "s"), ("table", "trap")))
    assert after[trap] == 1
    assert after[("aeordb_invocation_duration_seconds_count", plugin)] == 3
    assert after[("aeordb_request_bytes_total", plugin)] == 12
    assert after[("aeordb_host_calls_total", tuple(sorted(plugin + (("function", "aeordb_read_file"),))))] == 3
    assert after[("aeordb_deploys_total", ())] >= 2 and after[("aeordb_compile_seconds_total", ())] > 0
    assert after[("aeordb_database_bytes", (("db", "db"),))] == 5 + len("/a.txt") + 256
    assert after[("aeordb_engine_mode", (("mode", "pooling"),))] == 1
    assert after[("process_resident_memory_bytes", ())] > 10 * 2 ** 20 and after[("process_open_fds", ())] > 3
    routes = {labels: value for (name, labels), value in after.items() if name == "aeordb_http_requests_total"}
    assert routes[(("route", "/<db>/<schema>/<table>/<function>/_invoke"), ("status", "2xx"))] >= 3
    assert routes[(("route", "/<db>/<schema>/<table>/<function>/_invoke"), ("status", "5xx"))] == 1
    client.delete("/db/s/trap/run/_remove", headers=AUTH)   # a removed plugin's series go with it
    assert not any(dict(labels).get("table") == "trap"
                   for (_, labels) in parse_metrics(client.get("/_metrics", headers=AUTH).text))


def test_prometheus_label_values_are_escaped():
    assert aeordb.prometheus_labels(a='say "hi"\\now', b="x\ny") == '{a="say \\"hi\\"\\\\now",b="x\\ny"}'
    labels = aeordb.prometheus_labels(a='q"\\n')
    parsed = parse_metrics("# TYPE m counter\nm" + labels + " 1\n")
    assert parsed[("m_total", (("a", 'q"\\n'),))] == 1


def test_wasi_poll_oneoff_edges(tmp_path):
    """No subscription is EINVAL at once; an absolute monotonic deadline is kept (WASI's clock origin)."""
    client, _ = make_app(tmp_path, timeout=2.0)
    module = wasi_module(imports=POLL_ONEOFF, body='''
      (i32.store (i32.const 8192) (call $poll (i32.const 1024) (i32.const 2048) (i32.const 0) (i32.const 3000)))
      (i64.or (i64.shl (i64.const 8192) (i64.const 32)) (i64.const 4))''')
    deploy(client, "db/s/none", module)
    started = time.monotonic()
    assert invoke(client, "db/s/none/f").body == (28).to_bytes(4, "little") and time.monotonic() - started < 1.0
    clock = f'(import "{WASI}" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))'
    absolute = wasi_module(imports=POLL_ONEOFF + clock, body='''
      (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 4000)))        ;; monotonic now
      (i64.store (i32.const 1000) (i64.const 42))                              ;; userdata
      (i32.store8 (i32.const 1008) (i32.const 0))                              ;; a clock subscription
      (i32.store (i32.const 1016) (i32.const 1))                               ;; monotonic
      (i64.store (i32.const 1024) (i64.add (i64.load (i32.const 4000)) (i64.const 300000000)))  ;; now + 0.3 s
      (i32.store16 (i32.const 1040) (i32.const 1))                             ;; absolute
      (drop (call $poll (i32.const 1000) (i32.const 2048) (i32.const 1) (i32.const 3000)))
      (i64.const 0)''')
    deploy(client, "db/s/abs", absolute)
    started = time.monotonic()
    invoke(client, "db/s/abs/f")
    assert 0.25 <= time.monotonic() - started < 1.5


def test_memory_limits_past_2_gib_are_refused():
    with pytest.raises(SystemExit):
        aeordb.parse_settings(["--memory-limit", str(4 * aeordb.GiB)], environ={})
    assert aeordb.parse_settings(["--memory-limit", str(2 * aeordb.GiB)], environ={}).memory_limit == 2 * aeordb.GiB


def test_a_server_on_another_thread_leaves_the_heap_to_its_host(real_server):
    _, port = real_server
    assert http_request(port, "GET", "/_health")[0] == 200
    assert gc.get_freeze_count() == 0   # the test process's objects stay collectable


def test_a_server_on_the_main_thread_takes_the_signals_and_freezes_the_heap_and_gives_both_back(tmp_path):
    script = f"""
import gc, signal, threading, aeordb, pathlib
before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)   # SIGINT is ignored under `cmd &`
app = aeordb.create_app(aeordb.Settings(data_dir=pathlib.Path({str(tmp_path)!r}), token="x" * 16))
server = aeordb.Server(app, app.config["aeordb.settings"], aeordb.bind_listener("127.0.0.1", 0))
during = []
def stop():
    during.append((signal.getsignal(signal.SIGTERM), gc.get_freeze_count() > 1000))
    server.stop()
threading.Timer(0.3, stop).start()
server.run()
assert during == [(server.stop, True)], during   # the server's handler, the heap frozen
assert gc.get_freeze_count() == 0
assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
print("restored")
"""
    done = run_python(script)
    assert done.returncode == 0 and "restored" in done.stdout, done.stderr[-2000:]


# Command line ##################################################################

def cli(*args: str, port: int | None = None, stdin: bytes | None = None, token: str = TOKEN) -> subprocess.CompletedProcess:
    """``python aeordb.py ARGS`` as an operator would run it (against ``port`` on 127.0.0.1)."""
    where = ["--url", f"http://127.0.0.1:{port}", "--token", token] if port else []
    return subprocess.run([sys.executable, str(HERE / "aeordb.py"), *args, *where], input=stdin,
                          capture_output=True, timeout=120)


def test_the_command_line_client_round_trip(tmp_path):
    client, app = make_app(tmp_path / "data")
    module = tmp_path / "echo.wasm"
    module.write_bytes(wat(ECHO_WAT))
    with server_thread(app) as port:
        done = cli("deploy", str(module), "db/s/t", "--name", "echo", "--version", "1.2", port=port)
        assert done.returncode == 0 and b"deployed db/s/t (echo)" in done.stdout, done.stderr
        meta = json.loads(cli("list", "db", "--json", port=port).stdout)
        assert [m["path"] for m in meta] == ["db/s/t"] and meta[0]["version"] == "1.2"
        done = cli("invoke", "db/s/t/run", "--data", "hi", "-v", port=port)
        assert done.returncode == 0 and json.loads(done.stdout)["arguments"] == [104, 105]
        assert b"HTTP 200" in done.stderr and b"X-Request-Id" in done.stderr
        done = cli("invoke", "db/s/t/run", "-", port=port, stdin=b"\x00\x01")
        assert json.loads(done.stdout)["arguments"] == [0, 1]
        done = cli("invoke", "db/s/none/run", port=port)
        assert done.returncode == 1 and b"404: no plugin deployed at db/s/none" in done.stderr
        assert cli("stats", "db/s/t", port=port).stdout.startswith(b"db/s/t: 2 invocation(s) (ok 2)")
        lines = cli("logs", "db/s/t", "--json", port=port).stdout.splitlines()
        assert lines == []   # the echo plugin logs nothing and never failed
        key = json.loads(cli("keys", "create", "--name", "ci", "--scopes", "invoke", "--databases", "db",
                             "--json", port=port).stdout)
        assert key["key"].startswith("aeo_")
        assert json.loads(cli("invoke", "db/s/t/run", port=port, token=key["key"]).stdout)["arguments"] == []
        done = cli("remove", "db/s/t", port=port, token=key["key"])
        assert done.returncode == 1 and b"403" in done.stderr and b"lacks the scope 'deploy'" in done.stderr
        assert key["id"].encode() in cli("keys", "list", port=port).stdout
        assert cli("keys", "revoke", key["id"], port=port).returncode == 0
        assert cli("remove", "db/s/t", port=port).stdout == b"removed db/s/t\n"
    done = cli("list", "db", port=free_port())
    assert done.returncode == 2 and done.stderr.startswith(b"aeordb.py: cannot reach") and b"Traceback" not in done.stderr
    done = cli("deploy", "nothing.wasm", "db/s/t", port=free_port())
    assert done.returncode == 2 and b"cannot read nothing.wasm" in done.stderr
    assert cli("invoke", "not/a/function/path/too/long", port=free_port()).returncode == 2


def test_every_command_has_help():
    for command in aeordb.COMMANDS:
        done = cli(command, "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: aeordb.py {command}".encode()), command
    assert b"Other commands" in cli("--help").stdout and b"--port" in cli("serve", "--help").stdout


def test_check_validates_a_module_offline_as_a_deploy_would(tmp_path):
    good, bad = tmp_path / "good.wasm", tmp_path / "bad.wasm"
    good.write_bytes(wat(f"(module {FD_WRITE} (memory (export \"memory\") 1) (func (export \"_initialize\"))"
                         ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))'))
    bad.write_bytes(wat('(module (import "env" "mystery" (func)) (memory (export "memory") 1)'
                        ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))'))
    done = cli("check", str(good))
    assert done.returncode == 0, done.stderr
    assert b"a valid plugin" in done.stdout and b"a reactor" in done.stdout
    assert b"wasi_snapshot_preview1.fd_write: func (i32, i32, i32, i32) -> i32" in done.stdout
    report = json.loads(cli("check", "--json", str(good)).stdout)
    assert report["imports_wasi"] and report["wasi_reactor"] and report["entry"] == "handle"
    done = cli("check", str(bad))
    assert done.returncode == 1 and b"refused: module imports what aeordb.py does not provide: env.mystery" in done.stderr
    big = tmp_path / "big.wasm"
    big.write_bytes(wat('(module (memory (export "memory") 300) (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))'))
    assert cli("check", str(big)).returncode == 0
    assert b"over the limit" in cli("check", str(big), "--memory-limit", str(16 << 20)).stderr


def test_token_prints_the_local_token_only_when_owner_only(tmp_path):
    make_app(tmp_path, token=None)
    token = (tmp_path / "token").read_text().strip()
    done = cli("token", "--data-dir", str(tmp_path))
    assert done.returncode == 0 and done.stdout.decode().strip() == token
    (tmp_path / "token").chmod(0o644)
    done = cli("token", "--data-dir", str(tmp_path))
    assert done.returncode == 2 and b"readable by others" in done.stderr and token.encode() not in done.stdout


@pytest.mark.parametrize("form", ["directory", "tar.gz"])
def test_backup_under_load_and_restore(tmp_path, form):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "token").write_text(TOKEN)
    client, app = make_app(tmp_path / "data", token=None)
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    make_key(client, ["read"], ["db"])
    acknowledged, stop = [], threading.Event()
    with server_thread(app) as port:
        def write_load() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                if http_request(port, "PUT", f"/db/_files/load/{n}.txt", str(n).encode())[0] == 201:
                    acknowledged.append(n)
        writer = threading.Thread(target=write_load)
        writer.start()
        wait_for(lambda: len(acknowledged) >= 20, what="writes before the backup")
        before = list(acknowledged)
        destination = tmp_path / ("backup" if form == "directory" else "backup.tar.gz")
        done = cli("backup", str(destination), "--data-dir", str(tmp_path / "data"))
        wait_for(lambda: len(acknowledged) >= len(before) + 20, what="writes after the backup")
        stop.set()
        writer.join(30)
    assert done.returncode == 0, done.stderr
    assert cli("restore", str(destination), "--data-dir", str(tmp_path / "data")).returncode == 2   # not empty
    done = cli("restore", str(destination), "--data-dir", str(tmp_path / "restored"))
    assert done.returncode == 0, done.stderr
    restored, _ = make_app(tmp_path / "restored", token=None)   # the backed-up token is in force
    headers = {"Authorization": f"Bearer {(tmp_path / 'restored' / 'token').read_text().strip()}"}
    assert (tmp_path / "restored" / "token").read_text() == (tmp_path / "data" / "token").read_text()
    for n in before:
        assert restored.get(f"/db/_files/load/{n}.txt", headers=headers).body == str(n).encode()
    assert json.loads(restored.post("/db/s/echo/f/_invoke", b"ok", headers=headers).body)["arguments"] == [111, 107]
    assert len(restored.get("/_keys", headers=headers).json) == 1
    if form == "directory":   # the compiled cache is rebuilt, never backed up
        assert sorted(p.name for p in destination.iterdir()) == ["aeordb.sqlite3", "keys.json", "plugins", "token"]


def test_restore_skips_plugins_a_backup_could_use_to_write_elsewhere(tmp_path):
    """A backup is input from anyone: a plugin.json naming a path, a symlinked module or a module
    that does not match its sha256 is skipped, and nothing is written outside the data dir."""
    import tarfile
    client, _ = make_app(tmp_path / "data")
    deploy(client, "db/s/good", wat(ECHO_WAT))
    backup = tmp_path / "backup"
    assert cli("backup", str(backup), "--data-dir", str(tmp_path / "data")).returncode == 0
    plugins = backup / "plugins" / "db" / "s"
    (plugins / "link").mkdir()
    (plugins / "link" / "module-x").symlink_to("../good")   # relative: the archive keeps it
    escape = "x/" + "../" * 40 + str(tmp_path / "escaped").lstrip("/")
    (plugins / "link" / "plugin.json").write_text(json.dumps({"sha256": escape}))
    outside = tmp_path / "escaped.wasm"   # what the forged name points at, read and written alike
    outside.write_bytes(b"outside")
    inode = outside.stat().st_ino
    forged = plugins / "forged"
    shutil.copytree(plugins / "good", forged)
    sha = json.loads((forged / "plugin.json").read_text())["sha256"]
    (forged / f"module-{sha}.wasm").write_bytes(b"\0asm\1\0\0\0")
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(backup, arcname=".")
    done = cli("restore", str(archive), "--data-dir", str(tmp_path / "restored"))
    assert done.returncode == 0, done.stderr
    assert b"restored 1 plugin(s)" in done.stdout
    assert b"skipped db/s/link" in done.stderr and b"skipped db/s/forged: its module does not match" in done.stderr
    assert outside.stat().st_ino == inode and not list((tmp_path / "restored").rglob("escaped*"))
    assert sorted(p.name for p in (tmp_path / "restored" / "plugins" / "db" / "s").iterdir()) == ["good"]


def test_a_backup_archive_is_owner_only_from_its_first_byte(tmp_path, monkeypatch, capsys):
    import tarfile
    make_app(tmp_path / "data")
    modes = []
    real_add = tarfile.TarFile.add

    def add(self, name, *args, **kwargs):
        modes.append(os.fstat(self.fileobj.fileobj.fileno()).st_mode & 0o777)
        return real_add(self, name, *args, **kwargs)
    monkeypatch.setattr(tarfile.TarFile, "add", add)
    destination = tmp_path / "backup.tar.gz"
    assert aeordb.main(["backup", str(destination), "--data-dir", str(tmp_path / "data")]) == 0
    assert modes and set(modes) == {0o600} and destination.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("backup")] == ["backup.tar.gz"]


def test_backup_restore_and_client_failures_are_one_line_and_exit_2(tmp_path):
    make_app(tmp_path / "data")
    not_gzip = tmp_path / "notgzip"
    not_gzip.write_bytes(b"plain text, not an archive")
    cases = [("backup", str(tmp_path / "missing" / "x.tar.gz"), "--data-dir", str(tmp_path / "data")),
             ("backup", str(not_gzip), "--data-dir", str(tmp_path / "data")),
             ("restore", str(not_gzip), "--data-dir", str(tmp_path / "restored")),
             ("logs", "db/s/t", "--limit", "-1", "--url", "http://127.0.0.1:9"),
             ("list", "db", "--url", "http://127.0.0.1:9", "--token", "line\nbreak" + "x" * 16)]
    for args in cases:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(b"aeordb.py: ") and b"Traceback" not in done.stderr, (args, done.stderr)
    with socket.socket() as listener:   # a port that answers, but not as an HTTP server
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer_garbage():
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"SSH-2.0-not-http\r\n\r\n")
        thread = threading.Thread(target=answer_garbage)
        thread.start()
        done = cli("list", "db", port=listener.getsockname()[1])
        thread.join(30)
    assert done.returncode == 2 and b"did not answer as an HTTP server" in done.stderr, done.stderr


def test_an_interrupted_command_does_not_report_success(tmp_path, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(aeordb, "command_backup", interrupted)
    assert aeordb.main(["backup", str(tmp_path / "b"), "--data-dir", str(tmp_path)]) == 130


def test_a_forced_restore_leaves_no_key_the_backup_does_not_hold(tmp_path):
    make_app(tmp_path / "data")
    backup = tmp_path / "backup"
    assert cli("backup", str(backup), "--data-dir", str(tmp_path / "data")).returncode == 0
    assert not (backup / "keys.json").exists()
    (tmp_path / "stopped").mkdir()
    key = aeordb.KeyStore(tmp_path / "stopped").create("later", ["read"], ["*"], None)["key"]
    assert cli("restore", str(backup), "--data-dir", str(tmp_path / "stopped"), "--force").returncode == 0
    restored, _ = make_app(tmp_path / "stopped")
    restored.get("/db/_files/", headers=bearer(key), status=401)
    restored.get("/db/_files/", headers=AUTH, status=200)


# The OpenAPI document #########################################################


def openapi_of(client) -> dict:
    return client.get("/_openapi.json", status=200).json


def openapi_path_of(rule: str) -> str:
    """A bottle rule as the OpenAPI path the document should list it under (written apart from
    aeordb.openapi_path, so that a mistake there shows)."""
    return re.sub(r"<([A-Za-z_]\w*)(?::[^>]*)?>", r"{\1}", rule)


def check_answer(document: dict, response, path: str, method: str) -> None:
    """``response`` (a webtest answer) matches what ``document`` says ``method path`` answers with its status."""
    operation = document["paths"][path][method.lower()]
    answer = operation["responses"].get(str(response.status_int))
    assert answer is not None, f"{method} {path} answered {response.status_int}, which the document omits"
    if "$ref" in answer:
        answer = document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    assert set(answer.get("headers", {})) >= {"X-Request-Id"} and response.headers["X-Request-Id"]
    media = response.content_type
    assert media in answer["content"], (method, path, media, list(answer["content"]))
    schema = answer["content"][media]["schema"]
    # The schema's $refs ('#/components/schemas/...') resolve against the document itself.
    jsonschema.Draft202012Validator({**schema, "components": document["components"]}).validate(response.json)


def test_openapi_document_is_valid_openapi(client):
    document = openapi_of(client)
    openapi_spec_validator.validate(document)
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == aeordb.__version__
    assert document["components"]["securitySchemes"]["bearer"] == {
        **document["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_openapi_document_lists_every_route_with_its_method_and_scope(client):
    document = openapi_of(client)
    listed = {(path, method) for path, item in document["paths"].items() for method in item}
    served = set()
    for route in client.app.routes:
        path, method = openapi_path_of(route.rule), route.method.lower()
        served.add((path, method))
        operation = document["paths"][path][method]
        scope = route.config.get("scope")
        assert operation["x-aeordb-scope"] == scope
        assert operation["security"] == ([] if scope is None else [{"bearer": [scope]}])
        assert ("401" in operation["responses"]) == (scope is not None), (path, method)
        in_path = [p["name"] for p in operation["parameters"] if p["in"] == "path"]
        assert in_path == re.findall(r"\{(\w+)\}", path)
    assert listed == served   # nothing more either
    assert ("/{db}/_files/{path}", "head") in served and ("/_openapi.json", "get") in served
    ids = [operation["operationId"] for item in document["paths"].values() for operation in item.values()]
    assert len(ids) == len(set(ids))


def test_openapi_route_docs_describe_only_served_routes(client):
    """ROUTE_DOCS has no entry left over from a removed route."""
    assert set(aeordb.ROUTE_DOCS) == {route.callback.__name__ for route in client.app.routes}


def test_openapi_fails_for_a_route_without_a_description(tmp_path):
    client, app = make_app(tmp_path)

    def undescribed() -> dict:
        return {}

    app.route("/_undescribed", "GET", undescribed, scope="admin")
    with pytest.raises(LookupError, match="undescribed.*ROUTE_DOCS"):
        aeordb.openapi_document(app)
    # Served, it is a 500, not a document missing a route.
    assert "internal error" in error_of(client.get("/_openapi.json", status=500))


def test_openapi_fails_for_an_undescribed_path_parameter(tmp_path):
    _, app = make_app(tmp_path)

    def health(db: str, mystery: str) -> dict:   # a described name, an undescribed parameter
        return {}

    app.route("/<db>/<mystery>/_health", "GET", health, scope="read")
    with pytest.raises(LookupError, match="mystery"):
        aeordb.openapi_document(app)


def test_openapi_answers_match_their_schemas(client):
    document = openapi_of(client)
    check_answer(document, client.get("/_health"), "/_health", "GET")
    check_answer(document, client.get("/_openapi.json"), "/_openapi.json", "GET")
    plugin = "/{db}/{schema}/{table}"
    check_answer(document, deploy(client, "db/s/t", wat(ECHO_WAT), name="echo"), plugin + "/_deploy", "PUT")
    check_answer(document, deploy(client, "db/s/u", b"not a module", status=400), plugin + "/_deploy", "PUT")
    check_answer(document, client.get("/db/_plugins", headers=AUTH), "/{db}/_plugins", "GET")
    check_answer(document, invoke(client, "db/s/nothing/f", b"hi", status=404), plugin + "/{function}/_invoke",
                 "POST")
    assert invoke(client, "db/s/t/f", b"hi").status_int == 200
    check_answer(document, client.get("/db/s/t/_stats", headers=AUTH), plugin + "/_stats", "GET")
    check_answer(document, client.get("/db/s/t/_logs?limit=5", headers=AUTH), plugin + "/_logs", "GET")

    files = "/{db}/_files/{path}"
    doc = json.dumps({"name": "Alice", "age": 31, "address": {"city": "Oslo"}}).encode()
    check_answer(document, put_file(client, "db", "/users/alice.json", doc, "application/json"), files, "PUT")
    check_answer(document, put_file(client, "db", "/users/alice.json", doc, "application/json"), files, "PUT")
    check_answer(document, put_file(client, "db", "/users/alice.json/x", b"", status=409), files, "PUT")
    listing = client.get("/db/_files/users/", headers=AUTH)
    check_answer(document, listing, files, "GET")   # loose: a stored JSON file is served as application/json too
    jsonschema.Draft202012Validator({"$ref": "#/components/schemas/DirectoryListing",
                                     "components": document["components"]}).validate(listing.json)
    check_answer(document, client.get("/db/_files", headers=AUTH), "/{db}/_files", "GET")
    check_answer(document, client.get("/db/_files/nothing", headers=AUTH, status=404), files, "GET")
    for spec in ({"path": "/users", "where": {"field": "address.city", "op": "eq", "value": "Oslo"},
                  "include_total": True},
                 {"path": "/users", "aggregate": {"count": True, "avg": ["age"], "group_by": ["address.city"]}},
                 {"path": "/users", "where": {"field": "age", "op": "similar", "value": 1}}):
        answer = client.post_json("/db/_query", spec, headers=AUTH, expect_errors=True)
        check_answer(document, answer, "/{db}/_query", "POST")
    check_answer(document, client.delete("/db/_files/users/alice.json", headers=AUTH), files, "DELETE")

    created = client.post_json("/_keys", {"name": "kiosk", "scopes": ["invoke"], "databases": ["db"],
                                          "expires_at": None}, headers=AUTH, status=201)
    check_answer(document, created, "/_keys", "POST")
    check_answer(document, client.get("/_keys", headers=AUTH), "/_keys", "GET")
    key = {"Authorization": f"Bearer {created.json['key']}"}
    check_answer(document, client.get("/db/_plugins", headers=key, status=403), "/{db}/_plugins", "GET")
    check_answer(document, client.get("/db/_plugins", status=401), "/{db}/_plugins", "GET")
    check_answer(document, client.delete(f"/_keys/{created.json['id']}", headers=AUTH), "/_keys/{key_id}",
                 "DELETE")
    check_answer(document, client.delete("/db/s/t/f/_remove", headers=AUTH), plugin + "/{function}/_remove",
                 "DELETE")


def test_openapi_needs_no_credential(real_server):
    client, port = real_server
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert client.get("/_openapi.json", headers=headers, status=200).json["openapi"].startswith("3.1")
    # Past the request-head guard of a real server too.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/_openapi.json")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["paths"]
    finally:
        conn.close()
    assert "/_openapi.json" in aeordb.Api.PUBLIC_ROUTES


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "public_api"])
def test_a_failed_invocation_leaves_no_reference_cycle(tmp_path, fast):
    """A trap's traceback must not keep the request's buffers until a garbage collection."""
    import gc
    import types
    client, app = make_app(tmp_path, options={"fast_calls": fast})
    deploy(client, "db/s/trap", wat(TRAP_WAT))
    runtime, plugin = app.config["aeordb.runtime"], app.config["aeordb.registry"].get("db/s/trap")
    gc.collect()
    gc.disable()
    try:
        def alive() -> list:   # (not Traps: the epoch watchers of other engines make some all along)
            return [o for o in gc.get_objects() if isinstance(o, aeordb.GuestFailure)
                    or isinstance(o, types.FrameType) and o.f_code.co_name in ("run_guest", "_run", "_raise")]
        before, message = len(alive()), None
        try:
            runtime.invoke(plugin, b"x" * 1024, aeordb.Invocation(db="db", plugin_key="db/s/trap", metadata={},
                                                                  deadline=time.monotonic() + 5))
        except aeordb.ApiError as exc:   # its name is dropped at the end of this block
            message = exc.message
        assert "unreachable" in message
        assert len(alive()) == before, alive()
    finally:
        gc.enable()


def test_near_the_connection_limit_slow_clients_make_room(tmp_path):
    """Slow heads filling every connection are shed within seconds, not at --header-timeout."""
    with guarded_server(tmp_path, connection_limit=10, header_timeout=30.0) as (client, port):
        slow = []
        try:
            for _ in range(10):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /_health HTTP/1.1\r\nX-Slow: ")   # a head that never ends
                slow.append(sock)
            started = time.monotonic()
            status, _, body = http_request(port, "GET", "/_health", timeout=10)
            assert status == 200 and time.monotonic() - started < 5.0, time.monotonic() - started
        finally:
            for sock in slow:
                sock.close()


def test_the_log_rings_are_bounded_overall(monkeypatch):
    monkeypatch.setattr(aeordb, "RING_TOTAL_BYTES", 20_000)
    activity = aeordb.Activity()
    for plugin in range(10):
        for _ in range(30):
            activity.line(f"db/s/p{plugin}", "INFO", "r", "x" * 900)
    assert activity.line_bytes <= 20_000
    assert activity.line_bytes == sum(len(line["message"]) + 64 for plugin in range(10)
                                      for line in activity.logs(f"db/s/p{plugin}", 200))
    assert activity.logs("db/s/p9", 200)   # the newest plugin keeps its lines; the fullest gave way
    activity.removed("db/s/p9")
    assert activity.line_bytes == sum(len(line["message"]) + 64 for plugin in range(9)
                                      for line in activity.logs(f"db/s/p{plugin}", 200))


def test_a_deploy_with_a_version_matches_its_openapi_schema(client):
    import jsonschema
    document = client.get("/_openapi.json").json
    meta = deploy(client, "db/s/t", wat(ECHO_WAT), version="1.2.3").json
    assert meta["version"] == "1.2.3"
    schema = {**document["components"]["schemas"]["PluginMeta"], "components": document["components"]}
    jsonschema.validate(meta, schema)
    assert "version" not in deploy(client, "db/s/u", wat(ECHO_WAT)).json
