#!/usr/bin/env python3
"""Checks the built example plugins against a real aeordb.py (stdlib only).

    python examples/check_examples.py [language ...]     (default: every examples/<lang>/)

Starts ``python aeordb.py`` on a free 127.0.0.1 port with a temporary data
directory and a token, deploys each ``examples/<lang>/echo.wasm`` and
``notes.wasm`` through the HTTP API (each language in its own database) and
checks the behaviour of ../examples/README.md: echo of text, of an empty
body and of 1 MiB of random bytes; notes add/list/unknown, JSON escaping, the
x-plugin-language header and the one log line per call. A module the server
refuses because it imports WASI is reported "skipped: server lacks WASI"
(aeordb.py gains WASI later; the check then runs by itself), and likewise a
module importing anything else the server does not provide yet (env.abort,
aeordb_set_response). Exit status 1 when any check fails.
"""
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "check-examples-token-0123456789"
LANGUAGES = ["zig", "c", "rust", "go", "assemblyscript"]


class Server:
    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="aeordb-examples-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = os.path.join(self.tmp.name, "server.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "aeordb.py"), "--port", str(self.port),
             "--data-dir", os.path.join(self.tmp.name, "data"), "--token", TOKEN],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise SystemExit("aeordb.py did not start:\n" + open(self.log_path).read())

    def request(self, method, path, body=b"", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        all_headers = {"Authorization": "Bearer " + TOKEN}
        all_headers.update(headers or {})
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def log_text(self):
        self.log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.tmp.cleanup()


class Checker:
    def __init__(self, server, lang):
        self.server, self.lang, self.failures = server, lang, []

    def expect(self, what, ok, detail=""):
        if not ok:
            self.failures.append(f"{what}{': ' + detail if detail else ''}")

    def deploy(self, name, wasm):
        with open(wasm, "rb") as f:
            status, _, body = self.server.request("PUT", f"/{self.lang}db/public/{name}/_deploy", f.read())
        if status == 400 and b"does not provide" in body:
            if b"wasi_snapshot_preview1" in body:
                return "skipped: server lacks WASI"
            missing = body.decode("utf-8", "replace").split("does not provide:", 1)[1].strip(' "}')
            return "skipped: server lacks " + missing
        self.expect(f"deploy {name}", status == 200, f"{status} {body[:300]!r}")
        return None if status == 200 else "deploy failed"

    def invoke(self, name, function, body=b"", content_type=None):
        headers = {"Content-Type": content_type} if content_type else {}
        status, headers, data = self.server.request(
            "POST", f"/{self.lang}db/public/{name}/{function}/_invoke", body, headers)
        self.expect(f"{name}/{function} x-plugin-language", headers.get("x-plugin-language") == self.lang,
                    repr(headers.get("x-plugin-language")))
        return status, headers, data

    def echo(self):
        status, headers, data = self.invoke("echo", "any", b"hello", "text/plain")
        self.expect("echo text", (status, data) == (200, b"hello"), f"{status} {data[:200]!r}")
        self.expect("echo text content type", headers.get("content-type", "").startswith("text/plain"),
                    headers.get("content-type"))
        status, headers, data = self.invoke("echo", "any")
        self.expect("echo empty", (status, data) == (200, b""), f"{status} {data[:200]!r}")
        self.expect("echo empty content type", headers.get("content-type") == "application/octet-stream",
                    headers.get("content-type"))
        blob = random.Random(7).randbytes(1 << 20)
        started = time.time()
        status, headers, data = self.invoke("echo", "any", blob, "application/octet-stream")
        took = time.time() - started
        self.expect("echo 1 MiB binary", status == 200 and data == blob,
                    f"{status} {len(data)} bytes {data[:200]!r}")
        return f"1 MiB echo {took:.2f} s"

    def notes(self):
        def note(status, data):
            try:
                return status, json.loads(data)
            except ValueError:
                return status, data
        compact = lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        texts = ["hi", 'quote " backslash \\ tab \t nl \n ctl \x01 é ✓ 😀']
        for seq, text in enumerate(texts, 1):
            status, headers, data = self.invoke("notes", "add", json.dumps({"text": text}).encode(),
                                                "application/json")
            want = compact({"seq": seq, "text": text})
            self.expect(f"notes add {seq}", (status, data) == (201, want), f"{status} {data!r} != {want!r}")
            self.expect("notes add content type", headers.get("content-type") == "application/json",
                        headers.get("content-type"))
        for bad in [b'{"txt":"x"}', b'{"text":3}', b"[1]", b"not json", b""]:
            status, _, data = self.invoke("notes", "add", bad, "application/json")
            self.expect(f"notes add {bad!r}", note(status, data) == (
                400, {"error": "body must be a JSON object with a string 'text'"}), f"{status} {data!r}")
        status, headers, data = self.invoke("notes", "list")
        want = {"notes": [{"seq": 2, "text": texts[1]}, {"seq": 1, "text": texts[0]}]}
        self.expect("notes list", note(status, data) == (200, want), f"{status} {data!r}")
        self.expect("notes list content type", headers.get("content-type") == "application/json",
                    headers.get("content-type"))
        status, headers, data = self.invoke("notes", "nope")
        self.expect("notes unknown", note(status, data) == (404, {"error": "unknown function 'nope'"}),
                    f"{status} {data!r}")
        self.expect("notes unknown content type", headers.get("content-type") == "application/json",
                    headers.get("content-type"))
        time.sleep(0.2)
        lines = re.findall(rf"\[{self.lang}db/public/notes(?: request=\S+)?\] (.*)", self.server.log_text())
        self.expect("notes logs one line per call (9 calls)", len(lines) == 9, repr(lines))
        for want in ["notes: add seq=1", "notes: add seq=2", "notes: list 2", "notes: unknown nope"]:
            self.expect(f"notes log {want!r}", want in lines, repr(lines))
        return None


def main(argv):
    langs = argv or [l for l in LANGUAGES if os.path.isdir(os.path.join(HERE, l))]
    server = Server()
    failed = False
    try:
        for lang in langs:
            for example in ("echo", "notes"):
                wasm = os.path.join(HERE, lang, example + ".wasm")
                if not os.path.exists(wasm):
                    print(f"{lang:15} {example:6} skipped: {os.path.relpath(wasm, ROOT)} not built")
                    continue
                checker = Checker(server, lang)
                skipped = checker.deploy(example, wasm)
                note = None
                if skipped is None:
                    note = getattr(checker, example)()
                if checker.failures:
                    failed = True
                    print(f"{lang:15} {example:6} FAILED")
                    for failure in checker.failures:
                        print(f"    {failure}")
                else:
                    size = os.path.getsize(wasm)
                    print(f"{lang:15} {example:6} {skipped or 'ok'} ({size} bytes{', ' + note if note else ''})")
    finally:
        server.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
