#!/usr/bin/env python3
"""Robustness benchmark of aeordb.py: how well a server withstands hostile plugins and clients.

    python bench/robustness.py                                  # every part, against ../aeordb.py
    python bench/robustness.py --aeordb /path/to/aeordb.py --only writelock,memory
    python bench/robustness.py --compare OLD.py NEW.py [--quick] # every part against both, side by side

Parts:

  hostquery  a plugin writes a file, then calls aeordb_query with a query that takes many
             seconds (900 'contains' terms over 600 documents of ~4 KiB); server --timeout 5.
             Elapsed and status of the invocation; does the file it wrote survive a failure?
  writelock  a plugin writes a file then loops until its 5 s limit (holding the write lock);
             meanwhile 16 writers PUT files and 3 clients loop over GET /_health, GET a file,
             and a read-only plugin. Latency per class; writer statuses.
  slowloris  (a) 150 connections dripping one header byte a second; (b) 100 complete
             POST /db/_query heads with a token and Content-Length 1000000 but no body;
             (c) the same without a token. A legitimate GET /_health every 0.5 s meanwhile.
  compile    deploy of a large module of dense code (~60 MiB; 16 MiB with --quick) while the
             server's RSS is sampled every 50 ms; then three such deploys at once.
  memory     (a) 32 concurrent 8 MiB invokes of a body-echo plugin, (b) 16 concurrent
             invokes answering 16 MiB each, (c) 16 concurrent 8 MiB invokes that trap:
             peak RSS, RSS afterwards, statuses.

Only the standard library and wasmtime (for wat2wasm) are needed. Every server runs on
127.0.0.1 in a temporary data directory, and is stopped (SIGTERM, then SIGKILL after 10 s)
and its directory removed at the end of its part.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
# The suite's WASM fixtures: the bench loads the modules the tests check.
from test_aeordb import (ALLOC_WAT, BODY_ECHO_WAT, free_port, sequence_module,  # noqa: E402
                         wat, write_step)
DEFAULT_AEORDB = HERE.parent / "aeordb.py"
TOKEN = "robustness-bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PARTS = ("hostquery", "writelock", "slowloris", "compile", "memory")
MiB = 1024 * 1024


# -- WASM modules ----------------------------------------------------------------

# Grows its memory by 16 MiB, fills it with 'A' and answers those 16 MiB raw.
BIG_ANSWER_WAT = f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $base i32)
    (local.set $base (i32.mul (memory.grow (i32.const 256)) (i32.const 65536)))
    (if (i32.lt_s (local.get $base) (i32.const 0)) (then unreachable))
    (memory.fill (local.get $base) (i32.const 65) (i32.const {16 * MiB}))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $base)) (i64.const 32)) (i64.const {16 * MiB}))))
"""

# Reads the request (its last byte), then traps.
TRAP_AFTER_READ_WAT = f"""
(module
  (memory (export "memory") 1)
  {ALLOC_WAT}
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (drop (i32.load8_u (i32.sub (i32.add (local.get $ptr) (local.get $len)) (i32.const 1))))
    unreachable))
"""


def leb_u(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def section(ident: int, payload: bytes) -> bytes:
    return bytes([ident]) + leb_u(len(payload)) + payload


def dense_module(size: int, variant: int = 0) -> bytes:
    """A valid module of about ``size`` bytes: handle plus many (i32) -> i32 functions, each a
    long chain of i32 arithmetic on its parameter and a few locals (cached in /tmp)."""
    cache = Path(tempfile.gettempdir()) / f"aeordb-bench-dense-{size}.wasm"
    if cache.exists():
        base = cache.read_bytes()
    else:
        func_code_size = 64 * 1024
        rng = random.Random(size)
        # One block: local.get 0; i32.const c; i32.add; local.tee 1; i32.const c; i32.mul;
        # local.get 1; i32.xor; i32.const c; i32.rotl; local.set 0   (stack-neutral)
        blocks = []
        for _ in range(256):
            c1, c2, c3 = rng.randrange(1, 63), rng.randrange(1, 63), rng.randrange(1, 31)
            blocks.append(bytes([0x20, 0x00, 0x41, c1, 0x6A, 0x22, 0x01, 0x41, c2, 0x6C,
                                 0x20, 0x01, 0x73, 0x41, c3, 0x77, 0x21, 0x00]))
        pattern = b"".join(blocks)
        code = (pattern * (func_code_size // len(pattern) + 1))[:func_code_size // 18 * 18]
        # locals: 1 group of 1 i32; the code; then local.get 0; end
        body = b"\x01\x01\x7F" + code + b"\x20\x00\x0B"
        body_entry = leb_u(len(body)) + body
        count = max(1, (size - 200) // len(body_entry))
        handle = b"\x00" + b"\x42\x00" + b"\x0B"      # no locals; i64.const 0; end
        types = section(1, b"\x02" + b"\x60\x02\x7F\x7F\x01\x7E" + b"\x60\x01\x7F\x01\x7F")
        funcs = section(3, leb_u(count + 1) + b"\x00" + b"\x01" * count)
        memory = section(5, b"\x01\x00\x01")
        exports = section(7, b"\x02" + b"\x06memory\x02\x00" + b"\x06handle\x00\x00")
        code_payload = bytearray(leb_u(count + 1))
        code_payload += leb_u(len(handle)) + handle
        code_payload += body_entry * count
        base = b"\x00asm\x01\x00\x00\x00" + types + funcs + memory + exports + section(10, bytes(code_payload))
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(base)
        tmp.replace(cache)
    # A custom section makes each variant a distinct module (no dedup/cache between deploys).
    return base + section(0, b"\x07variant" + f"{variant}-{time.time_ns()}".encode())


# -- Servers, requests, measurements -----------------------------------------------

class ServerCrashed(RuntimeError):
    """The server exited during its start, other than by refusing its options."""


class Server:
    """One aeordb.py server process on 127.0.0.1 in a temporary data directory."""

    def __init__(self, aeordb: str, *args: str):
        self.aeordb, self.args = aeordb, [str(a) for a in args]
        self.process = None
        self.tmp = None

    def __enter__(self) -> "Server":
        # aeordb.py may be mid-edit (a crash at start that is not a refused option, exit
        # status 2): wait and retry a few times.
        for attempt in range(4):
            try:
                return self._start()
            except ServerCrashed as exc:
                if attempt == 3:
                    raise RuntimeError(str(exc)) from None
                print(f"  server crashed at start ({exc}); retrying in 30 s", flush=True)
                time.sleep(30)

    def _start(self) -> "Server":
        self.tmp = Path(tempfile.mkdtemp(prefix="aeordb-robustness-"))
        self.port = free_port()
        self.log_path = self.tmp / "server.log"
        argv = [sys.executable, self.aeordb, "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.tmp / "data"), "--token", TOKEN, *self.args]
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=self.tmp,
                                                start_new_session=True)
            deadline = time.monotonic() + 60
            while True:
                if self.process.poll() is not None:
                    error = ServerCrashed if self.process.returncode != 2 else RuntimeError
                    raise error(f"server exited {self.process.returncode}: {self.log_tail()}")
                status, _, _ = call(self.port, "GET", "/_health", timeout=2, auth=False)
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy after 60 s: {self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def log_tail(self, n: int = 2) -> str:
        """The log's last n non-blank lines, on one line."""
        try:
            lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        return " | ".join([line for line in lines if line][-n:])[-400:]

    def __exit__(self, *exc) -> None:
        try:
            if self.process and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
        finally:
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def rss(self) -> float:
        """Resident set size in MiB (0 when unreadable)."""
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


class RssSampler:
    """Samples a server's RSS every 50 ms in a thread; .peak after the with-block."""

    def __init__(self, server: Server, interval: float = 0.05):
        self.server, self.interval = server, interval
        self.peak = 0.0
        self.samples = []
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            value = self.server.rss()
            self.samples.append(value)
            self.peak = max(self.peak, value)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.server.rss())


def call(port: int, method: str, path: str, body: bytes | None = None, *, timeout: float = 30.0,
         auth: bool = True, headers: dict | None = None):
    """One request on a fresh connection: (status or error name, body, elapsed seconds)."""
    all_headers = dict(AUTH if auth else {})
    all_headers.update(headers or {})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - start
    except (socket.timeout, TimeoutError):
        return "timeout", b"", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - every failure is a figure here
        return type(exc).__name__, b"", time.perf_counter() - start
    finally:
        conn.close()


def deploy(server: Server, path: str, module: bytes, timeout: float = 120.0):
    status, data, elapsed = call(server.port, "PUT", f"/{path}/_deploy", module, timeout=timeout)
    if status not in (200, 201):
        raise RuntimeError(f"deploy {path}: {status} {data[:300]!r}")
    return elapsed


def error_text(data: bytes, n: int = 70) -> str:
    try:
        text = json.loads(data).get("error", "")
    except Exception:  # noqa: BLE001
        text = data[:n].decode(errors="replace")
    text = " ".join(str(text).split())
    return text[:n] + ("..." if len(text) > n else "")


def pct(values, q: float):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def secs(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


def mib(value) -> str:
    return f"{value:.0f} MiB"


def counts(statuses) -> str:
    c = collections.Counter(str(s) for s in statuses)
    return " ".join(f"{k}:{v}" for k, v in sorted(c.items())) or "-"


def run_threads(n: int, target, *args) -> list:
    """Runs target(i, *args) in n threads at once; answers their results in order."""
    results = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            pass
        results[i] = target(i, *args)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- Parts ----------------------------------------------------------------------
# Each part takes (aeordb path, options) and answers an ordered list of (figure, value).

def part_hostquery(aeordb: str, opts) -> list:
    rows = []
    with Server(aeordb, "--timeout", "5") as server:
        letters = "abcdefghijklmnopqrstuvwxy"      # no 'z': every 'contains' term is tested
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        bad, start = [], time.perf_counter()
        try:
            for n in range(600):
                rng = random.Random(n)
                words = " ".join("".join(rng.choice(letters) for _ in range(rng.randrange(3, 9)))
                                 for _ in range(700))
                doc = json.dumps({"id": n, "title": f"document {n}", "text": words[:4000]}).encode()
                conn.request("PUT", f"/slow/_files/docs/{n}.json", body=doc,
                             headers={**AUTH, "Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status not in (200, 201):
                    bad.append(response.status)
        finally:
            conn.close()
        rows.append(("fill 600 docs", f"{secs(time.perf_counter() - start)}"
                     + (f" ({len(bad)} failed: {counts(bad)})" if bad else "")))
        query = {"path": "/docs", "where": {"or": [{"field": "text", "op": "contains", "value": f"z{n}"}
                                                   for n in range(900)]}}
        query_bytes = json.dumps(query).encode()
        rows.append(("query JSON size", f"{len(query_bytes)} B"))
        status, data, elapsed = call(server.port, "POST", "/slow/_query", query_bytes, timeout=180)
        rows.append(("POST /slow/_query directly", f"{status} in {secs(elapsed)}"
                     + ("" if status == 200 else f" ({error_text(data, 50)})")))
        # An SDK-like module (exports alloc: the host calls into the guest to place its answer)
        # and one without alloc (the host places the answer itself: no guest code after the query).
        for variant, alloc in (("no alloc", False), ("alloc", True)):
            marker = f"/marker-{variant.replace(' ', '-')}.txt"
            module = sequence_module([write_step(marker, b"written before the query"),
                                      ("aeordb_query", query_bytes)], alloc=alloc)
            table_name = "q" + ("a" if alloc else "n")
            deploy(server, f"slow/s/{table_name}", module)
            status, data, elapsed = call(server.port, "POST", f"/slow/s/{table_name}/run/_invoke", b"{}",
                                         timeout=180)
            rows.append((f"{variant}: invoke status", str(status)))
            rows.append((f"{variant}: invoke elapsed", secs(elapsed)))
            if status != 200:
                rows.append((f"{variant}: invoke error", error_text(data)))
            got, _, _ = call(server.port, "GET", f"/slow/_files{marker}", timeout=30)
            rows.append((f"{variant}: file written first exists",
                         {200: "yes", 404: "no"}.get(got, f"? ({got})")))
        health, _, health_elapsed = call(server.port, "GET", "/_health", timeout=10, auth=False)
        rows.append(("health after", f"{health} in {ms(health_elapsed)}"))
    return rows


def part_writelock(aeordb: str, opts) -> list:
    rows = []
    with Server(aeordb, "--timeout", "5", "--threads", "8") as server:
        port = server.port
        status, data, _ = call(port, "PUT", "/db/_files/r.txt", b"read me")
        if status not in (200, 201):
            raise RuntimeError(f"PUT r.txt: {status} {data[:200]!r}")
        deploy(server, "db/s/hold", sequence_module([write_step("/w/holder.txt", b"held")], tail="loop"))
        deploy(server, "db/s/reader", sequence_module([("aeordb_read_file", b'{"path": "/r.txt"}')]))
        status, data, _ = call(port, "POST", "/db/s/reader/f/_invoke", b"{}")
        if status != 200:
            raise RuntimeError(f"read-only plugin: {status} {data[:200]!r}")

        stop = threading.Event()
        latencies = collections.defaultdict(list)
        failures = collections.defaultdict(list)
        lock = threading.Lock()
        classes = [("health", "GET", "/_health", None, False),
                   ("file GET", "GET", "/db/_files/r.txt", None, True),
                   ("read-only invoke", "POST", "/db/s/reader/f/_invoke", b"{}", True)]

        def reader(i):
            k = i
            while not stop.is_set():
                name, method, path, body, auth = classes[k % 3]
                k += 1
                status, _, elapsed = call(port, method, path, body, timeout=30, auth=auth)
                with lock:
                    if status == 200:
                        latencies[name].append(elapsed)
                    else:
                        failures[name].append(status)

        holder = {}

        def hold():
            holder["status"], holder["data"], holder["elapsed"] = call(
                port, "POST", "/db/s/hold/f/_invoke", b"{}", timeout=60)

        writers = [None] * 16

        def write(i):
            writers[i] = call(port, "PUT", f"/db/_files/w/{i}.txt", f"writer {i}".encode(), timeout=60)

        reader_threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(3)]
        hold_thread = threading.Thread(target=hold, daemon=True)
        hold_thread.start()
        for t in reader_threads:
            t.start()
        time.sleep(0.3)
        writer_threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(16)]
        for t in writer_threads:
            t.start()
        hold_thread.join(70)
        for t in writer_threads:
            t.join(70)
        time.sleep(0.3)
        stop.set()
        for t in reader_threads:
            t.join(40)

        rows.append(("holder status", f"{holder.get('status')}"
                     + (f" ({error_text(holder.get('data', b''), 50)})" if holder.get("status") != 200 else "")))
        rows.append(("holder elapsed", secs(holder.get("elapsed"))))
        for name, *_ in classes:
            values = latencies[name]
            rows.append((f"{name}: n / failed", f"{len(values)} / {len(failures[name])}"
                         + (f" ({counts(failures[name])})" if failures[name] else "")))
            rows.append((f"{name}: p50 / p99 / max",
                         f"{ms(pct(values, 50))} / {ms(pct(values, 99))} / {ms(max(values) if values else None)}"))
            rows.append((f"{name}: over 200 ms / over 1 s",
                         f"{sum(1 for v in values if v > 0.2)} / {sum(1 for v in values if v > 1)}"))
        statuses = [w[0] if w else "none" for w in writers]
        buckets = collections.Counter()
        for s in statuses:
            buckets[s if s in (201, 503, 500) else ("200" if s == 200 else "other")] += 1
        rows.append(("writers 201/503/500/other",
                     f"{buckets[201]}/{buckets[503]}/{buckets[500]}/{buckets['other'] + buckets['200']}"
                     + (f" ({counts(statuses)})" if buckets["other"] or buckets["200"] else "")))
        errors = {error_text(w[1], 50) for w in writers if w and w[0] not in (200, 201)}
        if errors:
            rows.append(("writer errors", "; ".join(sorted(errors))[:120]))
        times = [w[2] for w in writers if w]
        rows.append(("writers latency min / max", f"{ms(min(times) if times else None)} / "
                                                   f"{ms(max(times) if times else None)}"))
    return rows


def attack(port: int, n: int, head: bytes, drip: bytes | None, duration: float, ready: threading.Event) -> dict:
    """Keeps n hostile connections open for duration seconds (reopening those the server closes).

    Each sends ``head``, then ``drip`` once a second if given; a connection the server
    closes (or that failed to connect) is reopened 1 s later. Answers closures (age of the
    connection when closed), first-byte latencies and statuses of what the server answered.
    """
    sel = selectors.DefaultSelector()
    conns = {}
    stats = {"opened": 0, "connect_failed": 0, "closed": [], "closed_at": [], "first_byte": [],
             "statuses": [], "still_open": 0}
    start = time.monotonic()
    end = start + duration

    def open_one():
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(head)
            s.setblocking(False)
        except OSError:
            stats["connect_failed"] += 1
            s.close()
            return
        stats["opened"] += 1
        conns[s] = {"t0": time.monotonic(), "first": None}
        sel.register(s, selectors.EVENT_READ)

    def close(s, by_server: bool):
        c = conns.pop(s)
        sel.unregister(s)
        s.close()
        if by_server:
            now = time.monotonic()
            stats["closed"].append(now - c["t0"])
            stats["closed_at"].append(now - start)
            if c["first"] is None:
                stats["statuses"].append("closed")

    try:
        for _ in range(n):
            open_one()
        ready.set()
        next_drip = time.monotonic() + 1
        reopen_at = []
        while time.monotonic() < end:
            for key, _ in sel.select(0.1):
                s = key.fileobj
                if s not in conns:
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    c = conns[s]
                    if c["first"] is None:
                        c["first"] = time.monotonic() - c["t0"]
                        stats["first_byte"].append(c["first"])
                        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
                        stats["statuses"].append(int(m.group(1)) if m else "garbage")
                    continue
                close(s, True)
            now = time.monotonic()
            if drip and now >= next_drip:
                next_drip += 1
                for s in list(conns):
                    try:
                        s.send(drip)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        close(s, True)
            # Keep n going: reopen what the server closed, 1 s after (a few per tick).
            now = time.monotonic()
            missing = n - len(conns) - len(reopen_at)
            reopen_at.extend([now + 1.0] * max(0, missing))
            due = [t for t in reopen_at if t <= now][:20]
            for t in due:
                reopen_at.remove(t)
                if now < end:
                    open_one()
    finally:
        ready.set()
        stats["still_open"] = len(conns)
        for s in list(conns):
            close(s, False)
        sel.close()
    return stats


def legit_loop(port: int, stop: threading.Event, out: dict, interval: float = 0.5) -> None:
    out.setdefault("ok", [])
    out.setdefault("failed", [])
    out.setdefault("t0", time.monotonic())
    next_at = time.monotonic()
    while not stop.is_set():
        sent = time.monotonic()
        status, _, elapsed = call(port, "GET", "/_health", timeout=5, auth=False)
        if status == 200:
            out["ok"].append(elapsed)
        else:
            out["failed"].append(status)
            out.setdefault("failed_at", []).append(sent - out["t0"])
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))


def part_slowloris(aeordb: str, opts) -> list:
    rows = []
    duration = 15 if opts.quick else 40
    cases = [
        ("a drip", 150, b"GET /_health HTTP/1.1\r\nHost: x\r\nX-a: ", b"b", True),
        ("b body", 100, (b"POST /db/_query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"), None, True),
        ("c noauth", 100, (b"POST /db/_query HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"), None, False),
    ]
    for label, n, head, drip, _ in cases:
        with Server(aeordb) as server:
            ready, stop, legit = threading.Event(), threading.Event(), {}
            result = {}

            attack_started = [time.monotonic()]

            def run_attack():
                result.update(attack(server.port, n, head, drip, duration, ready))

            attacker = threading.Thread(target=run_attack, daemon=True)
            attacker.start()
            ready.wait(60)
            legit["t0"] = attack_started[0]
            legit_thread = threading.Thread(target=legit_loop, args=(server.port, stop, legit), daemon=True)
            legit_thread.start()
            attacker.join(duration + 120)
            stop.set()
            legit_thread.join(10)
            ok, failed = legit.get("ok", []), legit.get("failed", [])
            rows.append((f"{label}: legit n / failed", f"{len(ok) + len(failed)} / {len(failed)}"
                         + (f" ({counts(failed)})" if failed else "")))
            if legit.get("failed_at"):
                rows.append((f"{label}: legit failures sent at (s)",
                             " ".join(f"{t:.0f}" for t in legit["failed_at"][:12])))
            rows.append((f"{label}: legit p50 / p99 / max",
                         f"{ms(pct(ok, 50))} / {ms(pct(ok, 99))} / {ms(max(ok) if ok else None)}"))
            closed = result.get("closed", [])
            rows.append((f"{label}: attackers opened / closed by server",
                         f"{result.get('opened', 0)} / {len(closed)}"
                         + (f" (connect failed {result['connect_failed']})" if result.get("connect_failed") else "")))
            if closed:
                rows.append((f"{label}: conn age at close p50 / max",
                             f"{secs(pct(closed, 50))} / {secs(max(closed))}"))
                rows.append((f"{label}: first close at", secs(min(result["closed_at"]))))
            first = result.get("first_byte", [])
            rows.append((f"{label}: answered / first byte p50 / max",
                         f"{len(first)} / {ms(pct(first, 50))} / {ms(max(first) if first else None)}"))
            statuses = result.get("statuses", [])
            if statuses:
                rows.append((f"{label}: answers", counts(statuses)))
    return rows


def part_compile(aeordb: str, opts) -> list:
    rows = []
    want = 16 * MiB if opts.quick else 60 * MiB
    cap = 104857600
    note = ""
    try:
        server = Server(aeordb, "--max-module-size", str(cap)).__enter__()
    except RuntimeError as exc:
        m = re.search(r"at most (\d+)", str(exc))
        if not m:
            raise
        cap = int(m.group(1))
        note = f"server refuses --max-module-size 104857600; its cap {cap} used"
        server = Server(aeordb, "--max-module-size", str(cap)).__enter__()
    try:
        size = min(want, cap - 64 * 1024)
        start = time.perf_counter()
        modules = [dense_module(size, v) for v in range(4)]
        generated = time.perf_counter() - start
        rows.append(("module size", f"{len(modules[0]) / MiB:.1f} MiB, server cap {cap} (generated/cached in {generated:.1f} s)"))
        if note:
            rows.append(("note", note))
        idle = server.rss()
        rows.append(("RSS idle", mib(idle)))
        with RssSampler(server) as sampler:
            status, data, elapsed = call(server.port, "PUT", "/db/s/t0/_deploy", modules[0], timeout=900)
        rows.append(("1 deploy: status", f"{status}" + ("" if status in (200, 201) else f" ({error_text(data)})")))
        rows.append(("1 deploy: seconds", secs(elapsed)))
        rows.append(("1 deploy: peak RSS", mib(sampler.peak)))
        time.sleep(2)
        rows.append(("1 deploy: RSS 2 s after", mib(server.rss())))
        status, data, _ = call(server.port, "POST", "/db/s/t0/f/_invoke", b"{}", timeout=60)
        rows.append(("1 deploy: invoke after", f"{status}"))

        def one(i):
            return call(server.port, "PUT", f"/db/s/t{i + 1}/_deploy", modules[i + 1], timeout=900)

        start = time.perf_counter()
        with RssSampler(server) as sampler:
            results = run_threads(3, one)
        elapsed = time.perf_counter() - start
        rows.append(("3 deploys: statuses", counts(r[0] for r in results)))
        errors = {error_text(r[1], 60) for r in results if r[0] not in (200, 201)}
        if errors:
            rows.append(("3 deploys: errors", "; ".join(sorted(errors))))
        rows.append(("3 deploys: elapsed", secs(elapsed)))
        rows.append(("3 deploys: each", " ".join(f"{r[2]:.1f}" for r in results) + " s"))
        rows.append(("3 deploys: peak RSS", mib(sampler.peak)))
        time.sleep(2)
        rows.append(("3 deploys: RSS 2 s after", mib(server.rss())))
    finally:
        server.__exit__(None, None, None)
    return rows


def part_memory(aeordb: str, opts) -> list:
    rows = []
    with Server(aeordb, "--max-request-size", "16777216", "--max-response-size", "33554432",
                "--memory-limit", "268435456") as server:
        deploy(server, "db/s/echo", wat(BODY_ECHO_WAT))
        deploy(server, "db/s/big", wat(BIG_ANSWER_WAT))
        deploy(server, "db/s/trap", wat(TRAP_AFTER_READ_WAT))
        # 8 MiB less 64 bytes: the servers encode a request's arguments array with 4 bytes per
        # body byte, so the echoed envelope of exactly 8 MiB would be 28 bytes over 32 MiB.
        body = random.Random(8).randbytes(8 * MiB - 64)
        status, data, _ = call(server.port, "POST", "/db/s/echo/f/_invoke", b"abc", timeout=60)
        if status != 200 or data != b"abc":
            raise RuntimeError(f"body echo plugin: {status} {data[:100]!r}")
        cases = [
            ("a 32x8MiB echo", 32, "/db/s/echo/f/_invoke", body, len(body)),
            ("b 16x16MiB answer", 16, "/db/s/big/f/_invoke", b"{}", 16 * MiB),
            ("c 16x8MiB trap", 16, "/db/s/trap/f/_invoke", body, None),
        ]
        for label, n, path, payload, expect in cases:
            def one(i):
                status, data, elapsed = call(server.port, "POST", path, payload, timeout=600)
                return status, (len(data) == expect) if status == 200 else error_text(data, 50), elapsed

            before = server.rss()
            start = time.perf_counter()
            with RssSampler(server) as sampler:
                results = run_threads(n, one)
            elapsed = time.perf_counter() - start
            rows.append((f"{label}: statuses", counts(r[0] for r in results)))
            ok = [r for r in results if r[0] == 200]
            if expect is not None and ok:
                rows.append((f"{label}: 200s with the right size", f"{sum(1 for r in ok if r[1] is True)}/{len(ok)}"))
            errors = {r[1] for r in results if r[0] != 200}
            if errors:
                rows.append((f"{label}: errors", "; ".join(sorted(map(str, errors)))[:120]))
            rows.append((f"{label}: elapsed", secs(elapsed)))
            rows.append((f"{label}: RSS before / peak", f"{mib(before)} / {mib(sampler.peak)}"))
            time.sleep(3)
            rows.append((f"{label}: RSS 3 s after", mib(server.rss())))
    return rows


PART_FUNCTIONS = {"hostquery": part_hostquery, "writelock": part_writelock, "slowloris": part_slowloris,
                  "compile": part_compile, "memory": part_memory}


# -- Output ---------------------------------------------------------------------

def table(title: str, rows: list, headers: list) -> str:
    rows = [[" ".join(str(c).split()) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [title, line]
    out.append(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    out.append(line)
    for r in rows:
        out.append(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def run_part(part: str, aeordb: str, label: str, opts) -> list:
    print(f"\n== {part} [{label}: {aeordb}] (load {os.getloadavg()[0]:.2f})", flush=True)
    start = time.perf_counter()
    try:
        rows = PART_FUNCTIONS[part](aeordb, opts)
    except Exception as exc:  # noqa: BLE001 - a part that fails is reported, the others still run
        traceback.print_exc()
        rows = [("ERROR", f"{type(exc).__name__}: {exc}"[:300])]
    rows.append(("part wall time", secs(time.perf_counter() - start)))
    print(table(f"{part} [{label}]", rows, ["figure", "value"]), flush=True)
    return rows


def wasmtime_version() -> str:
    try:
        import importlib.metadata
        return importlib.metadata.version("wasmtime")
    except Exception:  # noqa: BLE001
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aeordb", default=str(DEFAULT_AEORDB), help="the aeordb.py to measure")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="measure both, side by side")
    parser.add_argument("--only", help="comma-separated parts: " + ",".join(PARTS))
    parser.add_argument("--quick", action="store_true", help="shorter slowloris, smaller compile module")
    opts = parser.parse_args()
    parts = PARTS if not opts.only else tuple(p.strip() for p in opts.only.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    targets = [("old", opts.compare[0]), ("new", opts.compare[1])] if opts.compare else [("run", opts.aeordb)]
    for _, path in targets:
        if not Path(path).is_file():
            parser.error(f"no such file: {path}")

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"cpus {os.cpu_count()}; python {sys.version.split()[0]}; wasmtime {wasmtime_version()}")
    for label, path in targets:
        print(f"{label}: {path}")
    start = time.perf_counter()
    results = {label: {} for label, _ in targets}
    order = []
    for part in parts:
        for label, path in targets:
            previous = None
            for name, value in run_part(part, path, label, opts):
                key = f"{part}: {name}"
                if key not in order:   # a figure only this run has: after its predecessor
                    order.insert(order.index(previous) + 1 if previous in order else len(order), key)
                results[label][key] = value
                previous = key
    labels = [label for label, _ in targets]
    rows = [[key, *(results[label].get(key, "") for label in labels)] for key in order]
    print()
    print(table("SUMMARY", rows, ["figure", *labels]))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; "
          f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
