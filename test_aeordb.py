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
# HTTP API and registry ########################################################
#
# Issue 2: every endpoint and status, deploy validation, names, auth on every
# route, both envelopes (including the large-body codec path), persistence of
# the on-disk registry, runaway plugins, a real `python aeordb.py` process and
# the generated token.

# A handle that loops forever.
_API_LOOP_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param i32 i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0)))
"""

# A handle that grows memory until memory.grow fails, then aborts like Rust's allocator.
_API_BOMB_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "handle") (param i32 i32) (result i64)
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
"""

_API_BODY_PREFIX = b'{"status_code":200,"body":'

# Answers {"status_code":200,"body":<the request's arguments array>}: it finds the
# first '[' (the arguments array, first in the envelope) and the ']' closing it
# (a byte array holds no other bracket), copies the prefix just before the '['
# (alloc places the request at 65536, so there is room) and puts '}' after ']'.
_API_BODY_ECHO_WAT = f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (data (i32.const 0) "{wat_string(_API_BODY_PREFIX)}")
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
    (local.set $start (i32.sub (local.get $open) (i32.const {len(_API_BODY_PREFIX)})))
    (memory.copy (local.get $start) (i32.const 0) (i32.const {len(_API_BODY_PREFIX)}))
    (i32.store8 (i32.add (local.get $close) (i32.const 1)) (i32.const 125))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $start)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (i32.add (local.get $close) (i32.const 2))
                                       (local.get $start))))))
"""

_API_ALL_HOST_IMPORTS = "\n".join(
    f'  (import "aeordb" "{name}" (func (param i32 i32) (result i64)))'
    for name in aeordb.HOST_FUNCTION_NAMES
) + '\n  (import "aeordb" "log_message" (func (param i32 i32 i32 i32)))'


def _api_envelope(client, body: bytes = b"", path: str = "db/schema/table", function: str = "function",
                  query: str = "", headers: dict | None = None) -> dict:
    """Deploy ECHO at ``path`` and answer the request envelope the plugin received."""
    deploy(client, path, wat(ECHO_WAT))
    answer = client.post(f"/{path}/{function}/_invoke" + (f"?{query}" if query else ""), body,
                         headers={**AUTH, **(headers or {})}, status=200)
    return json.loads(answer.body)


def _api_answer(client, answer: bytes, status: int = 200):
    """Deploy a module that always answers ``answer``; invoke it once."""
    deploy(client, "db/s/answer", answer_module(answer))
    return invoke(client, "db/s/answer/f", b"x", status=status)


def _api_sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _api_error(response) -> str:
    assert response.content_type == "application/json"
    return response.json["error"]


# -- deploy ----------------------------------------------------------------------

def test_api_deploy_answers_metadata(client):
    import datetime
    module = wat(ECHO_WAT)
    before = datetime.datetime.now(datetime.timezone.utc)
    meta = deploy(client, "mydb/public/users", module).json
    after = datetime.datetime.now(datetime.timezone.utc)
    assert meta["name"] == "users"
    assert meta["path"] == "mydb/public/users"
    assert meta["plugin_type"] == "wasm"
    assert meta["sha256"] == _api_sha256(module)
    assert meta["size"] == len(module)
    assert isinstance(meta["plugin_id"], str) and meta["plugin_id"]
    assert meta["deployed_at"].endswith("Z")
    deployed = datetime.datetime.fromisoformat(meta["deployed_at"].replace("Z", "+00:00"))
    assert deployed.utcoffset() == datetime.timedelta(0)
    assert before - datetime.timedelta(seconds=1) <= deployed <= after + datetime.timedelta(seconds=1)


def test_api_deploy_name_and_plugin_type_parameters(client):
    meta = deploy(client, "mydb/public/users", wat(ECHO_WAT), name="my-plugin", plugin_type="wasm").json
    assert (meta["name"], meta["plugin_type"]) == ("my-plugin", "wasm")
    listed = client.get("/mydb/_plugins", headers=AUTH).json
    assert [(p["name"], p["path"]) for p in listed] == [("my-plugin", "mydb/public/users")]


def test_api_redeploy_replaces(client):
    first = deploy(client, "db/s/t", answer_module(b"one")).json
    assert invoke(client, "db/s/t/f").body == b"one"
    second = deploy(client, "db/s/t", answer_module(b"two")).json
    assert second["plugin_id"] != first["plugin_id"] and second["sha256"] != first["sha256"]
    assert invoke(client, "db/s/t/f").body == b"two"
    listed = client.get("/db/_plugins", headers=AUTH).json
    assert len(listed) == 1 and listed[0]["sha256"] == second["sha256"]


@pytest.mark.parametrize("body, params, fragment", [
    (b"", {}, "empty"),
    (None, {"plugin_type": "js"}, "plugin_type"),
    (bytes(random.Random(2).randrange(256) for _ in range(300)), {}, "not a valid WebAssembly"),
    (b"\0asm\x01\0\0\0garbage", {}, "not a valid WebAssembly"),
])
def test_api_deploy_rejects_bad_bodies(client, body, params, fragment):
    response = deploy(client, "db/s/t", wat(ECHO_WAT) if body is None else body, status=400, **params)
    assert fragment in _api_error(response)
    assert client.get("/db/_plugins", headers=AUTH).json == []


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
def test_api_deploy_rejects_modules_off_the_abi(client, module, fragment):
    assert fragment in _api_error(deploy(client, "db/s/t", wat(module), status=400))
    assert client.get("/db/_plugins", headers=AUTH).json == []


def test_api_deploy_names_every_unsupported_import(client):
    module = wat('(module (import "env" "foo" (func)) (import "wasi_snapshot_preview1" "fd_write"'
                 ' (func (param i32 i32 i32 i32) (result i32))) (memory (export "memory") 1)'
                 ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    error = _api_error(deploy(client, "db/s/t", module, status=400))
    assert "env.foo" in error and "wasi_snapshot_preview1.fd_write" in error


def test_api_deploy_accepts_every_host_import(client):
    module = wat(f"""
(module
{_API_ALL_HOST_IMPORTS}
  (memory (export "memory") 1)
  (data (i32.const 4096) "ok")
  (func (export "handle") (param i32 i32) (result i64) (i64.const 0x0000100000000002)))
""")
    deploy(client, "db/s/t", module)
    assert invoke(client, "db/s/t/f").body == b"ok"


def test_api_deploy_does_not_run_the_start_function(client):
    module = wat('(module (memory (export "memory") 1) (func $boom unreachable) (start $boom)'
                 ' (func (export "handle") (param i32 i32) (result i64) (i64.const 0)))')
    deploy(client, "db/s/t", module)
    assert "unreachable" in _api_error(invoke(client, "db/s/t/f", status=500))


def test_api_deploy_over_the_size_limit_is_413(tmp_path):
    client, _ = make_app(tmp_path, max_module_size=64)
    module = wat(ECHO_WAT)
    assert len(module) > 64
    assert "limit" in _api_error(deploy(client, "db/s/t", module, status=413))


@pytest.mark.parametrize("path", [
    "_x/s/t", "db/_s/t", "db/s/_t",                  # '_' is reserved for system routes
    "db/%2E%2E/t", "db/s/%2E", "db/s/..",            # '..' and '.'
    "d%40b/s/t", "db/s%20x/t", "db/s/t%3Bu",         # '@', space, ';'
    "db/s/" + "t" * 200, "db/s/t%C3%A9",             # too long, non-ASCII
])
def test_api_deploy_rejects_invalid_segments(client, path):
    response = client.put(f"/{path}/_deploy", wat(ECHO_WAT), headers=AUTH, status=400)
    assert "invalid" in _api_error(response)
    assert client.get("/db/_plugins", headers=AUTH).json == []
    assert not (client.app.config["aeordb.settings"].data_dir / "plugins").exists() or \
        not any((client.app.config["aeordb.settings"].data_dir / "plugins").rglob("plugin.json"))


def test_api_deploy_with_an_encoded_slash_is_refused(client):
    response = client.put("/db/s/t%2Fu/_deploy", wat(ECHO_WAT), headers=AUTH, expect_errors=True)
    assert response.status_int in (400, 404) and "error" in response.json
    assert client.get("/db/_plugins", headers=AUTH).json == []


@pytest.mark.parametrize("name", ["n" * 129, "a%0Ab", "a%00b"])
def test_api_deploy_rejects_bad_names(client, name):
    assert "name" in _api_error(deploy(client, "db/s/t", wat(ECHO_WAT), status=400, name=name))


def test_api_deploy_accepts_free_text_names(client):
    assert deploy(client, "db/s/t", wat(ECHO_WAT), name="My%20Plugin%20%C3%A9").json["name"] == "My Plugin é"


def test_api_rejected_redeploy_keeps_the_old_plugin(tmp_path):
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


def test_api_segment_length_boundary(client):
    deploy(client, "db/s/" + "t" * 128, wat(ECHO_WAT))
    deploy(client, "db/s/" + "t" * 129, wat(ECHO_WAT), status=400)


@pytest.mark.parametrize("method, path", [
    ("POST", "/db/s/t/_f/_invoke"), ("POST", "/db/s/t/f%40/_invoke"),
    ("DELETE", "/db/s/t/_f/_remove"), ("GET", "/_db/_plugins"), ("GET", "/d%20b/_plugins"),
])
def test_api_invalid_segments_on_other_routes(client, method, path):
    response = client.request(path, method=method, headers=AUTH, expect_errors=True)
    assert response.status_int == 400 and "invalid" in _api_error(response)


# -- invoke, list, remove, health -------------------------------------------------

def test_api_invoke_unknown_plugin_is_404(client):
    assert "db/s/t" in _api_error(invoke(client, "db/s/t/f", b"x", status=404))


def test_api_invoke_over_the_request_limit_is_413(tmp_path):
    client, _ = make_app(tmp_path, max_request_size=10)
    deploy(client, "db/s/t", wat(ECHO_WAT))
    invoke(client, "db/s/t/f", b"0123456789")
    assert "limit" in _api_error(invoke(client, "db/s/t/f", b"0123456789a", status=413))


def test_api_list_is_scoped_to_one_database(client):
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


def test_api_list_does_not_mix_databases_sharing_a_prefix(client):
    deploy(client, "ab/s/t", wat(ECHO_WAT))
    assert client.get("/a/_plugins", headers=AUTH).json == []
    assert [p["path"] for p in client.get("/ab/_plugins", headers=AUTH).json] == ["ab/s/t"]


def test_api_remove(client):
    deploy(client, "db/schema/table", wat(ECHO_WAT))
    deploy(client, "db/schema/other", wat(ECHO_WAT))
    response = client.delete("/db/schema/table/anything/_remove", headers=AUTH, status=200)
    assert response.json == {"removed": True, "path": "db/schema/table"}
    assert "db/schema/table" in _api_error(
        client.delete("/db/schema/table/anything/_remove", headers=AUTH, status=404))
    invoke(client, "db/schema/table/f", status=404)
    assert [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json] == ["db/schema/other"]
    invoke(client, "db/schema/other/f")


def test_api_remove_unknown_is_404(client):
    assert "error" in client.delete("/db/s/t/f/_remove", headers=AUTH, status=404).json


def test_api_health_needs_no_auth(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.get("/_health", headers=headers, status=200)
        assert response.json == {"status": "ok"}


def test_api_unknown_route_is_json_404(client):
    response = client.get("/db/s/t/f/_nothing", headers=AUTH, status=404)
    assert "error" in response.json


# -- auth on every route -----------------------------------------------------------

_API_BAD_AUTH = [
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

_API_ROUTES = [
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


@pytest.mark.parametrize("method, path, body", _API_ROUTES, ids=[f"{m} {p}" for m, p, _ in _API_ROUTES])
def test_api_auth_required_on_every_route(client, method, path, body):
    # Everything the route could touch exists, so only the token stands in the way.
    deploy(client, "db/s/t", answer_module(b"original"))
    client.put("/db/_files/a.txt", b"original", headers=AUTH)
    payload = bytes(wat(ECHO_WAT)) if body == "module" else body
    for authorization in _API_BAD_AUTH:
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


# -- request envelope ----------------------------------------------------------------

def test_api_request_envelope_carries_every_byte(client):
    data = bytes(range(256))
    assert _api_envelope(client, data)["arguments"] == list(range(256))


def test_api_request_envelope_empty_body(client):
    assert _api_envelope(client, b"")["arguments"] == []


def test_api_request_envelope_metadata(client):
    envelope = _api_envelope(client, b"{}", query="a=1&b=two",
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


def test_api_request_envelope_metadata_without_query_or_content_type(client):
    deploy(client, "db/schema/table", wat(ECHO_WAT))
    metadata = json.loads(client.post("/db/schema/table/f/_invoke", headers=AUTH, status=200).body)["metadata"]
    assert metadata["query_string"] == ""
    assert all(isinstance(v, str) for v in metadata.values())


def test_api_request_is_placed_with_alloc(client):
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


# -- response envelope ---------------------------------------------------------------

def test_api_response_envelope_byte_array_body(client):
    response = _api_answer(client, b'{"status_code":201,"content_type":"text/plain; charset=utf-8",'
                                   b'"headers":{"x-custom":"yes"},"body":[72,105]}', status=201)
    assert response.body == b"Hi"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["x-custom"] == "yes"


def test_api_response_envelope_string_body(client):
    response = _api_answer(client, '{"status_code":200,"content_type":"text/plain","body":"héllo"}'.encode())
    assert response.body == "héllo".encode("utf-8")
    assert response.content_type == "text/plain"


@pytest.mark.parametrize("status", [200, 202, 204, 302, 404, 418, 503, 599])
def test_api_response_envelope_statuses_pass_through(client, status):
    body = b"[]" if status in (204,) else b"[111,107]"
    response = _api_answer(client, b'{"status_code":%d,"body":%s}' % (status, body), status=status)
    assert response.body == (b"" if status == 204 else b"ok")


@pytest.mark.parametrize("content_type", ["", ',"content_type":null', ',"content_type":""'])
def test_api_response_envelope_default_content_type(client, content_type):
    response = _api_answer(client, b'{"status_code":200%s,"body":[1]}' % content_type.encode())
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.body == b"\x01"


def test_api_response_envelope_safe_headers_only(client):
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
    response = _api_answer(client, raw)
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
def test_api_response_fallback_to_raw(client, raw):
    response = _api_answer(client, raw)
    assert response.status_int == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.body == raw


@pytest.mark.parametrize("code", [99, 0, -200, 600, 1000])
def test_api_response_status_out_of_range_is_500(client, code):
    response = _api_answer(client, b'{"status_code":%d,"body":[1]}' % code, status=500)
    assert str(code) in _api_error(response)


def test_api_echo_answers_its_own_envelope_verbatim(client):
    deploy(client, "db/s/t", wat(ECHO_WAT))
    response = invoke(client, "db/s/t/f", b"hi")
    assert response.content_type == "application/octet-stream"
    assert response.body.startswith(b'{"arguments":')


@pytest.mark.parametrize("size", [16 * 1024 - 100, 16 * 1024, 100 * 1024, 1024 * 1024])
def test_api_large_body_round_trip(client, size):
    deploy(client, "db/s/t", wat(_API_BODY_ECHO_WAT))
    data = random.Random(size).randbytes(size - 3) + b"\0\xff]"
    response = invoke(client, "db/s/t/f", data)
    assert response.content_type == "application/octet-stream"
    assert len(response.body) == len(data) and response.body == data
    if size >= 16 * 1024:   # such answers went through the WASM codec, not json.loads
        codec = client.app.config["aeordb.runtime"].codec
        assert getattr(codec._local, "state", None) is not None


def test_api_large_answer_with_nested_body_key_first(client):
    data = random.Random(7).randbytes(12 * 1024)
    raw = (b'{"status_code":202,"content_type":"application/x-test","meta":{"body":[1,2,3],'
           b'"note":"\\"body\\":[9]"},"headers":{"x-n":"1"},"body":' + json.dumps(list(data)).encode() + b"}")
    assert len(raw) > 16 * 1024
    response = _api_answer(client, raw, status=202)
    assert response.body == data
    assert response.content_type == "application/x-test"
    assert response.headers["x-n"] == "1"


@pytest.mark.parametrize("bad", [b"256", b"-1", b"1.0", b"01", b"[1]", b'"a"', b"1 2", b"", b"true"])
def test_api_large_answer_with_bad_byte_falls_back_to_raw(client, bad):
    values = b",".join([b"65"] * 6000 + ([bad] if bad else [b""]) + [b"66"])
    raw = b'{"status_code":200,"content_type":"text/plain","body":[' + values + b"]}"
    assert len(raw) > 16 * 1024
    response = _api_answer(client, raw)
    assert response.content_type == "application/octet-stream"
    assert response.body == raw


def test_api_large_answer_with_body_twice_uses_json_semantics(client):
    # Duplicate keys: json.loads keeps the last one; the fast path must not disagree.
    first = b",".join([b"1"] * 9000)
    raw = b'{"status_code":200,"body":[' + first + b'],"body":[104,105]}'
    assert len(raw) > 16 * 1024
    assert _api_answer(client, raw).body == b"hi"


# -- persistence and on-disk layout --------------------------------------------------

def test_api_plugins_survive_a_new_app(tmp_path):
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


def test_api_on_disk_layout_is_ordinary_files(tmp_path):
    client, _ = make_app(tmp_path)
    old = answer_module(b"old")
    deploy(client, "db/s/t", old)
    module = answer_module(b"new")
    meta = deploy(client, "db/s/t", module).json
    folder = tmp_path / "plugins" / "db" / "s" / "t"
    assert json.loads((folder / "plugin.json").read_text()) == meta
    sha = _api_sha256(module)
    assert (folder / f"module-{sha}.wasm").read_bytes() == module
    assert sorted(p.name for p in folder.iterdir()) == ["module-" + sha + ".wasm", "plugin.json"]
    artifacts = list((tmp_path / "cache").glob(f"{sha}-*.cwasm"))
    assert len(artifacts) == 1 and artifacts[0].stat().st_size > 0

    client.delete("/db/s/t/f/_remove", headers=AUTH)
    assert not folder.exists()


def test_api_copied_plugin_folder_is_loaded(tmp_path):
    # An operator can back up and copy plugins as files.
    client, _ = make_app(tmp_path / "one")
    meta = deploy(client, "db/s/t", answer_module(b"copied")).json
    import shutil
    shutil.copytree(tmp_path / "one" / "plugins", tmp_path / "two" / "plugins")
    other, _ = make_app(tmp_path / "two")
    assert other.get("/db/_plugins", headers=AUTH).json == [meta]
    assert invoke(other, "db/s/t/f").body == b"copied"


def _api_flip_middle(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:]


@pytest.mark.parametrize("damage", ["garbage", "payload-end", "payload-middle", "truncate", "empty"])
def test_api_damaged_artifact_is_recompiled(tmp_path, damage):
    client, _ = make_app(tmp_path)
    module = answer_module(b"still works")
    deploy(client, "db/s/t", module)
    sha = _api_sha256(module)
    [artifact] = (tmp_path / "cache").glob(f"{sha}-*.cwasm")
    blob = artifact.read_bytes()
    damaged = {"garbage": os.urandom(len(blob)),
               "payload-end": blob[:-200] + bytes(b ^ 0xFF for b in blob[-200:]),
               # wasmtime itself may accept this one: only our hash notices it
               "payload-middle": _api_flip_middle(blob),
               "truncate": blob[:len(blob) // 2],
               "empty": b""}[damage]
    artifact.write_bytes(damaged)

    again, _ = make_app(tmp_path)
    # Detected at start: the artifact was rebuilt before anything ran from it.
    repaired = artifact.read_bytes()
    assert repaired != damaged and repaired.startswith(aeordb.ARTIFACT_MAGIC)
    header = len(aeordb.ARTIFACT_MAGIC) + 64
    assert repaired[len(aeordb.ARTIFACT_MAGIC):header].decode() == _api_sha256(repaired[header:])
    assert invoke(again, "db/s/t/f").body == b"still works"


def test_api_missing_artifact_is_recompiled(tmp_path):
    client, _ = make_app(tmp_path)
    deploy(client, "db/s/t", answer_module(b"fine"))
    for artifact in (tmp_path / "cache").glob("*.cwasm"):
        artifact.unlink()
    again, _ = make_app(tmp_path)
    assert invoke(again, "db/s/t/f").body == b"fine"
    assert list((tmp_path / "cache").glob("*.cwasm"))


def test_api_tampered_module_file_is_not_loaded(tmp_path):
    client, _ = make_app(tmp_path)
    module = answer_module(b"original")
    deploy(client, "db/s/t", module)
    deploy(client, "db/s/u", answer_module(b"other"))
    sha = _api_sha256(module)
    for artifact in (tmp_path / "cache").glob(f"{sha}-*.cwasm"):
        artifact.unlink()
    (tmp_path / "plugins" / "db" / "s" / "t" / f"module-{sha}.wasm").write_bytes(answer_module(b"evil"))
    again, _ = make_app(tmp_path)
    invoke(again, "db/s/t/f", status=404)
    assert invoke(again, "db/s/u/f").body == b"other"


# -- runaway plugins -----------------------------------------------------------------

def test_api_endless_loop_hits_the_time_limit(tmp_path):
    client, _ = make_app(tmp_path, timeout=0.5)
    deploy(client, "db/s/loop", wat(_API_LOOP_WAT))
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    started = time.monotonic()
    error = _api_error(invoke(client, "db/s/loop/f", status=500))
    elapsed = time.monotonic() - started
    assert "time limit" in error and "0.5" in error
    assert 0.4 <= elapsed < 5
    assert json.loads(invoke(client, "db/s/echo/f", b"ok").body)["arguments"] == [111, 107]
    assert "time limit" in _api_error(invoke(client, "db/s/loop/f", status=500))


def test_api_memory_bomb_hits_the_memory_limit(tmp_path):
    client, _ = make_app(tmp_path, memory_limit=4 * 1024 * 1024)
    deploy(client, "db/s/bomb", wat(_API_BOMB_WAT))
    deploy(client, "db/s/echo", wat(ECHO_WAT))
    error = _api_error(invoke(client, "db/s/bomb/f", status=500))
    assert "memory limit" in error
    assert json.loads(invoke(client, "db/s/echo/f", b"ok").body)["arguments"] == [111, 107]


def test_api_trap_is_a_500_with_the_reason(client):
    deploy(client, "db/s/t", wat('(module (memory (export "memory") 1)'
                                  ' (func (export "handle") (param i32 i32) (result i64)'
                                  ' (i64.extend_i32_s (i32.div_s (i32.const 1) (i32.const 0)))))'))
    assert "division by zero" in _api_error(invoke(client, "db/s/t/f", status=500))


def test_api_bad_answer_pointer_is_a_500(client):
    deploy(client, "db/s/t", wat('(module (memory (export "memory") 1)'
                                  ' (func (export "handle") (param i32 i32) (result i64)'
                                  ' (i64.const 0x0000FFFF00000010)))'))
    assert "pointer" in _api_error(invoke(client, "db/s/t/f", status=500))


# -- a real server -------------------------------------------------------------------

def test_api_real_server_round_trip(tmp_path):
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


def test_api_help_documents_the_options():
    result = subprocess.run([sys.executable, str(HERE / "aeordb.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for word in ("--data-dir", "--token", "--port", "--host", "--threads", "--timeout",
                 "--memory-limit", "AEORDB_PORT", "AEORDB_TOKEN", "AEORDB_DATA_DIR"):
        assert word in result.stdout, word


# -- the generated token -------------------------------------------------------------

def test_api_token_generated_once_and_kept(tmp_path):
    app = aeordb.create_app(aeordb.Settings(data_dir=tmp_path, token=None))
    token = app.config["aeordb.token"]
    token_file = tmp_path / "token"
    assert app.config["aeordb.token_created"] is True
    assert len(token) >= 32
    assert token_file.read_text().strip() == token
    assert token_file.stat().st_mode & 0o777 == 0o600

    again = aeordb.create_app(aeordb.Settings(data_dir=tmp_path, token=None))
    assert again.config["aeordb.token"] == token
    assert again.config["aeordb.token_created"] is False

    client = webtest.TestApp(again)
    client.get("/db/_plugins", headers={"Authorization": f"Bearer {token}"}, status=200)
    response = client.get("/db/_plugins", headers=AUTH, status=401)
    assert token not in response.text


def test_api_tokens_differ_between_data_dirs(tmp_path):
    one = aeordb.create_app(aeordb.Settings(data_dir=tmp_path / "a", token=None)).config["aeordb.token"]
    two = aeordb.create_app(aeordb.Settings(data_dir=tmp_path / "b", token=None)).config["aeordb.token"]
    assert one != two


def test_api_configured_token_writes_no_file(tmp_path):
    app = aeordb.create_app(aeordb.Settings(data_dir=tmp_path, token=TOKEN))
    assert app.config["aeordb.token"] == TOKEN and app.config["aeordb.token_created"] is False
    assert not (tmp_path / "token").exists()


def test_api_copied_plugin_folder_takes_the_path_of_its_folder(tmp_path):
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


class _ApiGatedLock:
    """Stands in for the registry lock: the first thread to take it runs ``gate(self)`` first.

    ``waiting`` is set when another thread asks for the lock meanwhile.
    """

    def __init__(self, lock, gate):
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


def _api_wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.002)


def _api_restart_without_cache(tmp_path):
    """A new app on ``tmp_path`` that must load every plugin from plugins/ alone."""
    import shutil
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    return make_app(tmp_path)[0]


def test_api_concurrent_redeploys_leave_a_loadable_plugin(tmp_path):
    # A deploy that commits first must not delete the module file of a deploy still in flight.
    client, app = make_app(tmp_path)
    registry = app.config["aeordb.registry"]
    first, second = answer_module(b"first"), answer_module(b"second")
    second_file = tmp_path / "plugins" / "db" / "s" / "t" / f"module-{_api_sha256(second)}.wasm"
    registry._lock = _ApiGatedLock(registry._lock, lambda lock: _api_wait(
        lambda: second_file.exists() or lock.waiting.is_set()))

    results = {}
    def run(label, module):
        results[label] = registry.deploy("db", "s", "t", module, "t", "wasm")
    threads = [threading.Thread(target=run, args=("first", first))]
    threads[0].start()
    _api_wait(lambda: registry._lock.first is not None or not threads[0].is_alive())
    threads.append(threading.Thread(target=run, args=("second", second)))
    threads[1].start()
    for thread in threads:
        thread.join(timeout=20)
    assert set(results) == {"first", "second"}

    answer = invoke(client, "db/s/t/f").body
    assert answer in (b"first", b"second")
    meta = json.loads((tmp_path / "plugins" / "db" / "s" / "t" / "plugin.json").read_text())
    assert (tmp_path / "plugins" / "db" / "s" / "t" / f"module-{meta['sha256']}.wasm").exists()
    assert invoke(_api_restart_without_cache(tmp_path), "db/s/t/f").body == answer


def test_api_remove_during_a_deploy_leaves_a_consistent_registry(tmp_path):
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
        _api_wait(lambda: removed.is_set() or lock.waiting.is_set())
    registry._lock = _ApiGatedLock(registry._lock, remove_in_between)
    registry.deploy("db", "s", "t", new, "t", "wasm")
    assert removed.wait(timeout=10)
    live = [p["path"] for p in client.get("/db/_plugins", headers=AUTH).json]
    assert sorted(p.name for p in folder.glob("*")) == \
        (["module-" + _api_sha256(new) + ".wasm", "plugin.json"] if live else [])
    again = _api_restart_without_cache(tmp_path)
    assert [p["path"] for p in again.get("/db/_plugins", headers=AUTH).json] == live


# Runtime paths ################################################################
# The fast guest path (below wasmtime-py's public API) and the public-API
# fallback must behave the same; so must pooled and on-demand allocation.

RUNTIME_PATHS = [
    pytest.param({"fast_calls": True, "pooling": True}, id="fast-pooled"),
    pytest.param({"fast_calls": False, "pooling": True}, id="public-pooled"),
    pytest.param({"fast_calls": False, "pooling": False}, id="public-ondemand"),
]

_ENV_MEMORY_ECHO_WAT = """
(module
  (import "env" "memory" (memory 1))
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
"""

_ALLOC_ECHO_WAT = f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
"""


def _runtime_client(tmp_path, options, **settings):
    app = aeordb.create_app(aeordb.Settings(data_dir=tmp_path, token=TOKEN, **settings), **options)
    return webtest.TestApp(app), app


@pytest.mark.parametrize("options", RUNTIME_PATHS)
def test_runtime_paths_agree(tmp_path, options):
    client, app = _runtime_client(tmp_path, options, timeout=0.5)
    expected_ops = aeordb.FastGuestOps if options["fast_calls"] else aeordb.GuestOps
    assert type(app.config["aeordb.runtime"].wasm.ops) is expected_ops
    body = bytes(range(256)) * 3

    deploy(client, "db/s/plain", wat(ECHO_WAT))
    deploy(client, "db/s/alloc", wat(_ALLOC_ECHO_WAT))
    deploy(client, "db/s/envmem", wat(_ENV_MEMORY_ECHO_WAT))
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
    deploy(client, "db/s/trap", wat('(module (memory (export "memory") 1)'
                                    ' (func (export "handle") (param i32 i32) (result i64) unreachable))'))
    assert "unreachable" in invoke(client, "db/s/trap/f", status=500).json["error"]
    deploy(client, "db/s/loop", wat('(module (memory (export "memory") 1)'
                                    ' (func (export "handle") (param i32 i32) (result i64)'
                                    ' (loop $l (br $l)) (i64.const 0)))'))
    assert "time limit" in invoke(client, "db/s/loop/f", status=500).json["error"]
    # ...and the plugin after them still works.
    assert bytes(json.loads(invoke(client, "db/s/alloc/f", b"ok").body)["arguments"]) == b"ok"


def test_fast_path_is_feature_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(aeordb.FastGuestOps, "_NEEDS", ("no_such_wasmtime_symbol",))
    assert not aeordb.FastGuestOps.available()
    # A fresh engine key, so the detection runs again for this app.
    client, app = _runtime_client(tmp_path, {"fast_calls": True, "pooling": False}, memory_limit=32 << 20)
    assert type(app.config["aeordb.runtime"].wasm.ops) is aeordb.GuestOps
    deploy(client, "db/s/t", wat(ECHO_WAT))
    assert json.loads(invoke(client, "db/s/t/f", b"x").body)["arguments"] == [120]


def test_example_plugin_matches_its_source_and_runs(client, caplog):
    example = HERE / "examples"
    assert (example / "hello.wasm").read_bytes() == wat((example / "hello.wat").read_text())
    deploy(client, "mydb/public/users", (example / "hello.wasm").read_bytes(), name="hello")
    with caplog.at_level("INFO", logger="aeordb.plugin"):
        answer = invoke(client, "mydb/public/users/greet", b'{"input": "hello"}')
    assert answer.json == {"hello": "world"}
    assert answer.headers["x-plugin"] == "hello"
    assert any("[mydb/public/users] hello plugin invoked" in r.getMessage() for r in caplog.records)
