#!/usr/bin/env python3
"""aeordb.py: a single-file server that hosts WebAssembly plugins behind an HTTP API.

Deploy a ``.wasm`` module per ``{db}/{schema}/{table}``, invoke it over HTTP,
list and remove it. Plugins speak the ABI of the original AeorDB (its Rust SDK
runs unchanged): the request arrives as a JSON envelope, the answer goes back
as one, and host functions in the ``aeordb`` import module let a plugin read
and write its database's files and run queries and aggregations over them.

    pip install -r requirements.txt && python aeordb.py

starts a server on 127.0.0.1:3000 with its data in ``plugins_data/`` beside
this file and prints the bearer token to use. ``python aeordb.py --help``
lists every setting. ``create_app(settings)`` returns the WSGI application for
tests and embedding.

The file reads top to bottom, each section leaning only on those before it:
configuration, errors, names and paths, JSON input, the data directory, the
WASM engine, module validation, the plugin registry, the query language, the
file store, the envelope, observability, the WASM runtime with its host
functions, API keys, the OpenAPI document, the HTTP routes, serving, and
finally the command line.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import email.utils
import errno
import functools
import gc
import hashlib
import hmac
import importlib.metadata
import itertools
import json
import logging
import math
import mimetypes
import mmap
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import typing
import urllib.parse as urllib_parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import bottle
import wasmtime

try:
    import fcntl   # POSIX: keys.json is locked against other processes too
except ImportError:   # pragma: no cover - not POSIX
    fcntl = None

__version__ = "0.1.0"

log = logging.getLogger("aeordb")
plugin_log = logging.getLogger("aeordb.plugin")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# json.dumps with arguments builds a new encoder per call; this one is built once.
compact_json = json.JSONEncoder(separators=(",", ":")).encode


###############################################################################
# Configuration ################################################################
###############################################################################

def setting(default: Any, help: str, *, maximum: float = math.inf, choices: tuple = (),
            zero: str = "", zero_word: str = "", command_line: bool = True) -> Any:
    """Declare one setting: its default, its help, and what values it accepts.

    The type is the field's annotation. From these come the command-line
    option ``--name-with-dashes``, the environment variable ``AEORDB_NAME``
    and the validation of both. Numbers must be positive, or 0 where
    ``zero`` says what 0 means; ``zero_word`` is a word that also means 0.
    ``command_line=False`` marks a switch that only tests set, through
    ``Settings(...)``.
    """
    said = f"{zero_word} or 0" if zero_word else "0"
    return dataclasses.field(default=default, metadata={
        "help": help + (f"; {said}: {zero}" if zero else ""), "maximum": maximum, "choices": choices,
        "zero": bool(zero), "zero_word": zero_word, "command_line": command_line})


# Each worker thread may run one invocation; a pool has at most 256 slots for
# instances and memories (see pool_slots), two memories per invocation at most.
MAX_THREADS = 100
MAX_WORKERS = 64
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable: each field is one setting, declared once with ``setting``."""

    host: str = setting("127.0.0.1", "address to listen on")
    # Above 65535 waitress would take the port modulo 65536.
    port: int = setting(3000, "port to listen on", maximum=65535)
    data_dir: Path = setting(Path(__file__).resolve().parent / "plugins_data",
                             "where plugins, files and the token live")
    token: Optional[str] = setting(None, "bearer token (default: generated on first start, "
                                         "kept in DATA_DIR/token)")
    # Each worker process has its own threads, connections, memory budget and engine.
    workers: int = setting(1, "worker processes serving the same port and data dir", maximum=MAX_WORKERS,
                           zero="one per usable core", zero_word="auto")
    threads: int = setting(8, "waitress worker threads (of each worker process)", maximum=MAX_THREADS)
    connection_limit: int = setting(100, "open connections at most; more wait to be accepted", maximum=10_000)
    header_timeout: float = setting(10.0, "seconds a client has to send a whole request head")
    idle_timeout: float = setting(30.0, "seconds an idle keep-alive connection is kept open")
    timeout: float = setting(5.0, "wall-clock limit of one invocation, host functions included, seconds")
    query_timeout: Optional[float] = setting(None, "time limit of one POST /{db}/_query, seconds "
                                                   "(default: --timeout)")
    # Guest pointers are i32: past 2 GiB they would reach host functions negative.
    memory_limit: int = setting(64 * MiB, "linear memory limit of one invocation, bytes", maximum=2 * GiB)
    table_limit: int = setting(100_000, "table elements limit of one invocation")
    # Real plugins are a few MB (README, Security model).
    max_module_size: int = setting(16 * MiB, "largest module a deploy accepts, bytes")
    # An invoke's envelope takes several bytes of guest memory per body byte (README, Configuration).
    max_request_size: int = setting(8 * MiB, "largest invoke or query body, bytes")
    max_response_size: int = setting(16 * MiB, "largest answer a plugin may return, bytes")
    max_file_size: int = setting(16 * MiB, "largest stored file, bytes")
    max_db_size: int = setting(1 * GiB, "largest total of one database's files, bytes", zero="no quota")
    # Each such byte costs about fifteen in memory at the peak (README, Security model).
    memory_budget: int = setting(32 * MiB, "bytes of large (1 MiB or more) request bodies and plugin answers "
                                           "worked on at once; more are refused with 503")
    query_limit: int = setting(100, "items a query answers when it sets no limit")
    default_db: str = setting("default", "the database of today's AeorDB plugin routes (/plugins/{name}): "
                                         "their plugins are kept, and reach files, there")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", choices=LOG_LEVELS)
    access_log: bool = setting(False, "log one line per request")
    engine: str = setting("auto", "how the engine allocates instances: auto (the fastest that fits "
                                  "this process's address space), pooling, bounded-pooling or on-demand",
                          choices=("auto", "pooling", "bounded-pooling", "on-demand"))
    # Tests only: forces the public-API fallback of the engine section (see Wasm).
    fast_calls: bool = setting(True, "call guests through wasmtime's C API where it is available",
                               command_line=False)

    @property
    def max_body_size(self) -> int:
        """The outer bound handed to waitress: no route takes more."""
        return max(self.max_module_size, self.max_request_size, self.max_file_size) + 64 * KiB


_FALSE_WORDS = ("", "0", "false", "no", "off")


def _setting_parser(kind: Any, meta: dict) -> Callable[[str], Any]:
    """The function that turns an option's or environment variable's text into a value."""
    if kind is bool:
        return lambda text: text.strip().lower() not in _FALSE_WORDS
    if meta["choices"]:
        def choice(text: str) -> str:
            canonical = {option.lower(): option for option in meta["choices"]}.get(text.lower())
            if canonical is None:
                raise argparse.ArgumentTypeError(f"must be one of {', '.join(meta['choices'])}, got {text}")
            return canonical
        return choice
    if kind in (int, float):
        def number(text: str) -> Any:
            if meta["zero_word"] and text.strip().lower() == meta["zero_word"]:
                return kind(0)
            value = kind(text)
            if value == 0 and meta["zero"]:
                return value
            if not 0 < value < math.inf:   # also refuses 'nan' and 'inf'
                raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
            if value > meta["maximum"]:
                raise argparse.ArgumentTypeError(f"must be at most {meta['maximum']}, got {text}")
            return value
        number.__name__ = kind.__name__
        return number
    return Path if kind is Path else str


def parse_settings(argv: Optional[list] = None, environ: Optional[dict] = None) -> Settings:
    """Settings from defaults, then the environment, then the command line (which wins)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="aeordb.py",
        description="Host WebAssembly plugins behind an HTTP API. Every option can also be "
                    "set with the environment variable AEORDB_<OPTION> (e.g. AEORDB_PORT); "
                    "the command line wins.",
        epilog="Other commands (each with --help): deploy, invoke, list, remove, logs, stats, keys, "
               "check, token, backup, restore.")
    kinds = typing.get_type_hints(Settings)
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        if not meta["command_line"]:
            continue
        kind = kinds[field.name]
        if typing.get_origin(kind) is typing.Union:   # Optional[X]: None means "not set"
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        parse, env_name = _setting_parser(kind, meta), "AEORDB_" + field.name.upper()
        default = field.default
        if env_name in environ:
            try:
                default = parse(environ[env_name])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env_name}: {exc}")
        option = "--" + field.name.replace("_", "-")
        shown = "" if field.default is None else f"; default: {field.default}"
        if kind is bool:
            parser.add_argument(option, dest=field.name, action="store_true", default=default,
                                help=f"{meta['help']} (env {env_name})")
        else:
            parser.add_argument(option, dest=field.name, type=parse, default=default,
                                help=f"{meta['help']} (env {env_name}{shown})")
    parser.add_argument("--version", action="version", version=f"aeordb.py {__version__}")
    return Settings(**vars(parser.parse_args(argv)))


###############################################################################
# Errors #######################################################################
###############################################################################

class ApiError(Exception):
    """The one error type: becomes ``{"error": message}`` with its HTTP status."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class StartupError(Exception):
    """Why the server cannot start: one line on stderr and exit status 2, never a traceback."""


class TimeLimitReached(Exception):
    """Work was stopped at its deadline (an invocation's or a query's time limit)."""


RETRY_SOON = {"Retry-After": "1"}   # on a 503 that the next second may not have


def storage_error(action: str, exc: object) -> ApiError:
    """Disk full, read-only or locked storage: the server is fine, the disk is not."""
    return ApiError(503, f"storage unavailable while {action}: {exc}")


def is_storage_fault(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
    if isinstance(exc, sqlite3.DatabaseError):
        text = str(exc).lower()
        return any(word in text for word in ("disk", "readonly", "read-only", "locked", "busy",
                                             "unable to open", "i/o", "malformed", "not a database"))
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


###############################################################################
# Names and paths ##############################################################
###############################################################################
#
# The words, as used throughout this file:
#   key      a plugin's place, "db/schema/table" (the ABI's metadata calls it
#            plugin_path, and API answers call it "path")
#   route    the URL path an invocation came in on, "/db/schema/table/function"
#            (the ABI's metadata key "path")
#   path     a file's place inside one database, "/notes/1.json"
#   segment  one URL name: a database, schema, table or function name
#   name     a plugin's name on today's AeorDB routes (/plugins/{name}): the
#            plugin at key "<default db>/plugins/<name>" (see PluginRegistry)

# 1-128 of these characters, not starting with '_' (reserved), and not '.' or '..'.
_VALID_SEGMENT = re.compile(r"(?!_)(?!\.\.?\Z)[A-Za-z0-9._-]{1,128}")
MAX_PATH_LENGTH = 1024
# In a header, CR/LF would split it; the rest (even tab) is refused by strict WSGI stacks.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


_SEGMENT_KINDS = ("database name", "schema name", "table name", "function name")


def check_segments(*values: str) -> None:
    """Validate URL name segments, given in the order {db}, {schema}, {table}, {function}."""
    if all(map(_VALID_SEGMENT.fullmatch, values)):   # the common case, in one C loop
        return
    for value, what in zip(values, _SEGMENT_KINDS):
        if not _VALID_SEGMENT.fullmatch(value or ""):
            shown = value if len(value) <= 64 else value[:64] + "..."
            raise ApiError(400, f"invalid {what} {shown!r}: use 1-128 letters, digits, '-', '_' or '.', "
                                "not starting with '_' (reserved) and not '.' or '..'")


def check_plugin_name(name: str) -> None:
    """Validate the {name} of today's AeorDB plugin routes: a segment (check_segments' rule) that
    also does not start with '.', since AeorDB's own rule is [A-Za-z0-9._-]+ without a leading dot."""
    if name.startswith(".") or not _VALID_SEGMENT.fullmatch(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise ApiError(400, f"invalid plugin name {shown!r}: use 1-128 letters, digits, '-', '_' or '.', "
                            "not starting with '.' or '_'")


def normalize_file_path(raw: Any, *, allow_root: bool = False) -> str:
    """The one validator of file paths: absolute, '/'-separated, no '.', '..' or empty segments.

    A trailing '/' is accepted and dropped. Answers the canonical form '/a/b'
    (or '/' for the root when ``allow_root``).
    """
    if not isinstance(raw, str):
        raise ApiError(400, "path must be a string")
    if len(raw) > MAX_PATH_LENGTH:
        raise ApiError(400, f"path longer than {MAX_PATH_LENGTH} characters")
    if not raw.startswith("/"):
        raise ApiError(400, f"path must be absolute (start with '/'): {raw!r}")
    body = raw[1:-1] if raw.endswith("/") and len(raw) > 1 else raw[1:]
    if body == "":
        if allow_root:
            return "/"
        raise ApiError(400, "path names the root directory, not a file")
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            raise ApiError(400, f"invalid path {raw!r}: empty, '.' or '..' segment")
        if _CONTROL_CHARS.search(segment):
            raise ApiError(400, f"invalid path {raw!r}: control character")
        if len(segment.encode("utf-8", "surrogatepass")) > 255:
            raise ApiError(400, "path segment longer than 255 bytes")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "path is not valid UTF-8") from None
    return "/" + body


def is_header_value(value: str) -> bool:
    """Whether ``value`` (a content type, a plugin's header) can go out as an HTTP header value."""
    if _CONTROL_CHARS.search(value):
        return False
    try:
        value.encode("utf-8")   # bottle sends it as UTF-8; a lone surrogate would crash the response
    except UnicodeEncodeError:
        return False
    return True


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def descendant_range(directory: str) -> tuple:
    """(low, high) such that every path strictly inside ``directory`` sorts in [low, high)."""
    prefix = "/" if directory == "/" else directory + "/"
    return prefix, prefix[:-1] + "0"   # '0' is the character after '/'


###############################################################################
# JSON input ###################################################################
###############################################################################
#
# Every JSON document from outside (request bodies, host-function arguments,
# plugin answers) is read by load_json, and its fields by the validators below.

MAX_JSON_DEPTH = 200
_NOT_BRACKET_OR_QUOTE = bytes(b for b in range(256) if b not in b'"[]{}')
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_JSON_DECODER = json.JSONDecoder()
_BOM_FIRST_BYTES = (b"\xef", b"\xfe", b"\xff")   # how the UTF-8, UTF-16 and UTF-32 BOMs begin


def load_json(data: Any) -> Any:
    """json.loads for untrusted input, refusing nesting deeper than MAX_JSON_DEPTH.

    json.loads recurses once per level until Python's recursion limit; a
    garbage collection that starts down there runs finalizers without stack,
    and they fail (wasmtime objects would then leak their native memory). The
    depth is measured in C-speed passes: drop escaped quotes, keep brackets
    outside strings, then a running sum. Bytes are decoded as json.loads
    would (UTF-8, or UTF-16/32 when a BOM or NUL bytes say so), without its
    cost on the common case.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_BRACKET_OR_QUOTE)
        outside = b"".join(skeleton.split(b'"')[0::2])
        if max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, outside)), default=0) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(data, str):
        return _JSON_DECODER.decode(data)
    plain_utf8 = raw[:1] not in _BOM_FIRST_BYTES and b"\0" not in raw[:4]
    return _JSON_DECODER.decode(raw.decode("utf-8" if plain_utf8 else json.detect_encoding(raw), "surrogatepass"))


def _require(args: dict, key: str, kind: type) -> Any:
    value = args.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ApiError(400, f"'{key}' is required and must be a {kind.__name__}")
    return value


def _optional_int(args: dict, key: str, default: int) -> int:
    value = args.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be an integer or null")
    return value


def _lenient_count(args: dict, key: str) -> Optional[int]:
    """``args[key]`` when it is a JSON integer that fits a u64, else None: AeorDB's host functions
    take null (what its SDK sends for "absent"), negatives, floats and strings as absent."""
    value = args.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    return None


###############################################################################
# Data directory ###############################################################
###############################################################################
#
# Everything on disk lives in the data directory, private to the server's
# user: the directory and its folders are 0700, every file 0600. Every file
# is written by atomic_write (temp file, fsync, rename), so a crash leaves
# the old file or the new one.

TEMP_MARK = ".tmp-"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
SQLITE_MAGIC = b"SQLite format 3\0"
DATABASE_NAME = "aeordb.sqlite3"


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    ``durable``: also so that a crash leaves one or the other (fsync); without
    it, for files that matter only while the server runs, a crash may leave neither.
    """
    make_dirs(path.parent)
    fd, temp = tempfile.mkstemp(prefix=f"{path.name}{TEMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(temp, PRIVATE_FILE)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def held_lock_file(path: str) -> Iterator[None]:
    """An exclusive lock that other processes serving the data dir respect too (flock, where there is one)."""
    with open(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)) as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def make_dirs(directory: Path) -> None:
    """``mkdir -p`` that survives a crash: each new directory's entry is fsynced into its parent.

    Without that, a crash could take away a new plugin's folder, and with it
    the plugin.json whose own fsync acknowledged the deploy.
    """
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir(mode=PRIVATE_DIR)
        fsync_dir(new.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True   # PermissionError: alive, someone else's; OverflowError: not a pid, keep to be safe
    return True


def _writer_alive(temp_name: str) -> bool:
    """Whether another live process may still be writing this temporary file (its pid is in the name)."""
    found = re.search(re.escape(TEMP_MARK) + r"([0-9]+)(?:-|\Z)", temp_name)
    return found is not None and int(found.group(1)) != os.getpid() and process_alive(int(found.group(1)))


def remove_temp_files(root: Path) -> int:
    """Leftovers of writes a crash interrupted; none of them was ever acknowledged.

    A write in flight in another live process serving this data dir is left alone.
    """
    removed = 0
    if root.is_dir():
        for temp in root.rglob(f"*{TEMP_MARK}*"):
            if _writer_alive(temp.name):
                continue
            with contextlib.suppress(OSError):
                temp.unlink()
                removed += 1
    return removed


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data dir, check that the server can use it, and make it private.

    Files an older version left readable by others are tightened (folders
    0700, files 0600). Raises StartupError naming what is wrong: a data dir
    that cannot be created or written, or a database file that is not SQLite.
    """
    try:
        make_dirs(data_dir)
        probe = data_dir / f"write-check{TEMP_MARK}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data dir {data_dir} is not usable: {exc.strerror or exc}") from None
    database = data_dir / DATABASE_NAME
    with contextlib.suppress(FileNotFoundError):
        with open(database, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC[:len(head)]:
            raise StartupError(f"{database} is not an SQLite database: is --data-dir right?")
    for folder, subfolders, names in os.walk(data_dir):
        for path, mode in [(folder, PRIVATE_DIR)] + [(os.path.join(folder, n), PRIVATE_FILE) for n in names]:
            with contextlib.suppress(OSError):
                if not os.path.islink(path) and os.stat(path).st_mode & 0o777 != mode:
                    os.chmod(path, mode)


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


MIN_TOKEN_LENGTH = 16
_TOKEN = re.compile(r"[\x21-\x7e]{%d,4096}" % MIN_TOKEN_LENGTH)   # visible ASCII: it travels in a header


def load_or_create_token(settings: Settings) -> tuple:
    """(token, created): the configured token, or the one kept owner-only in DATA_DIR/token.

    A configured token is the one in force, and a token file that says
    otherwise is removed (and the start says so): the file never disagrees
    with the server. Raises StartupError for a token that is not one.
    """
    token_file = settings.data_dir / "token"
    if settings.token:
        if not _TOKEN.fullmatch(settings.token):
            raise StartupError(f"the token of --token / AEORDB_TOKEN must be {MIN_TOKEN_LENGTH}-4096 "
                               "visible ASCII characters (no spaces)")
        with contextlib.suppress(OSError):
            if token_file.read_bytes().strip() != settings.token.encode("ascii"):
                token_file.unlink()
                log.warning("removed %s: the token in force is the one configured with --token / "
                            "AEORDB_TOKEN", token_file)
        return settings.token, False
    try:
        text = token_file.read_bytes().strip()
    except FileNotFoundError:
        text = b""
    except OSError as exc:
        raise StartupError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
    if text:
        token = text.decode("latin-1")
        if not _TOKEN.fullmatch(token):
            raise StartupError(f"{token_file} does not hold a token ({MIN_TOKEN_LENGTH}-4096 visible "
                               "ASCII characters): fix it, or delete it to have a new one made")
        return token, False
    token = secrets.token_urlsafe(32)
    atomic_write(token_file, token.encode("ascii") + b"\n")
    return token, True


###############################################################################
# WASM engine and modules ######################################################
###############################################################################
#
# One Engine per distinct engine configuration in the process (in practice
# one), with a ticker advancing its epoch so that a deadline set on each Store
# interrupts runaway guests: a POSIX timer calling into wasmtime where it can,
# else a daemon thread. Guest code runs in ctypes calls that release the GIL,
# so even the thread keeps ticking while a plugin loops.
#
# One invocation's guest work is one sequence, ``run_guest``, over two sets of
# primitives: ``GuestOps`` (wasmtime-py's public API) and ``FastGuestOps``
# (wasmtime's C API, for speed). Below the public API this file relies on,
# in this section only, each feature-detected with a public-API fallback:
#   - wasmtime._ffi's pooling-allocator functions (Wasm._config): the public
#     Config has no pooling allocator;
#   - wasmtime._ffi.wasmtime_engine_clone / wasmtime_engine_increment_epoch
#     (Wasm._start_epoch_timer): a timer that ticks without Python;
#   - wasmtime._ffi.wasmtime_context_set_epoch_deadline on Caller._context()
#     (Wasm.interrupt): the public API sets deadlines on a Store only;
#   - wasmtime._bindings, _ffi and _func.maybe_raise_last_exn (FastGuestOps):
#     the C-API call path.
# These private names change between wasmtime-py releases, which is why
# requirements.txt pins wasmtime to one major version (<51).

EPOCH_TICK = 0.01   # seconds per epoch tick: the granularity of the time limit
# Epoch ticks a call may take with the GIL held (wall clock, host functions included)
# before it is started over with the GIL released: at least one whole tick, at most two.
HOLD_TICKS = 2
WASM_PAGE = 65536   # bytes in a page of linear memory
# What one invocation's Store may create (a plugin is one instance; the rest is headroom).
STORE_INSTANCES, STORE_TABLES, STORE_MEMORIES = 4, 4, 2
# <time.h> and <signal.h> values for timer_create, the same on every Linux ABI.
CLOCK_MONOTONIC, SIGEV_THREAD = 1, 2

HOST_FUNCTION_NAMES = (
    "aeordb_read_file", "aeordb_write_file", "aeordb_delete_file", "aeordb_file_metadata",
    "aeordb_list_directory", "aeordb_extract_file", "aeordb_query", "aeordb_aggregate",
    "aeordb_context", "aeordb_set_response",
)
LOG_FUNCTION_NAME = "log_message"
WRITING_HOST_FUNCTIONS = ("aeordb_write_file", "aeordb_delete_file")


class _SigEvent(ctypes.Structure):
    """Linux's struct sigevent, as far as SIGEV_THREAD reads it (padded past its 64 bytes)."""

    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("function", ctypes.c_void_p), ("attributes", ctypes.c_void_p), ("padding", ctypes.c_int * 12)]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("seconds", ctypes.c_long), ("nanoseconds", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("interval", _TimeSpec), ("first", _TimeSpec)]


ENGINE_MODES = ("pooling", "bounded-pooling", "on-demand")   # fastest first
MAX_POOL_SLOTS = 256             # instances, memories and tables in a pool, at most
DEFAULT_POOL_SLOT = 4 * GiB      # what wasmtime reserves per pooled memory by default (64-bit hosts)
SMALL_GUARD = 64 * KiB           # guard pages after a bounded memory: bounds checks do the rest
# Linux's values; Python 3.11's mmap module lacks these names.
MAP_NORESERVE, PROT_NONE = getattr(mmap, "MAP_NORESERVE", 0x4000), getattr(mmap, "PROT_NONE", 0)


def pool_slots(threads: int) -> int:
    """Instances (and memories) a pool holds for a server of ``threads`` workers.

    One invocation runs per worker and uses one instance and at most two
    memories; the rest is headroom (the epoch watcher holds one instance).
    Fewer slots reserve less address space: 32 slots of 4 GiB fit a 39-bit
    arm64 kernel with room to spare, where 256 would not.
    """
    return min(MAX_POOL_SLOTS, max(32, 4 * threads))


def _libc_function(name: str) -> Optional[Callable]:
    """A function of the C library (glibc's malloc tuning, Linux's prctl), or None where there is none."""
    with contextlib.suppress(OSError, AttributeError):
        return getattr(ctypes.CDLL(None), name)
    return None


_malloc_trim, _mallopt = _libc_function("malloc_trim"), _libc_function("mallopt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters


def tune_malloc() -> None:
    """Have glibc map every buffer of 1 MiB or more on its own, so freeing it returns it to the system.

    By default glibc raises that threshold to the largest buffer freed so
    far (up to 32 MiB), after which large request and answer buffers come
    from the heap and stay resident after a request, failed or not.
    """
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, 1 * MiB)
        _mallopt(M_TRIM_THRESHOLD, 8 * MiB)


def release_free_memory() -> None:
    """Give memory the C heap holds but no longer uses back to the system (after a compile, say)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _pooling_available() -> bool:
    """Whether the installed wasmtime-py reaches the pooling allocator (below its public API)."""
    try:
        from wasmtime import _ffi as ffi
        return all(hasattr(ffi, name) for name in (
            "wasmtime_pooling_allocation_config_new", "wasmtime_pooling_allocation_strategy_set"))
    except ImportError:
        return False


def can_reserve(size: int) -> bool:
    """Whether this process may reserve ``size`` bytes of address space now.

    Asks the kernel the way wasmtime will (an inaccessible mapping that
    commits nothing), so RLIMIT_AS, a 39-bit address space and what the
    process already holds all count. wasmtime aborts the whole process when
    its own reservation fails, so this is asked first.
    """
    if size <= 0:
        return True
    try:
        probe = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                          prot=PROT_NONE)
    except (OSError, OverflowError, ValueError):
        return False
    probe.close()
    return True


class Wasm:
    """The process's engine for one set of limits: its allocation mode, its epoch ticker and its guest primitives.

    ``mode`` is one of ENGINE_MODES: ``pooling`` (wasmtime's pooling allocator
    with its default 4 GiB slot per memory: fastest, 4 GiB of address space
    a slot), ``bounded-pooling`` (the pool with each memory's reservation
    cut to the memory limit: explicit bounds checks, a few GiB in all),
    ``on-demand`` (each instance reserves its bounded memory when it is
    made: an mmap and munmap per invocation). A pool has ``slots`` instances
    and memories (see pool_slots). ``auto`` takes the first mode that fits
    this process's address space with room to spare. ``ops`` runs guests through the C API where it is available
    (``fast=False`` forces the public API); ``public_ops`` always uses the
    public API.
    """

    _engines: dict = {}
    _engines_lock = threading.Lock()
    _timers: list = []   # what the epoch timers point at, kept for the life of the process

    def __init__(self, engine: wasmtime.Engine, mode: str, fast: bool, ticker: str = "thread"):
        self.engine = engine
        self.mode = mode
        # "timer" or "thread": what advances the epoch. Only the timer ticks while a guest
        # holds the GIL, so only then may one (WasmRuntime.invoke).
        self.ticker = ticker
        self.public_ops = GuestOps()
        self.ops = FastGuestOps() if fast and FastGuestOps.available() else self.public_ops
        version = importlib.metadata.version("wasmtime")
        # Everything that makes a serialized artifact invalid goes into its key.
        self.fingerprint = hashlib.sha256(
            f"wasmtime={version};engine={mode};epoch=1;python={sys.implementation.cache_tag}".encode()
        ).hexdigest()[:16]

    @property
    def pooling(self) -> bool:
        return self.mode != "on-demand"   # pool slots already cap memories and tables

    @classmethod
    def shared(cls, memory_limit: int, table_limit: int, mode: str = "auto", fast: bool = True,
               slots: int = MAX_POOL_SLOTS) -> "Wasm":
        """The process's engine for these settings, created (with its epoch ticker) on first use."""
        key = (memory_limit, table_limit, mode, fast, slots)
        with cls._engines_lock:
            wasm = cls._engines.get(key)
            if wasm is None:
                wasm = cls._engines[key] = cls._create(memory_limit, table_limit, mode, fast, slots)
            return wasm

    @staticmethod
    def planned_reservation(mode: str, memory_limit: int, table_limit: int, slots: int) -> int:
        """Address space an engine of ``mode`` reserves when it is made, counted generously."""
        tables_and_instance = table_limit * 32 + 4 * MiB
        if mode == "pooling":
            return slots * (DEFAULT_POOL_SLOT + 32 * MiB + tables_and_instance)
        if mode == "bounded-pooling":
            return slots * (memory_limit + 2 * SMALL_GUARD + tables_and_instance)
        return 0

    @classmethod
    def choose_mode(cls, mode: str, memory_limit: int, table_limit: int, slots: int) -> str:
        """``mode``, or for ``auto`` the fastest that leaves as much address space again to spare."""
        if mode != "auto":
            planned = cls.planned_reservation(mode, memory_limit, table_limit, slots)
            if not can_reserve(2 * planned):
                raise StartupError(f"engine mode {mode} needs about {planned // GiB} GiB of address "
                                   "space, more than this process may reserve (see ulimit -v); "
                                   "use --engine auto")
            return mode
        if not _pooling_available():
            return "on-demand"
        for candidate in ENGINE_MODES:
            if can_reserve(2 * cls.planned_reservation(candidate, memory_limit, table_limit, slots)):
                return candidate
        return "on-demand"

    @classmethod
    def _create(cls, memory_limit: int, table_limit: int, mode: str, fast: bool, slots: int) -> "Wasm":
        chosen = cls.choose_mode(mode, memory_limit, table_limit, slots)
        log.info("engine: %s allocation (%s, about %d GiB of address space reserved)", chosen,
                 "as configured" if mode == chosen else "the fastest that fits this process",
                 cls.planned_reservation(chosen, memory_limit, table_limit, slots) // GiB)
        engine = wasmtime.Engine(cls._config(chosen, memory_limit, table_limit, slots))
        wasm = cls(engine, chosen, fast, ticker="timer" if fast and cls._start_epoch_timer(engine) else "thread")
        threading.Thread(target=wasm._tick, name="aeordb-epoch", daemon=True).start()
        return wasm

    @staticmethod
    def _config(mode: str, memory_limit: int, table_limit: int, slots: int) -> wasmtime.Config:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = "speed"
        if mode != "pooling":
            # Each memory reserves what it may use and no more (it never
            # moves): compiled code checks bounds instead of relying on guards.
            config.memory_reservation = -(-memory_limit // WASM_PAGE) * WASM_PAGE
            config.memory_guard_size = SMALL_GUARD
            config.memory_reservation_for_growth = 0
        if mode != "on-demand":
            from wasmtime import _ffi as ffi
            pool = ffi.wasmtime_pooling_allocation_config_new()
            # Slots are address-space reservations, not memory: each one only
            # commits what its instance touches.
            ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, slots)
            ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, slots)
            ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, slots)
            # A slot holds what one Store may use and no more: on a pooled
            # engine these are the memory and table limits (GuestLimits.in_pool).
            ffi.wasmtime_pooling_allocation_config_table_elements_set(pool, table_limit)
            ffi.wasmtime_pooling_allocation_config_max_tables_per_module_set(pool, STORE_TABLES)
            ffi.wasmtime_pooling_allocation_config_max_memories_per_module_set(pool, STORE_MEMORIES)
            ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, memory_limit)
            ffi.wasmtime_pooling_allocation_config_max_unused_warm_slots_set(pool, 32)
            # Reset a freed slot's first pages with memset instead of madvise:
            # no system call and no page faults on the next instance (still zeroed).
            ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pool, 1 * MiB)
            ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, 64 * KiB)
            ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
            ffi.wasmtime_pooling_allocation_config_delete(pool)
        return config

    def _tick(self) -> None:
        """Advance the epoch every EPOCH_TICK; behind the epoch timer, only watch it.

        glibc starts a thread for each timer tick and silently drops the tick
        when it cannot (a full pid limit): should the timer stop for three
        checks in a row, this thread takes over, so a deadline is never lost.
        """
        engine = self.engine
        if self.ticker == "timer":
            probe = wasmtime.Store(engine)
            empty = wasmtime.Instance(probe, wasmtime.Module(engine, '(module (func (export "f")))'),
                                      []).exports(probe)["f"]
            misses = 0
            while misses < 3:
                probe.set_epoch_deadline(1)
                time.sleep(0.5)                   # some 50 ticks
                try:
                    empty(probe)                  # checks the epoch on entry
                    misses += 1
                except wasmtime.Trap:             # interrupted: the epoch moved on
                    misses = 0
            self.ticker = "thread"   # which cannot tick while a guest holds the GIL
            log.error("the epoch timer stopped ticking; a thread ticks the epoch from now on")
        while True:
            time.sleep(EPOCH_TICK)
            engine.increment_epoch()

    @classmethod
    def _start_epoch_timer(cls, engine: wasmtime.Engine) -> bool:
        """Advance the epoch from a POSIX timer that calls wasmtime itself: no Python, no GIL.

        A ticker thread must take the GIL for every tick, and while it waits
        for it each GIL release elsewhere wakes it, which costs every
        invocation (README, Performance). The timer (SIGEV_THREAD) calls
        wasmtime_engine_increment_epoch with the engine as its sigval, which
        Linux ABIs pass exactly as a pointer. It ticks a clone of the engine
        that is never released, so it can never tick a freed one. Linux only;
        False when anything is missing.
        """
        if not sys.platform.startswith("linux"):
            return False
        try:
            from wasmtime import _ffi as ffi
            for library in (None, "librt.so.1"):   # glibc before 2.34 keeps timers in librt
                with contextlib.suppress(OSError, AttributeError):
                    libc = ctypes.CDLL(library)
                    timer_create, timer_settime = libc.timer_create, libc.timer_settime
                    break
            else:
                return False
            timer_create.argtypes = (ctypes.c_int, ctypes.POINTER(_SigEvent), ctypes.POINTER(ctypes.c_void_p))
            timer_settime.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_ITimerSpec), ctypes.c_void_p)
            clone = ffi.wasmtime_engine_clone(engine.ptr())
            event = _SigEvent(value=ctypes.cast(clone, ctypes.c_void_p).value, notify=SIGEV_THREAD,
                              function=ctypes.cast(ffi.dll.wasmtime_engine_increment_epoch, ctypes.c_void_p).value)
            timer = ctypes.c_void_p()
            if timer_create(CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
                return False
            cls._timers.append((clone, timer))   # from here on the timer may tick the clone
            period = _TimeSpec(0, int(EPOCH_TICK * 1e9))
            if timer_settime(timer, 0, ctypes.byref(_ITimerSpec(period, period)), None) != 0:
                return False
            return True
        except Exception as exc:
            log.debug("no epoch timer (%s): a ticker thread instead", exc)
            return False

    _compile_slots = threading.BoundedSemaphore(os.cpu_count() or 1)

    def compile(self, wasm_bytes: bytes, wait: Optional[float] = None) -> wasmtime.Module:
        """The compiled module; at most one compile per core at a time.

        Compiling a large module takes seconds and a lot of memory. A compile
        waits for a free core at most ``wait`` seconds (None: as long as it
        takes), then it is a 503. Memory the compiler freed goes back to the
        system afterwards.
        """
        if not self._compile_slots.acquire(timeout=wait):
            raise ApiError(503, f"{os.cpu_count() or 1} module(s) are being compiled, one per core: retry "
                                "this deploy shortly", {"Retry-After": "5"})
        try:
            return wasmtime.Module(self.engine, wasm_bytes)
        finally:
            self._compile_slots.release()
            release_free_memory()

    @staticmethod
    def interrupt(caller: wasmtime.Caller) -> None:
        """Set the epoch deadline of the Store behind ``caller`` to now: the guest traps soon.

        wasmtime-py sets deadlines on a Store only, not through a Caller; where
        the C API is not reachable the guest runs on to its own time limit.
        """
        with contextlib.suppress(Exception):
            from wasmtime import _ffi as ffi
            ffi.wasmtime_context_set_epoch_deadline(caller._context(), 0)


@dataclasses.dataclass(frozen=True)
class GuestLimits:
    """What one invocation's Store may use, and the largest answer read back from it."""

    memory: int           # bytes of linear memory
    table_elements: int
    deadline_ticks: int   # epoch ticks until the guest is interrupted
    max_answer: int       # bytes
    in_pool: bool = False   # the engine's pooling allocator already caps memories and tables at these


def no_memory_left(error: Exception) -> bool:
    """Whether wasmtime failed for want of memory or address space, not because of the module."""
    text = str(error)
    return "Cannot allocate memory" in text or "os error 12" in text or "concurrent" in text and "limit" in text


class GuestFailure(Exception):
    """The guest trapped, or wasmtime refused a step of the invocation."""

    def __init__(self, error: Exception, memory_in_use: Optional[int]):
        super().__init__(str(error))
        self.error = error
        self.memory_in_use = memory_in_use   # bytes, when the guest's memory was reached


def interrupted(error: Exception) -> bool:
    """Whether a trap stopped the guest at its epoch deadline (or Wasm.interrupt did)."""
    return getattr(getattr(error, "trap_code", None), "name", None) == "INTERRUPT"


def run_guest(ops: "GuestOps", engine: wasmtime.Engine, limits: GuestLimits, target: Any, request: bytes, *,
              has_alloc: bool, quick_instantiate: bool = False, entry: str = "handle",
              initialize: bool = False, wasi: Optional[wasmtime.WasiConfig] = None, hold: bool = False) -> bytes:
    """The one sequence of an invocation's guest work: the answer bytes of entry(request).

    A fresh Store with the limits (and ``wasi``, for a module importing
    WASI), instantiate, call ``_initialize`` (a WASI reactor's), place the
    request (at alloc(len), else at 0), call the entry (``handle`` or
    ``handle_raw``), bounds-check and read the answer, drop the Store.
    ``target`` is the plugin's InstancePre, or (public API only) a callable
    making (instance, memory) in a Store, for a module importing env.memory.
    ``hold``: the guest code runs with the GIL held (where ``ops.can_hold``).
    Raises GuestFailure when the guest traps, ApiError for a bad pointer.
    """
    call = ops.begin(engine, limits, wasi, hold)
    try:
        ops.instantiate(call, target, quick_instantiate, entry)
        if initialize:
            ops.call_initialize(call)
        pointer = place_in_guest(ops, call, request, "request", has_alloc)
        packed = ops.call_entry(call, pointer, len(request))
        start, length = answer_span(packed, ops.memory_size(call), limits.max_answer)
        return ops.read(call, start, length) if length else b""
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        # Without its traceback: wasmtime-py's frames that raised it name it, a
        # cycle that would keep the request's buffers until a garbage collection.
        raise GuestFailure(exc.with_traceback(None), ops.memory_in_use(call)) from None
    finally:
        ops.end(call)


def place_in_guest(ops: "GuestOps", call: Any, data: bytes, what: str, has_alloc: bool) -> int:
    """Copy ``data`` into guest memory at alloc(len), or at 0 without alloc; answers the pointer.

    Host functions place their answers this way too (``call`` from GuestOps.in_caller).
    """
    if has_alloc:
        pointer = ops.call_alloc(call, len(data)) & 0xFFFFFFFF
        if pointer + len(data) > ops.memory_size(call):
            raise ApiError(500, f"plugin alloc returned a bad pointer for the {what}: "
                                f"{len(data)} bytes at {pointer} are outside its memory")
    else:
        pointer, missing = 0, len(data) - ops.memory_size(call)
        if missing > 0 and (not ops.grow(call, -(-missing // WASM_PAGE)) or len(data) > ops.memory_size(call)):
            raise ApiError(500, f"the {what} ({len(data)} bytes) does not fit in plugin memory")
    if data:
        ops.write(call, pointer, data)
    return pointer


def answer_span(packed: int, memory_size: int, max_answer: int) -> tuple:
    """(pointer, length) of handle's packed i64 answer, checked against the memory and the limit."""
    packed &= 0xFFFFFFFFFFFFFFFF    # wasmtime hands the i64 back signed
    pointer, length = packed >> 32, packed & 0xFFFFFFFF
    if length > max_answer:
        raise ApiError(500, f"plugin answered {length} bytes, over the response limit of {max_answer} bytes")
    if pointer + length > memory_size:
        raise ApiError(500, f"plugin answered a bad pointer: {length} bytes at {pointer} "
                            f"are outside its {memory_size}-byte memory")
    return pointer, length


@dataclasses.dataclass
class _PublicCall:
    """One invocation's state on the public API: its Store (or a host function's Caller) and exports."""

    store: Any
    memory: Optional[wasmtime.Memory] = None
    exports: Any = None
    alloc: Optional[wasmtime.Func] = None
    entry: Optional[wasmtime.Func] = None


class GuestOps:
    """The primitives of ``run_guest`` on wasmtime-py's public API.

    wasmtime-py releases the GIL around every call, so guest code never runs with it held here.
    """

    can_hold = False

    def begin(self, engine: wasmtime.Engine, limits: GuestLimits,
              wasi: Optional[wasmtime.WasiConfig] = None, hold: bool = False) -> _PublicCall:
        store = wasmtime.Store(engine)
        store.set_limits(memory_size=limits.memory, table_elements=limits.table_elements,
                         instances=STORE_INSTANCES, tables=STORE_TABLES, memories=STORE_MEMORIES)
        store.set_epoch_deadline(limits.deadline_ticks)
        if wasi is not None:
            store.set_wasi(wasi)
        return _PublicCall(store)

    def end(self, call: _PublicCall) -> None:
        call.store.close()

    @staticmethod
    def in_caller(caller: wasmtime.Caller, memory: wasmtime.Memory) -> _PublicCall:
        """The call state of a host function: answers go into the calling guest."""
        alloc = caller.get("alloc")
        return _PublicCall(caller, memory, alloc=alloc if isinstance(alloc, wasmtime.Func) else None)

    def instantiate(self, call: _PublicCall, target: Any, quick: bool, entry: str) -> None:
        if isinstance(target, wasmtime.InstancePre):
            call.exports = target.instantiate(call.store).exports(call.store)
            call.memory = call.exports["memory"]
        else:
            instance, call.memory = target(call.store)
            call.exports = instance.exports(call.store)
        call.entry = call.exports[entry]

    def call_initialize(self, call: _PublicCall) -> None:
        call.exports["_initialize"](call.store)

    def memory_size(self, call: _PublicCall) -> int:
        return call.memory.data_len(call.store)

    def memory_in_use(self, call: _PublicCall) -> Optional[int]:
        with contextlib.suppress(Exception):
            return call.memory.data_len(call.store) if call.memory is not None else None
        return None

    def grow(self, call: _PublicCall, pages: int) -> bool:
        try:
            call.memory.grow(call.store, pages)
            return True
        except wasmtime.WasmtimeError:
            return False

    def write(self, call: _PublicCall, pointer: int, data: bytes) -> None:
        call.memory.write(call.store, data, pointer)

    def read(self, call: _PublicCall, pointer: int, length: int) -> bytes:
        return bytes(call.memory.read(call.store, pointer, pointer + length))

    def call_alloc(self, call: _PublicCall, size: int) -> int:
        if call.alloc is None:
            call.alloc = call.exports["alloc"]
        return call.alloc(call.store, size)

    def call_entry(self, call: _PublicCall, pointer: int, length: int) -> int:
        return call.entry(call.store, pointer, length)


# Arguments of FastGuestOps' untyped hot calls, made once: (name, length) of exports, value counts.
_EXPORT_NAMES = {name: (name.encode(), ctypes.c_size_t(len(name)))
                 for name in ("handle", "handle_raw", "memory", "alloc", "_initialize")}
_ZERO, _ONE, _TWO = ctypes.c_size_t(0), ctypes.c_size_t(1), ctypes.c_size_t(2)


class FastGuestOps(GuestOps):
    """The primitives of ``run_guest`` on wasmtime's C API: no wrapper objects, no export dictionaries.

    ctypes releases the GIL around every foreign call, and under load each
    release hands the GIL to another thread and waits to get it back (README,
    Performance): short calls that run no guest code are bound through PyDLL
    and keep it. Calls that run guest code (alloc, handle, and instantiation
    unless ``quick``) release it, so an endless loop never stalls other
    requests; in a call begun with ``hold`` they keep it too, and the Store's
    epoch deadline (HOLD_TICKS, set by the caller) bounds how long.
    ``available()`` tries to build it: anything missing from the installed
    wasmtime-py means the public API. Traps surface as wasmtime-py's own
    ``Trap``. Its targets are InstancePre only.
    """

    can_hold = True

    _NEEDS = ("wasmtime_func_call", "wasmtime_val_t", "WASMTIME_I32", "wasmtime_instance_export_get",
              "wasmtime_instance_pre_instantiate", "wasmtime_instance_t", "wasmtime_extern_t",
              "wasmtime_memory_data", "wasmtime_memory_data_size", "wasmtime_memory_grow",
              "WASMTIME_EXTERN_FUNC", "WASMTIME_EXTERN_MEMORY", "wasmtime_store_new",
              "wasmtime_store_context", "wasmtime_store_limiter", "wasmtime_store_delete",
              "wasmtime_context_set_epoch_deadline", "wasm_trap_t", "wasmtime_context_set_wasi")

    @classmethod
    def available(cls) -> bool:
        try:
            cls()
            return True
        except Exception:
            return False

    def __init__(self) -> None:
        from wasmtime import _bindings as bindings
        from wasmtime import _ffi as ffi
        from wasmtime._func import maybe_raise_last_exn
        missing = [name for name in self._NEEDS if not hasattr(ffi, name)] + [
            f"{owner.__name__}.{name}" for owner, name in ((wasmtime.WasiConfig, "_consume"),
                                                          (wasmtime.WasmtimeError, "_from_ptr"),
                                                          (wasmtime.Trap, "_from_ptr")) if not hasattr(owner, name)]
        if missing:
            raise AttributeError(f"wasmtime-py lacks {', '.join(missing)}")
        self.ffi = ffi
        self.raise_host_exception = maybe_raise_last_exn
        self.extern_func = ffi.WASMTIME_EXTERN_FUNC.value
        self.extern_memory = ffi.WASMTIME_EXTERN_MEMORY.value
        holding = ctypes.PyDLL(ffi.dll._name, handle=ffi.dll._handle)
        releasing = ctypes.CDLL(ffi.dll._name, handle=ffi.dll._handle)

        def bind(library: ctypes.CDLL, name: str, typed: bool = False) -> Any:
            """Our own binding of ``name``; untyped unless asked: a declared argument
            costs a from_param check on every call, so callers pass ctypes objects
            of the exact C types instead."""
            declared = getattr(bindings, "_" + name)
            function = getattr(library, name)
            function.restype = declared.restype
            function.argtypes = declared.argtypes if typed else None
            return function
        self.store_new = bind(holding, "wasmtime_store_new")
        self.store_context = bind(holding, "wasmtime_store_context")
        self.store_limiter = bind(holding, "wasmtime_store_limiter", typed=True)      # 64-bit integers
        self.store_delete = bind(holding, "wasmtime_store_delete")
        self.set_deadline = bind(holding, "wasmtime_context_set_epoch_deadline", typed=True)
        self.export_get = bind(holding, "wasmtime_instance_export_get")
        self.memory_grow = bind(holding, "wasmtime_memory_grow", typed=True)
        self.memory_data = bind(holding, "wasmtime_memory_data")
        self.memory_data.restype = ctypes.c_size_t      # the address as an int, no cast needed
        self.memory_data_size = bind(holding, "wasmtime_memory_data_size")
        self.instantiate_holding = bind(holding, "wasmtime_instance_pre_instantiate")
        self.instantiate_releasing = bind(releasing, "wasmtime_instance_pre_instantiate")
        self.func_call = bind(releasing, "wasmtime_func_call")
        self.func_call_holding = bind(holding, "wasmtime_func_call")
        # ctypes.memmove is a CFUNCTYPE and so releases the GIL too; libc's,
        # bound through PyDLL, copies without that hand-off.
        self.copy = ctypes.PyDLL(None).memmove
        self.copy.restype = ctypes.c_void_p
        self.copy.argtypes = (ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
        self.no_finalizer = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))   # stores carry no data
        self._local = threading.local()
        _CallSlots(ffi)   # fails here, not on a first request, if a struct is not as expected

    def begin(self, engine: wasmtime.Engine, limits: GuestLimits,
              wasi: Optional[wasmtime.WasiConfig] = None, hold: bool = False) -> "_CallSlots":
        call = getattr(self._local, "slots", None)
        if call is None:
            call = self._local.slots = _CallSlots(self.ffi)
        if call.busy:   # a run inside a run on this thread: its own slots, not the outer call's
            call = _CallSlots(self.ffi)
        call.busy, call.has_memory = True, False
        call.hold, call.func_call = hold, self.func_call_holding if hold else self.func_call
        call.store = self.store_new(engine.ptr(), None, self.no_finalizer)
        call.context = self.store_context(call.store)
        if not limits.in_pool:   # else the pool's slots hold no more than this anyway
            self.store_limiter(call.store, limits.memory, limits.table_elements,
                               STORE_INSTANCES, STORE_TABLES, STORE_MEMORIES)
        self.set_deadline(call.context, limits.deadline_ticks)
        if wasi is not None:
            error = self.ffi.wasmtime_context_set_wasi(call.context, wasi._consume())
            if error:
                self.end(call)
                raise wasmtime.WasmtimeError._from_ptr(error)
        return call

    def end(self, call: "_CallSlots") -> None:
        self.store_delete(call.store)
        call.busy = False

    def instantiate(self, call: "_CallSlots", target: wasmtime.InstancePre, quick: bool, entry: str) -> None:
        instantiate = self.instantiate_holding if quick or call.hold else self.instantiate_releasing
        error = instantiate(target.ptr(), call.context, call.instance_ref, call.trap_ref)
        if error or call.trap:
            self._raise(error, call)
        self._export(call, _EXPORT_NAMES[entry], call.handle, call.handle_extern_ref, self.extern_func)
        self._export(call, _EXPORT_NAMES["memory"], call.memory, call.memory_extern_ref, self.extern_memory)
        call.has_memory = True

    def call_initialize(self, call: "_CallSlots") -> None:
        self._export(call, _EXPORT_NAMES["_initialize"], call.alloc, call.alloc_extern_ref, self.extern_func)
        error = call.func_call(call.context, call.alloc_ref, None, _ZERO, None, _ZERO, call.trap_ref)
        if error or call.trap:
            self._raise(error, call)

    def memory_size(self, call: "_CallSlots") -> int:
        return self.memory_data_size(call.context, call.memory_ref)

    def memory_in_use(self, call: "_CallSlots") -> Optional[int]:
        return self.memory_data_size(call.context, call.memory_ref) if call.has_memory else None

    def grow(self, call: "_CallSlots", pages: int) -> bool:
        error = self.memory_grow(call.context, call.memory_ref, pages, ctypes.byref(ctypes.c_uint64()))
        if error:
            wasmtime.WasmtimeError._from_ptr(error)   # takes the message, and frees it
        return not error

    def write(self, call: "_CallSlots", pointer: int, data: bytes) -> None:
        self.copy(self.memory_data(call.context, call.memory_ref) + pointer, data, len(data))

    def read(self, call: "_CallSlots", pointer: int, length: int) -> bytes:
        return ctypes.string_at(self.memory_data(call.context, call.memory_ref) + pointer, length)

    def call_alloc(self, call: "_CallSlots", size: int) -> int:
        self._export(call, _EXPORT_NAMES["alloc"], call.alloc, call.alloc_extern_ref, self.extern_func)
        call.params[0].of.i32 = size
        error = call.func_call(call.context, call.alloc_ref, call.params, _ONE, call.results, _ONE, call.trap_ref)
        if error or call.trap:
            self._raise(error, call)
        return call.results[0].of.i32

    def call_entry(self, call: "_CallSlots", pointer: int, length: int) -> int:
        params = call.params
        params[0].of.i32 = pointer
        params[1].of.i32 = length
        error = call.func_call(call.context, call.handle_ref, params, _TWO, call.results, _ONE, call.trap_ref)
        if error or call.trap:
            self._raise(error, call)
        return call.results[0].of.i64

    def _raise(self, error: Any, call: "_CallSlots") -> None:
        """Raise what a foreign call reported, as wasmtime-py's own enter_wasm would.

        No local names the exception as it leaves: the traceback holds this
        frame, and a frame holding its exception is a cycle that keeps every
        frame below (the request's buffers among them) until a garbage collection.
        """
        if error:
            failure = wasmtime.WasmtimeError._from_ptr(error)
        else:
            failure = wasmtime.Trap._from_ptr(call.trap)   # takes the pointer: the slot gets a new one
            call.new_trap_slot()
        try:
            self.raise_host_exception()
            raise failure
        finally:
            del failure

    def _export(self, call: "_CallSlots", name: tuple, item: Any, item_ref: Any, kind: int) -> None:
        if not self.export_get(call.context, call.instance_ref, *name, item_ref) or item.kind != kind:
            # inspect_module checked this at deploy; never hand wasmtime a stale struct.
            raise ApiError(500, f"plugin instance has no {name[0].decode()} export of the right kind")


class _CallSlots:
    """One thread's call state for FastGuestOps: reusable out-parameters (ctypes objects cost to create).

    ``handle`` holds the entry point (handle or handle_raw); ``alloc`` also
    serves ``_initialize``, which runs before alloc is looked up.
    """

    def __init__(self, ffi: Any):
        self._trap_type = ctypes.POINTER(ffi.wasm_trap_t)
        self.instance = ffi.wasmtime_instance_t()
        self.instance_ref = ctypes.byref(self.instance)
        self.handle, self.memory, self.alloc = (ffi.wasmtime_extern_t() for _ in range(3))
        self.handle_extern_ref, self.memory_extern_ref, self.alloc_extern_ref = (
            ctypes.byref(item) for item in (self.handle, self.memory, self.alloc))
        self.handle_ref = ctypes.byref(self.handle.of.func)
        self.alloc_ref = ctypes.byref(self.alloc.of.func)
        self.memory_ref = ctypes.byref(self.memory.of.memory)
        self.params = (ffi.wasmtime_val_t * 2)()
        self.params[0].kind = self.params[1].kind = ffi.WASMTIME_I32.value
        self.results = (ffi.wasmtime_val_t * 1)()
        self.busy = self.has_memory = self.hold = False
        self.store = self.context = self.func_call = None   # func_call: how this call runs guest code
        self.new_trap_slot()

    def new_trap_slot(self) -> None:
        self.trap = self._trap_type()
        self.trap_ref = ctypes.byref(self.trap)


###############################################################################
# Module validation ############################################################
###############################################################################

# Ids of the binary format's sections read here.
SECTION_TABLE, SECTION_MEMORY, SECTION_START, SECTION_DATA = 4, 5, 8, 11


def check_initial_memory(size: int, settings: Settings) -> None:
    if size > settings.memory_limit:
        raise ApiError(400, f"module asks for {size // KiB} KiB of initial memory, "
                            f"over the limit of {settings.memory_limit // KiB} KiB")


def check_initial_table(elements: int, settings: Settings) -> None:
    if elements > settings.table_limit:
        raise ApiError(400, f"module asks for a table of {elements} elements, "
                            f"over the limit of {settings.table_limit}")


def _signature(func_type: wasmtime.FuncType) -> tuple:
    return tuple(str(t) for t in func_type.params), tuple(str(t) for t in func_type.results)


HOST_SIGNATURE = (("i32", "i32"), ("i64",))
LOG_SIGNATURE = (("i32", "i32", "i32", "i32"), ())


@dataclasses.dataclass
class ModuleShape:
    has_alloc: bool
    imports_memory: bool
    writes_files: bool = True  # False when it imports no host function that writes
    # True when instantiating runs no guest code and copies little: see instantiates_quickly.
    quick_instantiate: bool = False
    entry: str = "handle"      # or "handle_raw": the body's raw bytes in, raw bytes out
    initialize: bool = False   # a WASI reactor: _initialize runs on each fresh instance first
    wasi: bool = False         # imports wasi_snapshot_preview1


WASI_MODULE = "wasi_snapshot_preview1"
ENTRY_POINTS = ("handle", "handle_raw")
REACTOR_HOWTO = ("build it as a reactor that exports handle: Go: GOOS=wasip1 go build -buildmode=c-shared "
                 "with //go:wasmexport handle; C: clang --target=wasm32-wasi -mexec-model=reactor; "
                 "Rust: crate-type = [\"cdylib\"] with #[no_mangle] pub extern \"C\" fn handle")


def inspect_module(module: wasmtime.Module, settings: Settings, wasm_bytes: Optional[bytes],
                   provided: Callable[[str, str], Optional[tuple]]) -> ModuleShape:
    """Check a compiled module against the ABI without instantiating it.

    ``provided(module, name)`` answers the signature of what the server
    provides under that import name, or None. ``wasm_bytes`` is the module's
    binary, when at hand and trusted; without it the module is assumed to
    have a start function.
    """
    exports = {export.name: export.type for export in module.exports}
    entries = [name for name in ENTRY_POINTS if name in exports]
    if not entries:
        if "_start" in exports:
            raise ApiError(400, "module is a WASI command (it exports _start, not handle): " + REACTOR_HOWTO)
        raise ApiError(400, "module does not export a function 'handle'")
    if len(entries) > 1:
        raise ApiError(400, "module exports both handle and handle_raw: export one (ambiguous)")
    for name, expected in ((entries[0], HOST_SIGNATURE), ("alloc", (("i32",), ("i32",))),
                           ("_initialize", ((), ()))):
        kind = exports.get(name)
        if kind is not None and (not isinstance(kind, wasmtime.FuncType) or _signature(kind) != expected):
            raise ApiError(400, f"'{name}' must be a function {_describe_signature(expected)}, "
                                f"found {_describe(kind)}")

    unsupported, mismatched, imports_memory, memory_min = [], [], False, 0
    for item in module.imports:
        kind = item.type
        name = f"{item.module}.{item.name}"
        if item.module == "env" and item.name == "memory" and isinstance(kind, wasmtime.MemoryType):
            imports_memory, memory_min = True, kind.limits.min
            continue
        expected = provided(item.module, item.name)
        if expected is None:
            unsupported.append(f"{name} ({_describe(kind)})")
        elif not isinstance(kind, wasmtime.FuncType) or _signature(kind) != expected:
            mismatched.append(f"{name} must be {_describe_signature(expected)}, found {_describe(kind)}")
    if mismatched:
        raise ApiError(400, "module imports with the wrong signature: " + "; ".join(mismatched))
    if unsupported:
        raise ApiError(400, "module imports what aeordb.py does not provide: " + ", ".join(unsupported))

    memories = [t for t in exports.values() if isinstance(t, wasmtime.MemoryType)]
    if not isinstance(exports.get("memory"), wasmtime.MemoryType) and not imports_memory:
        raise ApiError(400, "module neither exports 'memory' nor imports 'env.memory'")
    for memory in memories + ([wasmtime.MemoryType(wasmtime.Limits(memory_min, None))] if imports_memory else []):
        check_initial_memory(memory.limits.min * WASM_PAGE, settings)
    for export in exports.values():
        if isinstance(export, wasmtime.TableType):
            check_initial_table(export.limits.min, settings)
    writes = any(item.module == "aeordb" and item.name in WRITING_HOST_FUNCTIONS for item in module.imports)
    return ModuleShape(has_alloc="alloc" in exports, imports_memory=imports_memory, writes_files=writes,
                       quick_instantiate=wasm_bytes is not None and instantiates_quickly(wasm_bytes),
                       entry=entries[0], initialize="_initialize" in exports,
                       wasi=any(item.module == WASI_MODULE for item in module.imports))


def _describe_signature(signature: tuple) -> str:
    params, results = signature
    return f"({', '.join(params)}) -> " + (results[0] if len(results) == 1 else f"({', '.join(results)})")


def _describe(kind: Any) -> str:
    if isinstance(kind, wasmtime.FuncType):
        return "func " + _describe_signature(_signature(kind))
    return type(kind).__name__.replace("Type", "").lower()


def _read_leb(data: bytes, pos: int) -> tuple:
    """(value, next position) of the unsigned LEB128 number at ``pos``."""
    value = shift = 0
    while shift < 70:
        byte = data[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise ValueError("LEB128 number too long")


def _sections(wasm_bytes: bytes) -> Iterator[tuple]:
    """(id, start, size) of a binary module's sections.

    Raises ValueError at a malformed header, and past 1,000 sections (garbage
    may be all tiny sections): callers stop there, or assume the worst.
    """
    pos, count = 8, 0
    while pos < len(wasm_bytes):
        count += 1
        if count > 1000:
            raise ValueError("more than 1000 sections")
        try:
            size, start = _read_leb(wasm_bytes, pos + 1)
        except IndexError:
            raise ValueError("truncated section header") from None
        if start + size > len(wasm_bytes):
            raise ValueError("section runs past the end")
        yield wasm_bytes[pos], start, size
        pos = start + size


QUICK_DATA = 1 * MiB   # data segments up to this size instantiate quickly (README, Performance)


def instantiates_quickly(wasm_bytes: bytes) -> bool:
    """Whether instantiating runs no guest code (no start section) and copies little.

    Then FastGuestOps keeps the GIL for it. Data segments over QUICK_DATA
    take milliseconds to map into a cold pool slot, too long to stall other
    threads for. A binary not read to its end counts as slow.
    """
    try:
        data = 0
        for kind, _, size in _sections(wasm_bytes):
            if kind == SECTION_START:
                return False
            if kind == SECTION_DATA:
                data += size
        return data <= QUICK_DATA
    except ValueError:
        return False


def check_declared_sizes(wasm_bytes: bytes, settings: Settings) -> None:
    """Refuse, before compiling, a module whose own memories or tables start over the limits.

    wasmtime-py lists only imported and exported ones: an unexported memory or
    table over the limit would deploy fine and fail every invocation (or, with
    the pooling allocator, fail compilation with a vague message). Reads the
    table and memory sections; stops quietly at anything unexpected,
    since the compiler validates the module anyway (and the pooling
    allocator still refuses what does not fit its slots).
    """
    data = wasm_bytes
    with contextlib.suppress(IndexError, ValueError):
        for kind, pos, _ in _sections(wasm_bytes):
            if kind not in (SECTION_TABLE, SECTION_MEMORY):
                continue
            count, item = _read_leb(data, pos)
            for _ in range(min(count, 100)):      # wasmtime allows at most 100 of each
                if kind == SECTION_TABLE:
                    if data[item] == 0x40:        # a table with an initializer: not read further
                        break
                    item = _read_leb(data, item + 1)[1] if data[item] in (0x63, 0x64) else item + 1
                flags = data[item]
                minimum, item = _read_leb(data, item + 1)
                if flags & 1:
                    item = _read_leb(data, item)[1]
                page = WASM_PAGE
                if kind == SECTION_MEMORY and flags & 8:   # custom page size: its log2 follows
                    log2, item = _read_leb(data, item)
                    page = 1 << min(log2, 16)
                if kind == SECTION_TABLE:
                    check_initial_table(minimum, settings)
                else:
                    check_initial_memory(minimum * page, settings)


###############################################################################
# Plugin registry ##############################################################
###############################################################################
#
# On disk, one folder per plugin:  plugins/{db}/{schema}/{table}/
#     plugin.json          metadata, the commit point of a deploy
#     module-<sha256>.wasm the module as deployed
# and compiled artifacts in cache/<sha256>-<engine fingerprint>.cwasm, each
# prefixed with a hash of its payload so a torn or tampered artifact is
# recompiled instead of trusted. A deploy writes the module, then the
# metadata (rename), then removes the old module: a crash at any moment leaves
# the old plugin or the new one.
#
# A plugin deployed with today's AeorDB routes as /plugins/{name} is the one at
# key "<--default-db>/plugins/<name>": one registry, one folder layout, and
# the seed routes reach it too. Its plugin_id and created_at outlive redeploys
# (both eras), so plugin.json also keeps updated_at, checksum and author.

DEFAULT_DB_PLUGINS = "plugins"   # the schema segment of today's plugins' keys

ARTIFACT_MAGIC = b"AEORDB-CWASM-1\n"


def plugin_metadata_files(root: Path) -> list:
    """The plugin.json of every plugin deployed under ``root`` (DATA_DIR/plugins)."""
    return sorted(root.glob("*/*/*/plugin.json"))


@dataclasses.dataclass
class Plugin:
    meta: dict
    module: wasmtime.Module
    shape: ModuleShape
    pre: Optional[wasmtime.InstancePre] = None   # None when the module imports env.memory
    holds_gil: bool = True   # False once a call of it ran past HOLD_TICKS (see WasmRuntime.invoke)

    @property
    def key(self) -> str:
        return self.meta["path"]


def _deployment(meta: dict) -> tuple:
    """What tells one deploy of a path from another (file times can be too coarse to)."""
    return meta.get("plugin_id"), meta.get("sha256"), meta.get("deployed_at")


def today_meta(meta: dict, default_db: str) -> dict:
    """A plugin's metadata as today's AeorDB answers it, keys in its order. A plugin of today's
    routes has its name as its path; another plugin of the default database keeps its key."""
    db, schema, table = meta["path"].split("/")
    return {"plugin_id": meta["plugin_id"], "name": meta["name"],
            "path": table if (db, schema) == (default_db, DEFAULT_DB_PLUGINS) else meta["path"],
            "plugin_type": meta["plugin_type"], "created_at": meta["created_at"],
            "version": meta.get("version"), "author": meta.get("author"), "checksum": meta["checksum"],
            "updated_at": meta["updated_at"]}


class ChangeCounter:
    """A count of changes shared by every process serving a data dir: 8 bytes of a file, mapped.

    Reading it costs a memory load, so every request can ask whether any
    process changed anything; it is increased under the data dir's lock.
    Where the file cannot be mapped, it is read with pread.
    """

    _COUNT = struct.Struct("<Q")

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        if os.fstat(self._fd).st_size < self._COUNT.size:
            os.ftruncate(self._fd, self._COUNT.size)
        try:
            self._map: Optional[mmap.mmap] = mmap.mmap(self._fd, self._COUNT.size)
        except (OSError, ValueError):
            self._map = None
        else:
            os.close(self._fd)   # the map holds the file

    def value(self) -> int:
        if self._map is not None:
            return self._COUNT.unpack_from(self._map)[0]
        return self._COUNT.unpack(os.pread(self._fd, self._COUNT.size, 0))[0]

    def increase(self) -> None:
        """Only under the data dir's lock: two processes must not both write count + 1."""
        count = self._COUNT.pack((self.value() + 1) % (1 << 64))
        if self._map is not None:
            self._map[:] = count
        else:
            os.pwrite(self._fd, count, 0)


class PluginRegistry:
    """The deployed plugins, on disk under DATA_DIR/plugins and compiled in memory.

    The disk is the truth: other processes may serve the same data dir. A
    deploy or remove holds DATA_DIR/plugins.lock (no process removes what
    another is deploying) and increases the shared ChangeCounter; a lookup
    that sees the counter moved first reloads whichever plugin.json changed.
    """

    def __init__(self, settings: Settings, wasm: Wasm, linker_factory: Callable[[], wasmtime.Linker]):
        self.settings = settings
        self.wasm = wasm
        self._signatures: dict = {}
        self.root = settings.data_dir / "plugins"
        self.cache = settings.data_dir / "cache"
        self._lock_name = str(settings.data_dir / "plugins.lock")
        self.changes = ChangeCounter(settings.data_dir / "plugins.changes")
        self._synced = self.changes.value()
        self._linker = linker_factory()
        self._plugins: dict = {}
        self._lock = threading.Lock()
        # Called with a key where a plugin came, went or was replaced by another (see _install).
        self.forgotten: Callable[[str], None] = lambda key: None
        self.load_all()

    # -- reading ---------------------------------------------------------------

    def get(self, key: str) -> Plugin:
        """The plugin at ``key`` as deployed now, by whichever process."""
        if self.changes.value() != self._synced:
            self.sync()
        plugin = self._plugins.get(key)
        if plugin is None:
            raise ApiError(404, f"no plugin deployed at {key}")
        return plugin

    def sync(self) -> None:
        """Take up what other processes deployed, replaced or removed."""
        with self._lock:
            count = self.changes.value()   # read first: a change made during the scan is taken up next time
            if count == self._synced:
                return
            on_disk = {key: _deployment(meta) for key, meta in self._on_disk().items() if meta is not None}
            for key in set(self._plugins) - set(on_disk):
                self._install(key, None)
            for key, deployment in on_disk.items():
                plugin = self._plugins.get(key)
                if plugin is None or _deployment(plugin.meta) != deployment:
                    # None: what this process had is no longer deployed: do not serve it
                    self._install(key, self._load_folder(self.root / key))
            self._synced = count

    def _install(self, key: str, plugin: Optional[Plugin]) -> None:
        """Serve ``plugin`` at ``key`` (None: nothing). Anything but a redeploy (which keeps
        plugin_id) starts the count of what the plugin at ``key`` did afresh."""
        old = self._plugins.pop(key, None)
        if plugin is not None:
            self._plugins[key] = plugin
        if old is None or plugin is None or plugin.meta["plugin_id"] != old.meta["plugin_id"]:
            self.forgotten(key)

    def _on_disk(self) -> dict:
        """Every deployed plugin's plugin.json, by key, as a dict (None where it cannot be read)."""
        found = {}
        for meta_file in plugin_metadata_files(self.root):
            try:
                found["/".join(meta_file.parent.relative_to(self.root).parts)] = self._meta_in(meta_file)
            except FileNotFoundError:   # removed meanwhile
                continue
        return found

    @staticmethod
    def _meta_in(meta_file: Path) -> Optional[dict]:
        """One plugin.json as a dict; None when it cannot be read; FileNotFoundError when absent."""
        try:
            meta = json.loads(meta_file.read_bytes())
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def list(self, db: str) -> list:
        return [meta for meta in self.list_all() if meta["path"].split("/", 1)[0] == db]

    def list_all(self) -> list:
        if self.changes.value() != self._synced:
            self.sync()
        return [dict(plugin.meta) for _, plugin in sorted(self._plugins.items())]

    def provided(self, module: str, name: str) -> Optional[tuple]:
        """The signature of the function the server provides as import ``module.name``, or None."""
        key = (module, name)
        if key not in self._signatures:
            store = wasmtime.Store(self.wasm.engine)
            try:
                item = self._linker.get(store, module, name)
                self._signatures[key] = _signature(item.type(store)) if isinstance(item, wasmtime.Func) else None
            except wasmtime.WasmtimeError:
                self._signatures[key] = None
            finally:
                store.close()
        return self._signatures[key]

    # -- writing ---------------------------------------------------------------

    def check(self, wasm_bytes: bytes) -> tuple:
        """(compiled module, its shape): everything a deploy checks, and nothing written.

        ApiError(400) names what is wrong; the command line's ``check`` runs exactly this.
        """
        if not wasm_bytes.startswith(b"\0asm"):
            # wasmtime-py would compile anything else as the text format, past
            # check_declared_sizes and into a module file that is not a module.
            raise ApiError(400, "not a valid WebAssembly module: it does not start with '\\0asm' "
                                "(send the binary format)")
        check_declared_sizes(wasm_bytes, self.settings)
        try:
            module = self.wasm.compile(wasm_bytes, wait=self.settings.timeout)
        except wasmtime.WasmtimeError as exc:
            if no_memory_left(exc):
                raise ApiError(503, f"no memory left to compile the module right now: {_first_line(exc)}",
                               RETRY_SOON) from None
            raise ApiError(400, f"not a valid WebAssembly module: {_first_line(exc)}") from None
        return module, inspect_module(module, self.settings, wasm_bytes, self.provided)

    def deploy(self, db: str, schema: str, table: str, wasm_bytes: bytes, name: str,
               plugin_type: str, version: Optional[str] = None, author: Optional[str] = None) -> dict:
        """Deploy or replace the plugin at db/schema/table: its metadata, as plugin.json keeps it.

        A redeploy keeps plugin_id and created_at; version and author are the
        ones given now (absent when not given).
        """
        key = f"{db}/{schema}/{table}"
        module, shape = self.check(wasm_bytes)
        sha = hashlib.sha256(wasm_bytes).hexdigest()
        now = utc_now_iso()
        meta = {"plugin_id": str(uuid.uuid4()), "name": name, "path": key, "plugin_type": plugin_type,
                "deployed_at": now, "sha256": sha, "size": len(wasm_bytes), "created_at": now,
                "updated_at": now, "checksum": f"sha256:{sha}"}
        for field, value in (("version", version), ("author", author)):
            if value is not None:
                meta[field] = value
        folder = self.root / db / schema / table
        try:
            # Everything is written under the lock: a concurrent deploy or remove
            # would otherwise delete our module or artifact as stale before our
            # plugin.json points at it.
            prepared = self._prepare(meta, module, shape)   # before any write: it may fail
            with self._changing("deploying"):
                # Read under the lock, so two processes redeploying at once keep the same id.
                with contextlib.suppress(FileNotFoundError):
                    previous = self._meta_in(folder / "plugin.json")
                    if previous is not None and isinstance(previous.get("plugin_id"), str):
                        meta["plugin_id"] = previous["plugin_id"]
                        created = previous.get("created_at") or previous.get("deployed_at")
                        meta["created_at"] = created if isinstance(created, str) else now
                self._store_artifact(sha, module)
                atomic_write(folder / f"module-{sha}.wasm", wasm_bytes)
                atomic_write(folder / "plugin.json", json.dumps(meta, indent=2).encode())
                self._install(key, prepared)
                self._changed()
                self._remove_stale_modules(folder, keep=sha)
                self._prune_cache()
        except OSError as exc:
            if is_storage_fault(exc):
                raise storage_error("deploying", exc) from None
            raise
        return dict(meta)

    def remove(self, db: str, schema: str, table: str) -> None:
        key = f"{db}/{schema}/{table}"
        folder = self.root / db / schema / table
        with self._changing("removing"):
            if not (folder / "plugin.json").exists():
                raise ApiError(404, f"no plugin deployed at {key}")
            try:
                (folder / "plugin.json").unlink()
                fsync_dir(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise storage_error("removing", exc) from None
            self._install(key, None)
            self._changed()
            self._remove_stale_modules(folder, keep=None)
            self._prune_cache()
            self._remove_empty_folders(folder)

    @contextlib.contextmanager
    def _changing(self, what: str) -> Iterator[None]:
        """This process's lock, then the data dir's: a change here never races one elsewhere."""
        with self._lock, contextlib.ExitStack() as held:
            try:
                held.enter_context(held_lock_file(self._lock_name))
            except OSError as exc:
                raise storage_error(what, exc) from None
            yield

    def _changed(self) -> None:
        """Tell every process (under _changing); this one needs no scan when it had seen all before."""
        up_to_date = self.changes.value() == self._synced
        self.changes.increase()
        if up_to_date:
            self._synced = self.changes.value()

    # -- loading ---------------------------------------------------------------

    def load_all(self) -> None:
        """Load every deployed plugin; clean what interrupted writes left behind."""
        removed = remove_temp_files(self.settings.data_dir)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted write", removed)
        if not self.root.is_dir():
            return
        for meta_file in sorted(self.root.glob("*/*/*/plugin.json")):
            plugin = self._load_folder(meta_file.parent)
            if plugin is not None:
                self._plugins[plugin.key] = plugin
        # Cleaning up waits for a deploy in another process: its new module is not stale.
        with self._changing("cleaning up plugins"):
            on_disk = self._on_disk()
            for key, meta in on_disk.items():
                if meta is not None and "sha256" in meta:
                    self._remove_stale_modules(self.root / key, keep=meta["sha256"])
            # A crash or a full disk between a first deploy's module and its
            # plugin.json leaves a module that was never deployed: remove it.
            for folder in {module_file.parent for module_file in self.root.glob("*/*/*/module-*.wasm")}:
                if not (folder / "plugin.json").exists():
                    self._remove_stale_modules(folder, keep=None)
                    self._remove_empty_folders(folder)
            self._prune_cache(on_disk)

    def _load_folder(self, folder: Path) -> Optional[Plugin]:
        """The plugin a folder holds (None, and the reason logged, when it cannot be loaded)."""
        meta_file = folder / "plugin.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            # The folder, not the recorded path, says where a plugin lives: a
            # folder an operator copied elsewhere must not shadow the original.
            meta["path"] = "/".join(folder.relative_to(self.root).parts)
            # What an older version deployed lacks the fields added since.
            meta.setdefault("created_at", meta["deployed_at"])
            meta.setdefault("updated_at", meta["deployed_at"])
            meta["checksum"] = f"sha256:{meta['sha256']}"   # what the module is, whatever the file says
            module_file = folder / f"module-{meta['sha256']}.wasm"
            module, wasm_bytes = self._load_module(meta["sha256"], module_file)
            shape = inspect_module(module, self.settings, wasm_bytes, self.provided)
            plugin = self._prepare(meta, module, shape)
            if not module_file.exists():
                log.warning("plugin %s runs from its compiled artifact: %s is missing", meta["path"], module_file)
            return plugin
        except Exception as exc:
            log.error("cannot load plugin in %s: %s", folder, exc)
            return None

    def _load_module(self, sha: str, module_file: Path) -> tuple:
        """(compiled module, its verified binary or None when the module file is missing)."""
        wasm_bytes = None
        with contextlib.suppress(OSError):
            wasm_bytes = module_file.read_bytes()
        if wasm_bytes is not None and hashlib.sha256(wasm_bytes).hexdigest() != sha:
            log.warning("%s does not match its recorded sha256; not used", module_file)
            wasm_bytes = None
        artifact = self.cache / f"{sha}-{self.wasm.fingerprint}.cwasm"
        with contextlib.suppress(OSError):
            blob = artifact.read_bytes()
            header = len(ARTIFACT_MAGIC) + 64
            if blob.startswith(ARTIFACT_MAGIC) and \
                    blob[len(ARTIFACT_MAGIC):header].decode("ascii", "replace") == \
                    hashlib.sha256(blob[header:]).hexdigest():
                try:
                    return wasmtime.Module.deserialize(self.wasm.engine, blob[header:]), wasm_bytes
                except wasmtime.WasmtimeError as exc:
                    log.warning("artifact %s rejected by wasmtime (%s); recompiling", artifact.name, exc)
            else:
                log.warning("artifact %s is damaged; recompiling", artifact.name)
        if wasm_bytes is None:
            raise ValueError(f"no usable compiled artifact, and {module_file.name} is missing or damaged")
        module = self.wasm.compile(wasm_bytes)
        with contextlib.suppress(OSError):
            self._store_artifact(sha, module)
        return module, wasm_bytes

    def _store_artifact(self, sha: str, module: wasmtime.Module) -> None:
        payload = module.serialize()
        blob = ARTIFACT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload
        atomic_write(self.cache / f"{sha}-{self.wasm.fingerprint}.cwasm", blob)

    def _prune_cache(self, on_disk: Optional[dict] = None) -> None:
        """Drop artifacts no plugin on disk uses any more (whichever process deployed it), and
        those of other engine settings. ``on_disk``: _on_disk(), where the caller has it."""
        metas = [plugin.meta for plugin in self._plugins.values()]
        for meta in (self._on_disk() if on_disk is None else on_disk).values():
            if meta is None or "sha256" not in meta:
                return   # cannot tell what that plugin uses: keep everything
            metas.append(meta)
        wanted = {f"{meta['sha256']}-{self.wasm.fingerprint}.cwasm" for meta in metas}
        for artifact in self.cache.glob("*.cwasm"):
            if artifact.name not in wanted:
                with contextlib.suppress(OSError):
                    artifact.unlink()

    def _prepare(self, meta: dict, module: wasmtime.Module, shape: ModuleShape) -> Plugin:
        pre = None if shape.imports_memory else self._linker.instantiate_pre(module)
        return Plugin(meta=meta, module=module, shape=shape, pre=pre)

    @staticmethod
    def _remove_stale_modules(folder: Path, keep: Optional[str]) -> None:
        for stale in folder.glob("module-*.wasm"):
            if keep is None or stale.name != f"module-{keep}.wasm":
                with contextlib.suppress(OSError):
                    stale.unlink()

    @staticmethod
    def _remove_empty_folders(folder: Path) -> None:
        """A plugin's table folder, then its schema and db folders, where nothing else is left."""
        for empty in (folder, folder.parent, folder.parent.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()


###############################################################################
# Query language ###############################################################
###############################################################################

_FIELD = re.compile(r"[A-Za-z0-9_$@-]+(\.[A-Za-z0-9_$@-]+)*")
MAX_QUERY_LIMIT = 10_000
MAX_QUERY_CONDITIONS = 5_000   # conditions plus 'in' values: SQLite caps bound parameters at 32766
# Each becomes SQL columns or terms; SQLite refuses past about 2,000 columns.
MAX_ORDER_FIELDS, MAX_GROUP_FIELDS, MAX_AGGREGATE_FIELDS = 32, 32, 256
_COMBINATORS = {"and": "AND", "or": "OR", "not": "NOT"}


def _balanced(parts: list, word: str) -> str:
    """``parts`` joined by AND/OR as a balanced tree: SQLite refuses expressions nested
    deeper than 1000, and a flat 'a OR b OR c ...' nests one level per term."""
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    return f"({_balanced(parts[:middle], word)} {word} {_balanced(parts[middle:], word)})"


def _greatest(parts: list) -> str:
    """SQL of the largest of ``parts``: SQLite's max() takes at most 127 arguments."""
    while len(parts) > 100:
        parts = [f"max({', '.join(parts[i:i + 100])})" for i in range(0, len(parts), 100)]
    return f"max({', '.join(parts)})" if len(parts) > 1 else parts[0]


def _sql_text(value: str) -> str:
    """A string for SQLite, which cannot take JSON's lone surrogates ("\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"string value {value[:64]!r} is not valid Unicode (a lone surrogate)") from None
    return value


def _sql_number(value: Any) -> Any:
    """JSON integers beyond 64 bits as floats, as SQLite's JSON functions read them."""
    if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
        return float(value) if abs(value) < 2 ** 1000 else (math.inf if value > 0 else -math.inf)
    return value


class QueryClock(threading.local):
    """The deadline of the statement this thread runs (FileStore.set_deadline sets it). SQLite's
    progress handler checks it between its own steps; a long comparison in a query function
    checks it too, and gives up past it (the statement is then interrupted)."""

    deadline: Optional[float] = None

    def past(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


query_clock = QueryClock()
CLOCK_CELLS = 65_536   # cells of a comparison's table between checks of the query clock


# -- text matching: the algorithms of today's AeorDB ---------------------------
# Exactly as upstream computes them (the facts in AEORDB_TODAY.md 2.5-2.6), so
# that scores and matches agree; the SQL pre-filters in QueryPlan only ever
# skip rows these functions would refuse.

_ALNUM_RUN = re.compile(r"[^\W_]+")   # a run of letters and digits
_VOWELS = frozenset("AEIOU")
_SOUNDEX_DIGITS = {letter: digit for letters, digit in (("BFPV", "1"), ("CGJKQSXZ", "2"), ("DT", "3"),
                                                        ("L", "4"), ("MN", "5"), ("R", "6"))
                   for letter in letters}


def trigrams(text: str) -> set:
    """Lower-cased words (runs of letters and digits), each padded as '  word ', cut in 3-character windows."""
    grams: set = set()
    for word in _ALNUM_RUN.findall(text.lower()):
        padded = f"  {word} "
        grams.update(padded[i:i + 3] for i in range(len(padded) - 2))
    return grams


def trigram_similarity(first: str, second: str) -> float:
    """Dice coefficient of the trigram sets; 0 when both are empty."""
    return _dice(trigrams(first), trigrams(second))


def _dice(a: Any, b: Any) -> float:
    return 2 * len(a & b) / (len(a) + len(b)) if a or b else 0.0


@functools.lru_cache(maxsize=256)
def _query_trigrams(query: str) -> frozenset:
    """A query's trigrams, computed once for the rows it is compared with."""
    return frozenset(trigrams(query))


def osa_distance(a: str, b: str, bound: Optional[int] = None) -> int:
    """Damerau-Levenshtein distance (optimal string alignment) over code points.

    With ``bound`` only cells within ``bound`` of the diagonal are computed and
    the work stops once a row is past it: a distance over ``bound`` comes back
    as ``bound + 1``.
    """
    n, m = len(a), len(b)
    limit = max(n, m) if bound is None else min(bound, max(n, m))
    if abs(n - m) > limit:
        return limit + 1
    over = limit + 1
    clock_rows = max(1, CLOCK_CELLS // (2 * limit + 1))
    before, previous = None, [min(j, over) for j in range(m + 1)]
    for i in range(1, n + 1):
        row = [over] * (m + 1)
        if i <= limit:
            row[0] = i
        low, high = max(1, i - limit), min(m, i + limit)
        char, last = a[i - 1], a[i - 2] if i > 1 else None
        if i % clock_rows == 0 and query_clock.past():
            return over
        for j in range(low, high + 1):
            cost = previous[j - 1] + (char != b[j - 1])
            cell = min(previous[j] + 1, row[j - 1] + 1, cost)
            if last is not None and j > 1 and char == b[j - 2] and last == b[j - 1]:
                cell = min(cell, before[j - 2] + 1)
            row[j] = min(cell, over)
        if min(row[low - 1:high + 1]) > limit:
            return over
        before, previous = previous, row
    return previous[m]


def jaro_winkler(a: str, b: str) -> float:
    """Jaro-Winkler similarity over code points: greedy matching in the window, prefix bonus up to 4."""
    if not a or not b:
        return 1.0 if a == b else 0.0
    window = max(max(len(a), len(b)) // 2 - 1, 0)
    taken = [False] * len(b)
    matched_a = []
    clock_rows = max(1, CLOCK_CELLS // (2 * window + 1))
    for i, char in enumerate(a):
        if i % clock_rows == clock_rows - 1 and query_clock.past():
            return 0.0
        for j in range(max(0, i - window), min(i + window + 1, len(b))):
            if not taken[j] and b[j] == char:
                taken[j] = True
                matched_a.append(char)
                break
    matches = len(matched_a)
    if not matches:
        return 0.0
    matched_b = [char for char, hit in zip(b, taken) if hit]
    half_transpositions = sum(x != y for x, y in zip(matched_a, matched_b)) / 2
    jaro = (matches / len(a) + matches / len(b) + (matches - half_transpositions) / matches) / 3
    prefix = 0
    for x, y in zip(a[:4], b[:4]):
        if x != y:
            break
        prefix += 1
    return jaro + prefix * 0.1 * (1 - jaro)


def _ascii_letters(word: str) -> str:
    return "".join(char for char in word.upper() if "A" <= char <= "Z")


def soundex(word: str) -> str:
    """American Soundex of the word's ASCII letters ('' without any): H and W keep the previous code."""
    letters = _ascii_letters(word)
    if not letters:
        return ""
    code, previous = letters[0], _SOUNDEX_DIGITS.get(letters[0])
    for letter in letters[1:]:
        digit = _SOUNDEX_DIGITS.get(letter)
        if digit is None:
            if letter not in "HW":
                previous = None
            continue
        if digit != previous:
            code += digit
            if len(code) == 4:
                break
        previous = digit
    return code.ljust(4, "0")


def double_metaphone(word: str) -> tuple:
    """(primary, alternate or None): upstream AeorDB's own simplified Double Metaphone, rule for rule."""
    letters = _ascii_letters(word)
    if not letters:
        return "", None
    primary = _metaphone(letters)
    alternate = ("S" + primary[1:])[:4] if letters.startswith("SCH") else primary
    return primary, alternate if alternate != primary else None


def _metaphone(w: str) -> str:
    out, i = "", 1 if w[:2] in ("GN", "KN", "PN", "AE", "WR") else 0

    def at(k: int) -> str:
        return w[k] if 0 <= k < len(w) else ""

    def skip_double(letter: str) -> int:
        return 2 if at(i + 1) == letter else 1

    while i < len(w) and len(out) < 4:
        char, after, later, before = w[i], at(i + 1), at(i + 2), at(i - 1)
        if char in _VOWELS:
            out, step = out + ("A" if i == 0 else ""), 1
        elif char == "B":
            out, step = out + "P", skip_double("B")
        elif char == "C":
            if after == "H":
                out, step = out + "X", 2
            elif after in ("I", "E", "Y"):
                out, step = out + "S", 2
            else:
                out, step = out + "K", 2 if after == "C" and later not in ("I", "E") else 1
        elif char == "D":
            if after == "G" and later in ("I", "E", "Y"):
                out, step = out + "J", 3
            else:
                out, step = out + "T", skip_double("D")
        elif char == "G":
            if after == "H":
                out, step = out + ("" if i > 0 and before in _VOWELS else "K"), 2
            elif after == "N":
                step = 2
            elif after in ("I", "E", "Y") and before != "G":
                out, step = out + "J", 2
            else:
                out, step = out + ("" if after == "G" and i != 0 else "K"), 2 if after == "G" else 1
        elif char == "H":
            out, step = out + ("H" if after in _VOWELS and before not in _VOWELS else ""), 1
        elif char == "K":
            out, step = out + "K", 2 if before == "C" else 1
        elif char == "P":
            out, step = (out + "F", 2) if after == "H" else (out + "P", skip_double("P"))
        elif char == "Q":
            out, step = out + "K", skip_double("Q")
        elif char == "S":
            if after == "H":
                out, step = out + "X", 2
            elif after == "C" and later == "H" or after in ("I", "E") and later in ("O", "A"):
                out, step = out + "X", 3
            else:
                out, step = out + "S", 2 if after in ("S", "Z") else 1
        elif char == "T":
            if after == "H":
                out, step = out + "0", 2
            elif after == "I" and later in ("O", "A"):
                out, step = out + "X", 3
            else:
                out, step = out + "T", skip_double("T")
        elif char == "V":
            out, step = out + "F", skip_double("V")
        elif char in ("W", "Y"):
            out, step = out + ("A" if after in _VOWELS else ""), 1
        elif char == "X":
            out, step = out + ("KS" if len(out) < 3 else "K"), skip_double("X")
        elif char == "Z":
            out, step = out + "S", skip_double("Z")
        else:   # F J L M N R
            out, step = out + char, skip_double(char)
        i += step
    return out[:4]


def phonetic_words(text: str) -> list:
    """The whitespace-separated words that hold a letter, as the phonetic operators see them."""
    return [word for word in text.split() if any(char.isalpha() for char in word)]


@functools.lru_cache(maxsize=65536)
def word_codes(word: str) -> tuple:
    """(soundex, metaphone primary, metaphone alternate or None) of one word.

    Cached: names and words repeat across documents, and a query computes the
    codes of every value it looks at.
    """
    return (soundex(word), *double_metaphone(word))


@functools.lru_cache(maxsize=256)
def _query_codes(query: str) -> tuple:
    return tuple(word_codes(word) for word in phonetic_words(query))


def phonetic_labels(value: str, query: str) -> list:
    """Which phonetic codes some query word shares with some value word: soundex, dmetaphone, dmetaphone_alt."""
    value_codes = [word_codes(word) for word in phonetic_words(value)]
    sounds = {codes[0] for codes in value_codes}
    metaphones = {code for codes in value_codes for code in codes[1:] if code}
    fired = set()
    for sound, primary, alternate in _query_codes(query):
        if sound and sound in sounds:
            fired.add("soundex")
        if primary and primary in metaphones:
            fired.add("dmetaphone")
        if alternate and alternate in metaphones:
            fired.add("dmetaphone_alt")
    return [label for label in ("soundex", "dmetaphone", "dmetaphone_alt") if label in fired]


def auto_fuzziness(query: str) -> int:
    """Edits a fuzzy query allows by default, by the query's UTF-8 length: 0-2 bytes none, 3-5 one, else two."""
    size = len(query.encode("utf-8"))
    return 0 if size <= 2 else 1 if size <= 5 else 2


def fuzzy_score(value: str, query: str, allowed: int) -> Optional[float]:
    """1 - distance / longer UTF-8 length when the OSA distance is at most ``allowed``, else None."""
    distance = osa_distance(query, value, allowed)
    if distance > allowed:
        return None
    return 1 - distance / max(len(query.encode("utf-8")), len(value.encode("utf-8", "surrogatepass")), 1)


def jaro_winkler_score(value: str, query: str, threshold: float) -> Optional[float]:
    score = jaro_winkler(query, value)
    return score if score >= threshold and score > 0 else None


def similar_score(value: str, query: str, threshold: float) -> Optional[float]:
    score = _dice(_query_trigrams(query), trigrams(value))
    return score if score >= threshold and score > 0 else None


def match_parts(value: str, query: str) -> tuple:
    """(score, labels) of the 'match' operator: the best of the strategies that fired, and their names."""
    parts = []
    if value.lower() == query.lower():
        parts.append(("exact", 1.0))
    similarity = _dice(_query_trigrams(query), trigrams(value))
    if similarity > 0.3:
        parts.append(("trigram", similarity))
    labels = phonetic_labels(value, query)
    parts += [(label, 1.0) for label in labels if label != "dmetaphone_alt"]   # primary codes only
    fuzzy = fuzzy_score(value, query, auto_fuzziness(query))
    if fuzzy is not None:
        parts.append(("fuzzy", fuzzy))
    score = max((part_score for _, part_score in parts), default=0.0)
    return (score, [label for label, _ in parts]) if score > 0 else (0.0, [])


# -- the query plan ------------------------------------------------------------

TEXT_OPERATORS = ("similar", "phonetic", "fuzzy", "match")
OPERATORS = ("eq", "in", "gt", "lt", "between", "contains", *TEXT_OPERATORS)
DEFAULT_SIMILARITY, DEFAULT_JARO_WINKLER = 0.3, 0.8
MAX_PREFILTER_TERMS = 64   # SQL terms a pre-filter spends on one query; past them it checks a subset
MAX_PHONETIC_PATTERNS = 16   # codes a phonetic pre-filter checks; a query with more words goes unfiltered
# Each takes a column and up to a few hundred parameters: SQLite allows 2,000 and 32,766.
MAX_TEXT_CONDITIONS = 100
# File metadata a query names with '@': (JSON type, SQL over a row of `files`).
VIRTUAL_FIELDS = {
    "@path": ("text", "files.path"),
    "@filename": ("text", "substr(files.path, length(files.parent) + 2 - (files.parent = '/'))"),
    "@file_name": ("text", "substr(files.path, length(files.parent) + 2 - (files.parent = '/'))"),
    "@extension": ("text", "aeordb_extension(files.path)"),
    "@content_type": ("text", "files.content_type"),
    "@hash": ("text", "files.etag"),
    "@size": ("integer", "files.size"),
    "@created_at": ("integer", "files.created_at"),
    "@updated_at": ("integer", "files.updated_at"),
}
# The letters each Double Metaphone and Soundex code character can come from: a
# value lacking them cannot have that code (upper-casing past ASCII aside).
_METAPHONE_SOURCES = {"A": "AEIOUWY", "P": "BP", "X": "CST", "S": "CSXZ", "K": "CGKQX", "J": "DGJ",
                      "T": "DT", "F": "FPV", "0": "T", "H": "H", "L": "L", "M": "M", "N": "N", "R": "R"}
_SOUNDEX_SOURCES = {digit: "".join(sorted(k for k, d in _SOUNDEX_DIGITS.items() if d == digit))
                    for digit in set(_SOUNDEX_DIGITS.values())}
# SQLite folds the case of ASCII only; Python's str.upper() also makes ASCII letters of these
# (so they count as those letters for phonetic codes), and str.lower() of these two.
_UPPER_TO_ASCII = "ßıŉſǰẖẗẘẙẚﬀﬁﬂﬃﬄﬅﬆ"
_LOWER_TO_ASCII = {"\u0130": "i", "\u212a": "k"}   # İ, Kelvin sign


def json_path(field: Any) -> str:
    if not isinstance(field, str) or not _FIELD.fullmatch(field):
        raise ApiError(400, f"invalid field {field!r}: use names of letters, digits, '_', '-', "
                            "joined by '.'")
    return "$" + "".join(f'."{part}"' for part in field.split("."))


@dataclasses.dataclass(frozen=True)
class _Operand:
    """A field as SQL over a row of `files`: its JSON type name and its value (each with ``params``)."""
    kind: str
    value: str
    params: tuple

    @classmethod
    def of(cls, field: Any) -> "_Operand":
        if isinstance(field, str) and field in VIRTUAL_FIELDS:
            kind, value = VIRTUAL_FIELDS[field]
            return cls(f"'{kind}'", value, ())
        path = json_path(field)
        return cls("json_type(files.doc, ?)", "json_extract(files.doc, ?)", (path,))


@dataclasses.dataclass
class TextLeaf:
    """One similar/phonetic/fuzzy/match condition: its SQL (a pre-filter in C, then the exact
    function) and, for the items answered, its score and matched_by labels."""
    op: str
    query: str
    setting: Any = None     # similar: threshold; fuzzy: allowed edits (int) or ("jaro_winkler", threshold)

    def score(self, value: str) -> Optional[float]:
        if self.op == "similar":
            return similar_score(value, self.query, self.setting)
        if self.op == "phonetic":
            return 1.0 if phonetic_labels(value, self.query) else None
        if self.op == "match":
            return match_parts(value, self.query)[0] or None
        if isinstance(self.setting, tuple):
            return jaro_winkler_score(value, self.query, self.setting[1])
        return fuzzy_score(value, self.query, self.setting)

    def labels(self, value: str) -> list:
        if self.op == "phonetic":
            return phonetic_labels(value, self.query)
        if self.op == "match":
            return match_parts(value, self.query)[1]
        return ["trigram"]

    def call(self) -> tuple:
        """SQL of the exact function over the value ``v`` (NULL: no match), and its parameters."""
        if self.op in ("phonetic", "match"):
            return f"aeordb_{self.op}(CAST(v AS BLOB), ?)", [self.query]
        if isinstance(self.setting, tuple):
            return "aeordb_jaro_winkler(CAST(v AS BLOB), ?, ?)", [self.query, self.setting[1]]
        return f"aeordb_{self.op}(CAST(v AS BLOB), ?, ?)", [self.query, self.setting]

    def prefilter(self) -> tuple:
        """SQL over ``v`` true for every value the exact function could accept, and its parameters."""
        if self.op == "similar":
            return _trigram_prefilter(self.query, self.setting)
        if self.op == "phonetic":
            return _phonetic_prefilter(self.query)
        if self.op == "fuzzy" and isinstance(self.setting, tuple):
            return _jaro_winkler_prefilter(self.query, self.setting[1])
        if self.op == "fuzzy":
            return _edit_prefilter(self.query, self.setting)
        parts = [_exact_prefilter(self.query), _trigram_prefilter(self.query, DEFAULT_SIMILARITY),
                 _phonetic_prefilter(self.query), _edit_prefilter(self.query, auto_fuzziness(self.query))]
        return "(" + " OR ".join(sql for sql, _ in parts) + ")", [p for _, params in parts for p in params]


def _once(columns: str) -> str:
    """A subquery SQLite computes once per row: one it may flatten has each of its expressions
    copied into every place that names it (a JSON parse per mention), and it never flattens
    one with an OFFSET."""
    return f"(SELECT {columns} LIMIT 1 OFFSET 0)"


def _shared_characters(query: str) -> tuple:
    """SQL counting the characters ``v`` shares with ``query`` (as multisets), at most overcounting
    characters past MAX_PREFILTER_TERMS; its parameters."""
    counts = collections.Counter(query)
    chosen = list(counts)[:MAX_PREFILTER_TERMS]
    unchecked = len(query) - sum(counts[char] for char in chosen)
    terms = " + ".join("(instr(v, ?) > 0)" if counts[char] == 1 else
                       f"min({counts[char]}, length(v) - length(replace(v, ?, '')))" for char in chosen)
    return f"({terms or '0'} + {unchecked})", chosen


def _edit_prefilter(query: str, allowed: int) -> tuple:
    """Within ``allowed`` edits at most that many of the query's distinct characters are missing from the
    value (an edit removes at most one), so of ``allowed + 1`` groups of them one is all there (cheap to
    test: SQLite stops at the first missing one); then the lengths differ by at most ``allowed``, and
    all but ``allowed`` of the query's characters are in the value."""
    distinct = list(dict.fromkeys(query))[:MAX_PREFILTER_TERMS]
    groups = [distinct[i::allowed + 1] for i in range(allowed + 1)] if len(distinct) > allowed else []
    present = " OR ".join("(" + " AND ".join("instr(v, ?)" for _ in group) + ")" for group in groups)
    shared, params = _shared_characters(query)
    return (f"({present or '1'}) AND abs(length(v) - ?) <= ? AND {shared} >= ?",
            [*(char for group in groups for char in group), len(query), allowed, *params, len(query) - allowed])


def _jaro_winkler_prefilter(query: str, threshold: float) -> tuple:
    """Jaro is at most j = (c/|q| + c/|v| + 1) / 3 for c shared characters, so Jaro-Winkler is at most
    j + 0.1 * l * (1 - j) for l, the common prefix (up to 4)."""
    if not query:
        return "v = ''", []
    shared, params = _shared_characters(query)
    prefix = " + ".join("(substr(v, 1, ?) = ?)" for _ in query[:4])
    inner = _once(f"{shared} AS c, {prefix} AS l")
    return (f"(SELECT j + 0.1 * l * (1 - j) >= ? AND c >= 1 FROM"
            f" {_once(f'(c * (? + 1.0 / length(v)) + 1) / 3 AS j, c, l FROM {inner}')})",
            [threshold - 1e-9, 1 / len(query), *params,
             *(p for size in range(1, min(4, len(query)) + 1) for p in (size, query[:size]))])


def _trigram_prefilter(query: str, threshold: float) -> tuple:
    """A similarity of ``threshold`` needs ``threshold * |Q| / (2 - threshold)`` shared trigrams, and a
    value holding a trigram holds its letters: count the query trigrams whose letters ``v`` holds.
    Trigrams past ASCII count as held (SQLite folds the case of ASCII only)."""
    grams = sorted(trigrams(query))
    if not grams or threshold > 1:
        return "0", []
    needed = max(1, math.ceil(threshold * len(grams) / (2 - threshold) - 1e-9))
    chosen = [gram for gram in grams if gram.isascii()][:MAX_PREFILTER_TERMS]
    needed -= len(grams) - len(chosen)
    if needed <= 0:
        return "1", []
    cores = collections.Counter(gram.strip() for gram in chosen)   # letters and digits: no LIKE wildcards
    present = " + ".join(f"{count} * (v LIKE ?)" for count in cores.values())   # LIKE ignores ASCII case
    folds = [char for char, ascii in _LOWER_TO_ASCII.items() if any(ascii in core for core in cores)]
    unfolded = "".join("instr(v, ?) OR " for _ in folds)   # LIKE would not see them as their ASCII letter
    return f"({unfolded}{present} >= ?)", [*folds, *(f"%{core}%" for core in cores), needed]


def _exact_prefilter(query: str) -> tuple:
    """Equal ignoring case: implied by the trigram pre-filter when the query has trigrams."""
    if trigrams(query):
        return "0", []
    if not query.lower().isascii():
        return "1", []
    return "lower(replace(v, ?, ?)) = ?", ["\u212a", "k", query.lower()]


def _letters(code_letters: str) -> str:
    """A GLOB class of the characters that upper-case to any of ``code_letters``."""
    extra = "".join(char for char in _UPPER_TO_ASCII if set(char.upper()) & set(code_letters))
    return f"[{code_letters}{code_letters.lower()}{extra}]"


def _phonetic_prefilter(query: str) -> tuple:
    """A value sharing a code with the query holds, for every character of that code, a letter it
    comes from; a Soundex code's first letter begins a word (first in v, or after a non-letter)."""
    patterns = set()
    for word in phonetic_words(query):
        sound, primary, alternate = word_codes(word)
        if sound:
            first = _letters(sound[0])
            digits = sorted({_SOUNDEX_SOURCES[digit] for digit in sound[1:] if digit != "0"}, key=lambda s: (len(s), s))
            patterns.add((f"*{first}*", (f"{first}*", f"*[^A-Za-z]{first}*"), *(f"*{_letters(d)}*" for d in digits)))
        for code in (primary, alternate):
            if code:   # the fewest letters first: the likeliest to fail, so SQLite stops there
                patterns.add(tuple(f"*{_letters(sources)}*" for sources in
                                   sorted({_METAPHONE_SOURCES[char] for char in code}, key=lambda s: (len(s), s))))
    if not patterns:
        return "0", []
    if len(patterns) > MAX_PHONETIC_PATTERNS:
        return "1", []
    alternatives, params = [], []
    for globs in sorted(patterns, key=str):   # all must match; a tuple: any of its patterns
        terms = []
        for glob in globs:
            choices = glob if isinstance(glob, tuple) else (glob,)
            terms.append("(" + " OR ".join("v GLOB ?" for _ in choices) + ")")
            params += choices
        alternatives.append("(" + " AND ".join(terms) + ")")
    return "(" + " OR ".join(alternatives) + ")", params


def sql_string(value: Optional[bytes]) -> Optional[str]:
    """A string SQLite hands over as bytes: its JSON functions keep a lone surrogate ("\\ud800"),
    which the sqlite3 module cannot decode, so query functions take their text as a BLOB."""
    if value is None:
        return None
    try:
        return value.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace")


def _text_function(score: Callable) -> Callable:
    return lambda value, *args: score(sql_string(value), *args) if isinstance(value, bytes) else None


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[1] if "." in name else ""


def cursor_hash(path: str) -> str:
    """What a cursor names an item by: SHA-256 (upstream: BLAKE3) of 'file:' and its path, in hex."""
    return hashlib.sha256(f"file:{path}".encode("utf-8")).hexdigest()


def _lower(value: Any) -> Any:
    """Lower case for every script (SQLite's lower() folds ASCII only), as bytes SQLite reads as text."""
    return sql_string(value).lower().encode("utf-8", "surrogatepass") if isinstance(value, bytes) else None


# The functions a query's SQL calls; FileStore registers them on each connection.
QUERY_FUNCTIONS = {
    "aeordb_lower": (1, _lower),
    "aeordb_similar": (3, _text_function(similar_score)),
    "aeordb_phonetic": (2, _text_function(lambda value, query: 1.0 if phonetic_labels(value, query) else None)),
    "aeordb_fuzzy": (3, _text_function(fuzzy_score)),
    "aeordb_jaro_winkler": (3, _text_function(jaro_winkler_score)),
    "aeordb_match": (2, _text_function(lambda value, query: match_parts(value, query)[0] or None)),
    "aeordb_extension": (1, _extension),
    "aeordb_cursor_hash": (1, cursor_hash),
}


def encode_cursor(values: dict, path: str, etag: str) -> str:
    """Padded base64 of compact JSON with sorted keys, as upstream: the item's @ sort values, its hash and,
    as `_version`, its content hash (upstream: the database's head; neither reads it back)."""
    body = {**values, "_hash": cursor_hash(path), "_version": etag}
    return base64.b64encode(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False).encode("utf-8")).decode("ascii")


def decode_cursor(cursor: Any, key: str) -> str:
    """The item hash a cursor names (lower-case hex); 400 with upstream's messages when it is not one."""
    if not isinstance(cursor, str):
        raise ApiError(400, f"Invalid cursor: '{key}' must be a string")
    try:
        raw = base64.b64decode(cursor, validate=True)
    except ValueError as exc:
        raise ApiError(400, f"Invalid cursor: {exc}") from None
    try:
        body = load_json(raw)
    except ValueError as exc:
        raise ApiError(400, f"Invalid cursor JSON: {exc}") from None
    digest = body.get("_hash") if isinstance(body, dict) else None
    if not isinstance(digest, str):
        raise ApiError(400, "Cursor missing _hash")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ApiError(400, f"Invalid cursor hash: {digest[:80]!r} is not 64 hex digits")
    return digest.lower()


class QueryPlan:
    """A query or aggregate JSON (ABI section 5, AEORDB_TODAY.md section 2) compiled to SQL over the `files` table."""

    def __init__(self, spec: Any, default_limit: int):
        if not isinstance(spec, dict):
            raise ApiError(400, "a query must be a JSON object")
        self.directory = normalize_file_path(spec.get("path", "/"), allow_root=True)
        self.fields: list = []
        self.where_params: list = []
        self.text_leaves: list = []         # (TextLeaf, _Operand) in the order of the where clause
        self.conditions = 0
        self.where_sql = self._node(spec.get("where"), depth=0)
        self.limit_given = spec.get("limit") is not None
        self.limit = _optional_int(spec, "limit", default_limit)
        self.offset = _optional_int(spec, "offset", 0)
        if self.limit < 0 or self.offset < 0:
            raise ApiError(400, "limit and offset must not be negative")
        self.limit = min(self.limit, MAX_QUERY_LIMIT)
        self.offset = min(self.offset, 2 ** 62)   # past any table; SQLite integers are 64-bit
        self.include_total = bool(spec.get("include_total", False))
        self.after = decode_cursor(spec["after"], "after") if spec.get("after") is not None else None
        self.before = decode_cursor(spec["before"], "before") if spec.get("before") is not None else None
        self.cursor_fields: list = []
        self.order_sql, self.order_params = self._order(spec.get("order_by"))
        self.aggregate = self._aggregate(spec.get("aggregate")) if "aggregate" in spec else None

    # -- where -----------------------------------------------------------------

    def _node(self, node: Any, depth: int) -> str:
        if depth > 32:
            raise ApiError(400, "Query nesting too deep (max 32 levels). Simplify the where clause")
        if node is None or node == {} or node == []:
            return "1"
        if isinstance(node, list):   # legacy form: an implicit AND
            return _balanced([self._node(child, depth + 1) for child in node], "AND")
        if not isinstance(node, dict):
            raise ApiError(400, f"a query condition must be an object, found {type(node).__name__}")
        combinators = [key for key in node if key.lower() in _COMBINATORS]
        if combinators:
            if len(node) != 1:
                raise ApiError(400, f"combinator {combinators[0]!r} must be the only key of its object")
            key = combinators[0]
            word, child = _COMBINATORS[key.lower()], node[key]
            if word == "NOT":
                return f"(NOT {self._node(child, depth + 1)})"
            if not isinstance(child, list) or not child:
                raise ApiError(400, f"{key!r} takes a non-empty list of conditions")
            return _balanced([self._node(c, depth + 1) for c in child], word)
        if "field" not in node:
            raise ApiError(400, f"Invalid where clause structure: {compact_json(node)[:200]}")
        return self._condition(node)

    def _condition(self, node: dict) -> str:
        op, field = node.get("op"), node.get("field")
        operand = _Operand.of(field)
        if "op" not in node:
            raise ApiError(400, f"Missing 'op' in where clause for field '{field}'")
        if op not in OPERATORS:
            named = op if isinstance(op, str) else compact_json(op)
            raise ApiError(400, f"Unknown operation: '{named[:80]}' (the operations are {', '.join(OPERATORS)})")
        if "value" not in node:
            raise ApiError(400, f"Missing 'value' in where clause for field '{field}'")
        value = node["value"]
        self.conditions += len(value) if op == "in" and isinstance(value, list) else 1
        if self.conditions > MAX_QUERY_CONDITIONS:
            raise ApiError(400, f"query has more than {MAX_QUERY_CONDITIONS} conditions "
                                "(counting each value of 'in')")
        if op in TEXT_OPERATORS:
            return self._text(self._text_leaf(node, op, field, operand), operand, field)
        if field not in self.fields:
            self.fields.append(field)
        if op == "eq":
            return self._equals(operand, value)
        if op == "in":
            if not isinstance(value, list):
                raise ApiError(400, f"'in' operation requires array value for field '{field}'")
            if not value:
                return "0"
            return _balanced([self._equals(operand, v) for v in value], "OR")
        if op in ("gt", "lt"):
            return self._compare(operand, ">" if op == "gt" else "<", value, field)
        if op == "between":
            if "value2" not in node:
                raise ApiError(400, f"Missing value2 for 'between' operation on field '{field}'")
            return (f"({self._compare(operand, '>=', value, field)} AND "
                    f"{self._compare(operand, '<=', node['value2'], field)})")
        if not isinstance(value, str):   # contains
            raise ApiError(400, f"'contains' requires string value for field '{field}'")
        self.where_params += [*operand.params, *operand.params, _sql_text(value.lower())]
        return f"({operand.kind} = 'text' AND instr(aeordb_lower(CAST({operand.value} AS BLOB)), ?) > 0)"

    @staticmethod
    def _text_leaf(node: dict, op: str, field: str, operand: _Operand) -> TextLeaf:
        value = node["value"]
        if op == "similar" and isinstance(value, dict):   # the SDK's shape: {"text", "threshold"}
            node, value = value, value.get("text")
        if not isinstance(value, str):
            raise ApiError(400, f"'{op}' requires string value for field '{field}'")
        if VIRTUAL_FIELDS.get(field, ("text",))[0] != "text":
            raise ApiError(400, f"'{op}' compares text, and {field} is a number")
        _sql_text(value)
        if op == "similar":
            threshold = node.get("threshold", DEFAULT_SIMILARITY)
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise ApiError(400, f"'threshold' of 'similar' on field '{field}' must be a number")
            # Similarities are 0-1: any threshold outside acts as -1 or 2 would (NaN: nothing matches).
            return TextLeaf(op, value, float(min(max(threshold, -1), 2)) if threshold == threshold else 2.0)
        if op != "fuzzy":
            return TextLeaf(op, value)
        fuzziness = node.get("fuzziness", "auto")
        # No edit count allows more than 2 ** 31 (no text is that long).
        fixed = min(max(fuzziness, 0), 2 ** 31) if isinstance(fuzziness, int) and not isinstance(fuzziness, bool) else None
        if node.get("algorithm") == "jaro_winkler":
            threshold = DEFAULT_JARO_WINKLER if fixed is None else 1 - fixed / max(len(value.encode("utf-8")), 1)
            return TextLeaf(op, value, ("jaro_winkler", threshold))
        return TextLeaf(op, value, auto_fuzziness(value) if fixed is None else fixed)

    def _text(self, leaf: TextLeaf, operand: _Operand, field: str) -> str:
        if len(self.text_leaves) == MAX_TEXT_CONDITIONS:
            raise ApiError(400, f"query has more than {MAX_TEXT_CONDITIONS} text conditions "
                                "(similar, phonetic, fuzzy, match)")
        self.text_leaves.append((leaf, operand))
        prefilter, prefilter_params = leaf.prefilter()
        call, call_params = leaf.call()
        # In a WHERE clause SQLite stops at the first false term, so the Python function
        # only sees what the type check and the pre-filter let through.
        self.where_params += [*call_params, *operand.params, *operand.params, *prefilter_params]
        return (f"coalesce((SELECT {call} IS NOT NULL FROM {_once(operand.value + ' AS v')}"
                f" WHERE {operand.kind} = 'text' AND {prefilter}), 0)")

    def _equals(self, operand: _Operand, value: Any) -> str:
        if value is None:
            self.where_params += operand.params
            return f"({operand.kind} = 'null')"
        if isinstance(value, bool):
            self.where_params += operand.params
            return f"({operand.kind} = '{'true' if value else 'false'}')"
        if isinstance(value, (int, float)):
            self.where_params += [*operand.params, *operand.params, _sql_number(value)]
            return f"({operand.kind} IN ('integer','real') AND {operand.value} = ?)"
        if isinstance(value, str):
            self.where_params += [*operand.params, *operand.params, _sql_text(value)]
            return f"({operand.kind} = 'text' AND {operand.value} = ?)"
        self.where_params += [*operand.params, *operand.params, compact_json(value)]
        return f"({operand.kind} IN ('object','array') AND {operand.value} = json(?))"

    def _compare(self, operand: _Operand, operator: str, value: Any, field: str) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ApiError(400, f"Invalid value for field '{field}': gt, lt and between compare numbers or strings")
        kinds = "('integer','real')" if not isinstance(value, str) else "('text')"
        self.where_params += [*operand.params, *operand.params,
                              _sql_text(value) if isinstance(value, str) else _sql_number(value)]
        return f"({operand.kind} IN {kinds} AND {operand.value} {operator} ?)"

    # -- order and paging ------------------------------------------------------

    def _order(self, order_by: Any) -> tuple:
        if order_by is None:
            return ("score DESC, files.path" if self.text_leaves else "files.path"), []
        if isinstance(order_by, (str, dict)):
            order_by = [order_by]
        if not isinstance(order_by, list):
            raise ApiError(400, "order_by must be a list of {field, direction}")
        if len(order_by) > MAX_ORDER_FIELDS:
            raise ApiError(400, f"order_by has {len(order_by)} fields; at most {MAX_ORDER_FIELDS}")
        parts, params = [], []
        for item in order_by:
            field, direction = (item, "asc") if isinstance(item, str) else \
                (item.get("field"), item.get("direction", "asc")) if isinstance(item, dict) else (None, None)
            if not isinstance(direction, str) or direction.lower() not in ("asc", "desc"):
                raise ApiError(400, "order_by direction must be 'asc' or 'desc'")
            if isinstance(field, str) and (field == "@score" or field in VIRTUAL_FIELDS):
                self.cursor_fields.append(field)
                parts.append(f"{'score' if field == '@score' else VIRTUAL_FIELDS[field][1]} {direction.upper()}")
            else:
                parts.append(f"json_extract(files.doc, ?) {direction.upper()}")
                params.append(json_path(field))
        return ", ".join(parts + ["files.path"]), params

    def _matches(self, db: str) -> tuple:
        """SQL of the matching documents with their score, as a table named `files`; its parameters."""
        scores, params = [], []
        for leaf, operand in self.text_leaves:
            call, call_params = leaf.call()
            scores.append(f"(SELECT {call} FROM {_once(operand.value + ' AS v')} WHERE {operand.kind} = 'text')")
            params += [*call_params, *operand.params, *operand.params]
        # An item's score is the best of the text conditions it met; 1.0 when it met none.
        score = ("1.0" if not scores else f"coalesce({scores[0]}, 1.0)" if len(scores) == 1 else
                 f"coalesce(nullif({_greatest([f'coalesce({s}, -1.0)' for s in scores])}, -1.0), 1.0)")
        values = [f", (SELECT CAST(v AS BLOB) FROM {_once(operand.value + ' AS v')} WHERE {operand.kind} = 'text') AS v{i}"
                  for i, (_, operand) in enumerate(self.text_leaves)]
        value_params = [p for _, operand in self.text_leaves for p in (*operand.params, *operand.params)]
        sql = (f"(SELECT files.*, {score} AS score{''.join(values)} FROM files"
               f" WHERE db=? AND parent=? AND doc IS NOT NULL AND ({self.where_sql})) AS files")
        return sql, [*params, *value_params, db, self.directory, *self.where_params]

    def page_sql(self, db: str) -> tuple:
        """SQL of one page of items (one row more than the limit, to tell has_more); its parameters.

        Cursors name items by hash: the page starts after (and ends before)
        the position of the item named, in the order asked for, so writes
        elsewhere in the list do not shift it.
        """
        matches, params = self._matches(db)
        values = "".join(f", files.v{i}" for i in range(len(self.text_leaves)))
        columns = "files.path, files.size, files.content_type, files.created_at, files.updated_at, files.etag, score"
        if self.after is None and self.before is None:
            return (f"SELECT {columns}{values} FROM {matches} ORDER BY {self.order_sql} LIMIT ? OFFSET ?",
                    [*params, *self.order_params, self.limit + 1, self.offset])
        ranked = (f"WITH ranked AS (SELECT {columns}{values}, row_number() OVER (ORDER BY {self.order_sql})"
                  f" AS position FROM {matches})")
        return (f"{ranked} SELECT {columns.replace('files.', '')}{values.replace('files.', '')} FROM ranked"
                f" WHERE position > coalesce((SELECT position FROM ranked WHERE aeordb_cursor_hash(path) = ?), 0)"
                f" AND position < coalesce((SELECT position FROM ranked WHERE aeordb_cursor_hash(path) = ?), 9e18)"
                f" ORDER BY position LIMIT ? OFFSET ?",
                [*self.order_params, *params, self.after, self.before, self.limit + 1, self.offset])

    def count_sql(self, db: str) -> tuple:
        return (f"SELECT count(*) FROM files WHERE db=? AND parent=? AND doc IS NOT NULL AND ({self.where_sql})",
                [db, self.directory, *self.where_params])

    def answer(self, rows: list, total: Optional[int]) -> dict:
        """The answer to the query from its page's rows: both SDK generations' keys, and cursors."""
        items = [self._item(row) for row in rows[:self.limit]]
        has_more = len(rows) > self.limit
        answer: dict = {"items": items, "results": items, "has_more": has_more}
        if total is not None:
            answer["total"] = total
        if items and has_more:
            answer["next_cursor"] = self._cursor(items[-1], rows[len(items) - 1])
        if items and (self.offset > 0 or self.after is not None):
            answer["prev_cursor"] = self._cursor(items[0], rows[0])
        if has_more and not self.limit_given:
            answer["default_limit_hit"], answer["default_limit"] = True, self.limit
        return answer

    def _item(self, row: tuple) -> dict:
        path, size, content_type, created_at, updated_at, _, score, *values = row
        matched_by = list(self.fields)
        for (leaf, _), value in zip(self.text_leaves, map(sql_string, values)):
            if value is not None and leaf.score(value) is not None:
                matched_by += [label for label in leaf.labels(value) if label not in matched_by]
        return {"path": path, "size": size, "score": score, "total_size": size, "content_type": content_type,
                "created_at": created_at, "updated_at": updated_at, "matched_by": matched_by}

    def _cursor(self, item: dict, row: tuple) -> str:
        metadata = {"@path": item["path"], "@filename": item["path"].rsplit("/", 1)[-1],
                    "@extension": _extension(item["path"]), "@content_type": item["content_type"],
                    "@hash": row[5], "@size": item["size"], "@created_at": item["created_at"],
                    "@updated_at": item["updated_at"], "@score": item["score"]}
        metadata["@file_name"] = metadata["@filename"]
        return encode_cursor({field: metadata[field] for field in self.cursor_fields}, item["path"], row[5])

    @staticmethod
    def _aggregate(agg: Any) -> dict:
        if not isinstance(agg, dict):
            raise ApiError(400, "'aggregate' must be an object")
        known = {"count", "sum", "avg", "min", "max", "group_by"}
        unknown = set(agg) - known
        if unknown:
            raise ApiError(400, f"unsupported aggregate(s): {', '.join(sorted(unknown))}")
        out = {"count": bool(agg.get("count", False))}
        for kind in ("sum", "avg", "min", "max", "group_by"):
            fields = agg.get(kind) or []
            if isinstance(fields, str):
                fields = [fields]
            if not isinstance(fields, list):
                raise ApiError(400, f"aggregate {kind!r} takes a list of fields")
            for field in fields:
                json_path(field)
            out[kind] = fields
        if len(out["group_by"]) > MAX_GROUP_FIELDS:
            raise ApiError(400, f"group_by has {len(out['group_by'])} fields; at most {MAX_GROUP_FIELDS}")
        computed = sum(len(out[kind]) for kind in ("sum", "avg", "min", "max"))
        if computed > MAX_AGGREGATE_FIELDS:
            raise ApiError(400, f"the aggregate computes {computed} sum/avg/min/max fields; "
                                f"at most {MAX_AGGREGATE_FIELDS}")
        return out


###############################################################################
# File store ###################################################################
###############################################################################
#
# One SQLite database (WAL) holds every database's files; each thread has its
# own connection. A file whose bytes are a UTF-8 JSON object is kept as text
# in `doc` so that queries run inside SQLite with json_extract; everything else
# is kept as a BLOB in `data`.
#
# An invocation's writes form one transaction: `FileStore.batch()` marks the
# thread, the first write begins it (BEGIN IMMEDIATE, so the write lock is
# held only from then), and the batch commits when the plugin answered or
# rolls back when it failed. Reads in the same thread see those writes; other
# connections do not until the commit.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    db TEXT NOT NULL,
    path TEXT NOT NULL,
    parent TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc TEXT,
    data BLOB,
    UNIQUE (db, path)
);
CREATE INDEX IF NOT EXISTS files_by_parent ON files (db, parent, path);
-- Each database's stored bytes, kept by triggers: quotas and metrics read one row.
-- A file counts its bytes, its path and 256 for its row, so empty files count too.
CREATE TABLE IF NOT EXISTS db_sizes (db TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS files_added AFTER INSERT ON files BEGIN
    INSERT INTO db_sizes (db, bytes) VALUES (new.db, new.size + length(CAST(new.path AS BLOB)) + 256)
        ON CONFLICT (db) DO UPDATE SET bytes = bytes + new.size + length(CAST(new.path AS BLOB)) + 256;
END;
CREATE TRIGGER IF NOT EXISTS files_resized AFTER UPDATE OF size ON files BEGIN
    UPDATE db_sizes SET bytes = bytes - old.size + new.size WHERE db = new.db;
END;
CREATE TRIGGER IF NOT EXISTS files_removed AFTER DELETE ON files BEGIN
    UPDATE db_sizes SET bytes = bytes - old.size - length(CAST(old.path AS BLOB)) - 256 WHERE db = old.db;
END;
"""
FILE_OVERHEAD = 256   # bytes a stored file counts besides its data and path (its row)
# Run once on a database an older version made: db_sizes starts from what is there.
_SIZES_FROM_FILES = ("INSERT OR REPLACE INTO db_sizes SELECT db, sum(size + length(CAST(path AS BLOB)) + 256) FROM files "
                     "GROUP BY db")
SCHEMA_VERSION = 1

DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclasses.dataclass
class _Batch:
    began: bool = False                 # BEGIN IMMEDIATE was issued
    broken: Optional[str] = None        # why the transaction can no longer commit


def now_ms() -> int:
    return int(time.time() * 1000)


WAL_SIZE_LIMIT = 64 * MiB   # what the WAL file is cut back to after a checkpoint
PROGRESS_STEPS = 10_000     # SQLite virtual-machine steps between deadline checks


class FileStore:
    """Every database's files in one SQLite database; one connection per thread.

    A database SQLite cannot open leaves the store ``unavailable``: its routes
    and host functions answer 503 naming the problem, and plugins go on.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db_file = settings.data_dir / DATABASE_NAME
        self.busy_timeout = settings.timeout + 5.0
        self.unavailable: Optional[str] = None
        self._local = threading.local()
        self._write_lock, self._waiters_guard = threading.Lock(), threading.Lock()
        self._lock_waiters = 0
        # A quarter of the workers may wait for the write lock; the rest serve reads.
        self.max_lock_waiters = max(1, settings.threads // 4)
        # SQLite gives the WAL and shared-memory files the mode of the database file.
        os.close(os.open(self.db_file, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
        try:
            conn = self._conn()
            conn.executescript(_SCHEMA)
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                with self._writing() as conn:
                    conn.execute(_SIZES_FROM_FILES)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self.unavailable = f"{self.db_file} is damaged ({exc}): repair or restore it"
            self._local.conn = None
            log.error("the file store is unavailable: %s; plugins are served, file routes answer 503",
                      self.unavailable)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.unavailable:
                raise ApiError(503, f"the file store is unavailable: {self.unavailable}")
            conn = sqlite3.connect(self.db_file, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            for name, (arity, function) in QUERY_FUNCTIONS.items():
                conn.create_function(name, arity, self._within_deadline(conn, function), deterministic=True)
            # Statements check this thread's deadline as they run (SQLite's
            # progress handler), so no query outlives its time limit.
            conn.set_progress_handler(query_clock.past, PROGRESS_STEPS)
            self._local.conn = conn
        return conn

    def set_deadline(self, at: Optional[float]) -> None:
        """From now on this thread's statements stop at monotonic time ``at`` (None: no deadline).

        A statement stopped there raises TimeLimitReached, and a transaction
        it was part of rolls back.
        """
        query_clock.deadline = at

    def _within_deadline(self, conn: sqlite3.Connection, function: Callable) -> Callable:
        """``function`` for SQL that first checks the deadline: the progress handler only runs
        between SQLite's own steps, and a query may spend its time in these functions."""
        def call(*args: Any) -> Any:
            result = None if query_clock.past() else function(*args)
            if query_clock.past():   # before or during the call (a long comparison gives up)
                conn.interrupt()
                return None
            return result
        return call

    def _failed(self, exc: sqlite3.Error, action: str) -> Exception:
        """What a statement's failure becomes: its deadline, a storage fault (503), or itself."""
        if isinstance(exc, sqlite3.OperationalError) and "interrupted" in str(exc) and query_clock.past():
            return TimeLimitReached()
        if is_storage_fault(exc):
            return storage_error(action, exc)
        return exc

    # -- transactions ----------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group every write of the block into one transaction, begun at the first write.

        Commits when the block ends normally, rolls back when it raises. If
        SQLite abandoned the transaction midway (disk full, I/O error), the
        block fails too: committing the writes after that would break
        all-or-nothing.
        """
        state = self._local.batch = _Batch()
        try:
            yield
            if state.broken:
                raise storage_error("writing", state.broken)
        except BaseException:
            if state.began and self._conn().in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn().execute("ROLLBACK")
            raise
        else:
            conn = self._conn() if state.began else None
            if conn is not None and conn.in_transaction:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise storage_error("committing", exc) from None
        finally:
            self._local.batch = None
            if state.began:
                self._write_lock.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        batch = getattr(self._local, "batch", None)
        try:
            if batch is not None:
                if batch.broken:
                    raise storage_error("writing", batch.broken)
                if batch.began and not conn.in_transaction:
                    batch.broken = "the invocation's transaction was rolled back by the database"
                    raise storage_error("writing", batch.broken)
                if not batch.began:
                    self._begin(conn)
                    batch.began = True   # batch() releases the write lock
                try:
                    yield conn
                except sqlite3.Error as exc:
                    if not conn.in_transaction:
                        batch.broken = str(exc)
                    raise
                return
            self._begin(conn)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: SQLite may keep the transaction
                # open, and this thread's connection would hold the write lock.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            finally:
                self._write_lock.release()
        except sqlite3.Error as exc:
            raise self._failed(exc, "writing") from None

    def _begin(self, conn: sqlite3.Connection) -> None:
        """Take the write lock, then begin the write transaction (BEGIN IMMEDIATE).

        Writers of this process queue on a lock of our own, not in SQLite's
        busy loop, and at most ``max_lock_waiters`` of them wait at once: the
        others are refused at once with 503, so waiting writers never take
        every worker thread from the requests that only read.
        """
        if not self._write_lock.acquire(blocking=False):
            with self._waiters_guard:
                if self._lock_waiters >= self.max_lock_waiters:
                    raise ApiError(503, f"the database's write lock is held by another request and "
                                        f"{self._lock_waiters} more writers are waiting: retry", RETRY_SOON)
                self._lock_waiters += 1
            try:
                deadline = query_clock.deadline
                wait = self.busy_timeout if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._write_lock.acquire(timeout=wait):
                    if deadline is not None:
                        raise TimeLimitReached()
                    raise ApiError(503, f"the database's write lock was held by another request for "
                                        f"{wait:g} s: retry", RETRY_SOON)
            finally:
                with self._waiters_guard:
                    self._lock_waiters -= 1
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._write_lock.release()
            raise

    def _read(self, sql: str, params: tuple) -> list:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc, "reading") from None

    def checkpoint(self) -> None:
        """Fold the WAL into the database file and empty it: a copy of the file alone is then complete."""
        if not self.unavailable:
            with contextlib.suppress(sqlite3.Error, ApiError):
                self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- files -----------------------------------------------------------------

    def write(self, db: str, path: str, data: bytes, content_type: Optional[str]) -> tuple:
        """Store a file; answers (metadata, created)."""
        path = normalize_file_path(path)
        if len(data) > self.settings.max_file_size:
            raise ApiError(413, f"file of {len(data)} bytes exceeds the limit of "
                                f"{self.settings.max_file_size} bytes")
        content_type = (content_type or "").strip() or mimetypes.guess_type(path)[0] or DEFAULT_CONTENT_TYPE
        # Checked here, not when served: a stored bad value would fail every later GET.
        if not is_header_value(content_type) or len(content_type) > 256:
            raise ApiError(400, "invalid content type: at most 256 characters of text, no control characters")
        doc = _json_object_text(data, self._conn())
        etag = hashlib.sha256(data).hexdigest()[:32]
        stamp = now_ms()
        ancestors, parent = [], parent_of(path)
        while parent != "/":
            ancestors.append(parent)
            parent = parent_of(parent)
        with self._writing() as conn:
            existing = conn.execute("SELECT size, created_at FROM files WHERE db=? AND path=?", (db, path)).fetchone()
            self._check_quota(conn, db, path, len(data), existing[0] if existing else None)
            if ancestors:
                marks = ",".join("?" * len(ancestors))
                clash = conn.execute(f"SELECT path FROM files WHERE db=? AND path IN ({marks}) LIMIT 1",
                                     (db, *ancestors)).fetchone()
                if clash:
                    raise ApiError(409, f"{clash[0]} is a file, so {path} cannot be inside it")
            low, high = descendant_range(path)
            if conn.execute("SELECT 1 FROM files WHERE db=? AND path>=? AND path<? LIMIT 1",
                            (db, low, high)).fetchone():
                raise ApiError(409, f"{path} is a directory")
            # The answer is made inside the transaction: once it commits nothing
            # is left to fail, so an error answer always means nothing was written.
            meta = _file_meta((path, len(data), content_type, existing[1] if existing else stamp, stamp, etag))
            conn.execute(
                "INSERT INTO files (db, path, parent, content_type, size, etag, created_at, updated_at, doc, data)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (db, path) DO UPDATE SET content_type=excluded.content_type,"
                " size=excluded.size, etag=excluded.etag, updated_at=excluded.updated_at,"
                " doc=excluded.doc, data=excluded.data",
                (db, path, parent_of(path), content_type, len(data), etag, stamp, stamp,
                 doc, None if doc is not None else data))
        return meta, existing is None

    def _check_quota(self, conn: sqlite3.Connection, db: str, path: str, size: int,
                     replaced_size: Optional[int]) -> None:
        quota = self.settings.max_db_size
        if not quota:
            return
        stored = conn.execute("SELECT bytes FROM db_sizes WHERE db=?", (db,)).fetchone()
        added = size - replaced_size if replaced_size is not None else size + len(path.encode()) + FILE_OVERHEAD
        total = (stored[0] if stored else 0) + added
        if total > quota:
            raise ApiError(507, f"database {db} would hold {total} bytes, over its quota of {quota} bytes "
                                "(--max-db-size): delete files or raise the quota")

    def stored_bytes(self) -> dict:
        """Each database's stored bytes: its files' sizes, paths and FILE_OVERHEAD each."""
        return dict(self._read("SELECT db, bytes FROM db_sizes ORDER BY db", ()))

    def read(self, db: str, path: str) -> tuple:
        """(bytes, metadata) of a file; 404 when absent."""
        row = self._file_row(db, path, ", doc, data")
        data = row[7] if row[6] is None else row[6].encode("utf-8")
        return bytes(data), _file_meta(row)

    def metadata(self, db: str, path: str) -> dict:
        return _file_meta(self._file_row(db, path))

    def _file_row(self, db: str, path: str, more_columns: str = "") -> tuple:
        path = normalize_file_path(path)
        rows = self._read("SELECT path, size, content_type, created_at, updated_at, etag" + more_columns
                          + " FROM files WHERE db=? AND path=?", (db, path))
        if not rows:
            raise ApiError(404, f"no file at {path}")
        return rows[0]

    def delete(self, db: str, path: str) -> None:
        path = normalize_file_path(path)
        with self._writing() as conn:
            if conn.execute("DELETE FROM files WHERE db=? AND path=?", (db, path)).rowcount == 0:
                raise ApiError(404, f"no file at {path}")

    def is_directory(self, db: str, path: str) -> bool:
        if path == "/":
            return True
        low, high = descendant_range(path)
        return bool(self._read("SELECT 1 FROM files WHERE db=? AND path>=? AND path<? LIMIT 1",
                               (db, low, high)))

    def list_directory(self, db: str, path: str) -> list:
        """Entries directly inside a directory: files, and subdirectories with their total size."""
        directory = normalize_file_path(path, allow_root=True)
        low, high = descendant_range(directory)
        rows = self._read(
            "SELECT CASE WHEN instr(substr(path, ?), '/') = 0 THEN substr(path, ?)"
            "            ELSE substr(path, ?, instr(substr(path, ?), '/') - 1) END AS name,"
            "       max(instr(substr(path, ?), '/') > 0) AS is_dir, sum(size)"
            " FROM files WHERE db=? AND path>=? AND path<? GROUP BY name ORDER BY name",
            (len(low) + 1,) * 5 + (db, low, high))
        if not rows and directory != "/":
            if self._read("SELECT 1 FROM files WHERE db=? AND path=?", (db, directory)):
                raise ApiError(400, f"{directory} is a file, not a directory")
            raise ApiError(404, f"no directory at {directory}")
        return [{"name": name, "type": "directory" if is_dir else "file", "size": size}
                for name, is_dir, size in rows]

    def extract(self, db: str, args: dict) -> dict:
        """aeordb_extract_file as today's AeorDB answers it: checks in its order, its messages.

        lines: 1-based, inclusive, each line with its terminator (LF, CRLF or a
        lone CR); chars: 0-based, end-exclusive, in characters; bytes: the
        same in bytes, decoded with U+FFFD for what is not UTF-8; json_pointer:
        the value at an RFC 6901 pointer. Text is cut before the first
        character that would pass max_bytes (bytes mode cuts raw bytes).
        """
        path = args.get("path")
        if not isinstance(path, str):
            raise ApiError(400, "Missing 'path' argument")
        path = normalize_file_path(path)
        mode = args.get("mode")
        if not isinstance(mode, str):
            raise ApiError(400, "Missing 'mode' argument")
        if mode not in EXTRACT_MODES:
            raise ApiError(400, "Unsupported extract mode; expected 'lines', 'chars', 'bytes', or 'json_pointer'")
        try:
            data, meta = self.read(db, path)
        except ApiError as exc:
            if exc.status == 404:
                raise ApiError(404, f"Not found: {path}") from None
            raise
        max_bytes = _lenient_count(args, "max_bytes")
        max_bytes = DEFAULT_EXTRACT_BYTES if max_bytes is None else max_bytes
        if not 1 <= max_bytes <= MAX_EXTRACT_BYTES:
            raise ApiError(400, f"Invalid input: Invalid max_bytes: must be between 1 and {MAX_EXTRACT_BYTES}")
        start, end, pointer = _lenient_count(args, "start"), _lenient_count(args, "end"), None
        if mode == "json_pointer":
            pointer = args.get("pointer")
            if not isinstance(pointer, str):
                raise ApiError(400, "Invalid input: json_pointer range requires 'pointer'")
            text, start, end = _json_pointer_text(data, pointer), None, None
        else:
            start = (1 if mode == "lines" else 0) if start is None else start
            if mode == "lines" and start == 0:
                raise ApiError(400, "Invalid input: Line ranges are 1-based; start must be at least 1")
            if end is not None and end < start:
                raise ApiError(400, "Invalid input: Range end must be greater than or equal to start")
            if mode == "bytes":
                taken = data[start:end]
                return _extracted(taken[:max_bytes].decode("utf-8", "replace"), len(taken) > max_bytes,
                                  meta, mode, start, end, None)
            text = _line_range(data, start, end) if mode == "lines" else _char_range(data, start, end)
        encoded = text.encode("utf-8")
        if len(encoded) <= max_bytes:
            return _extracted(text, False, meta, mode, start, end, pointer)
        # The text is whole UTF-8: 'ignore' drops only a character the cut split.
        return _extracted(encoded[:max_bytes].decode("utf-8", "ignore"), True, meta, mode, start, end, pointer)

    # -- queries ---------------------------------------------------------------

    def query(self, db: str, spec: Any) -> dict:
        plan = QueryPlan(spec, self.settings.query_limit)
        rows = self._read(*plan.page_sql(db))
        total = self._read(*plan.count_sql(db))[0][0] if plan.include_total else None
        return plan.answer(rows, total)

    def aggregate(self, db: str, spec: Any) -> dict:
        plan = QueryPlan(spec, self.settings.query_limit)
        agg = plan.aggregate
        if agg is None:
            raise ApiError(400, "an aggregate needs an 'aggregate' object")
        columns, params = ["count(*)"], []
        for kind in ("sum", "avg", "min", "max"):
            for field in agg[kind]:
                columns.append(f"{kind}(CASE WHEN json_type(doc, ?) IN ('integer','real')"
                               f" THEN json_extract(doc, ?) END)")
                params += [json_path(field)] * 2
        group_cols, group_params = [], []
        for field in agg["group_by"]:
            group_cols += ["json_type(doc, ?)", "json_extract(doc, ?)"]
            group_params += [json_path(field)] * 2
        select = ", ".join(group_cols + columns)
        base = (f" FROM files WHERE db=? AND parent=? AND doc IS NOT NULL AND ({plan.where_sql})")
        base_params = (db, plan.directory, *plan.where_params)
        total = self._read("SELECT count(*)" + base, base_params)[0][0]
        if group_cols:
            marks = ", ".join(str(i + 1) for i in range(len(group_cols)))
            rows = self._read(f"SELECT {select}{base} GROUP BY {marks} ORDER BY {marks} LIMIT ? OFFSET ?",
                              (*group_params, *params, *base_params, plan.limit + 1, plan.offset))
        else:
            rows = self._read(f"SELECT {select}{base}", (*params, *base_params))

        def stats(values: list) -> dict:
            out, position = {"count": values[0]}, 1
            for kind in ("sum", "avg", "min", "max"):
                out[kind] = {}
                for field in agg[kind]:
                    out[kind][field] = values[position]
                    position += 1
            return out

        answer: dict = {"groups": [], "total_count": total, "has_more": False}
        if group_cols:
            answer["has_more"] = len(rows) > plan.limit
            width = len(group_cols)
            for row in rows[:plan.limit]:
                key = {field: _sql_json_value(row[2 * i], row[2 * i + 1])
                       for i, field in enumerate(agg["group_by"])}
                answer["groups"].append({"key": key, **stats(list(row[width:]))})
            overall = self._read(f"SELECT {', '.join(columns)}{base}", (*params, *base_params))[0]
        else:
            overall = rows[0]
        summary = stats(list(overall))
        if agg["count"]:
            answer["count"] = summary["count"]
        for kind in ("sum", "avg", "min", "max"):
            answer[kind] = summary[kind]
        return answer


EXTRACT_MODES = ("lines", "chars", "bytes", "json_pointer")
DEFAULT_EXTRACT_BYTES, MAX_EXTRACT_BYTES = 4 * MiB, 16 * MiB
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")   # not str.splitlines: it also splits on \v, \f, \x1c, U+2028...
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")


def _extracted(text: str, truncated: bool, meta: dict, mode: str, start: Optional[int], end: Optional[int],
               pointer: Optional[str]) -> dict:
    """The answer of aeordb_extract_file: always these 8 keys."""
    return {"text": text, "content_type": meta["content_type"] or DEFAULT_CONTENT_TYPE,
            "source_size": meta["size"], "mode": mode, "start": start, "end": end, "pointer": pointer,
            "truncated": truncated}


def _invalid_utf8(exc: UnicodeDecodeError) -> ApiError:
    if exc.end >= len(exc.object) and exc.reason == "unexpected end of data":
        detail = f"incomplete utf-8 byte sequence from index {exc.start}"
    else:
        detail = f"invalid utf-8 sequence of {exc.end - exc.start} bytes from index {exc.start}"
    return ApiError(400, f"Invalid input: Invalid UTF-8: {detail}")


def _line_range(data: bytes, start: int, end: Optional[int]) -> str:
    """Lines start..end (1-based, inclusive; end None: to the last) with their terminators.
    The bytes up to the range's end must be UTF-8; those after it are not read."""
    begin, stop, line = (0 if start == 1 else None), len(data), 1
    for found in _LINE_BREAK.finditer(data):
        if begin is not None and end is None:
            break   # the rest of the file is the range
        line += 1   # the number of the line starting after this break
        if end is not None and line > end:
            stop = found.end()
            break
        if line == start:
            begin = found.end()
    try:
        data[:stop].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid_utf8(exc) from None
    return "" if begin is None else data[begin:stop].decode("utf-8")


def _char_range(data: bytes, start: int, end: Optional[int]) -> str:
    """Characters start..end (0-based, end-exclusive; end None: to the last). The bytes up to
    the range's end must be UTF-8; those after it are not read."""
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        content = data[:exc.start].decode("utf-8")
        if end is None or end > len(content):
            raise _invalid_utf8(exc) from None
    return content[start:end]


def _json_pointer_text(data: bytes, pointer: str) -> str:
    """The value at an RFC 6901 pointer ('' is the whole document): a string as it is, anything
    else as compact JSON with its object keys sorted (as serde_json writes it)."""
    try:
        value = load_json(data)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"JSON parse error: Stored file is not valid JSON: {exc}") from None
    if pointer and not pointer.startswith("/"):
        raise ApiError(400, f"Invalid input: JSON pointer not found: {pointer}")
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and _ARRAY_INDEX.fullmatch(token) and int(token) < len(value):
            value = value[int(token)]
        else:
            raise ApiError(400, f"Invalid input: JSON pointer not found: {pointer}")
    try:
        text = value if isinstance(value, str) else json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:   # NaN, or a lone surrogate: JSON to serde_json neither
        raise ApiError(400, f"JSON parse error: Stored file is not valid JSON: {exc}") from None
    return text


def _file_meta(row: tuple) -> dict:
    return {"path": row[0], "size": row[1], "content_type": row[2], "created_at": row[3],
            "updated_at": row[4], "etag": row[5]}


def _json_object_text(data: bytes, conn: sqlite3.Connection) -> Optional[str]:
    """The text of ``data`` when it is one JSON object (queryable), else None.

    SQLite judges, not json.loads: Python also takes NaN and Infinity, and stops
    at deep nesting with RecursionError; one document SQLite cannot parse would
    make every query over its directory fail with "malformed JSON".
    """
    if not data[:1] in (b"{", b" ", b"\n", b"\t", b"\r"):
        return None
    try:
        text = data.decode("utf-8")
    except ValueError:
        return None
    if "\x00" in text:
        return None
    kind = conn.execute("SELECT CASE WHEN json_valid(?1) THEN json_type(?1) END", (text,)).fetchone()[0]
    return text if kind == "object" else None


def _sql_json_value(json_type: Optional[str], value: Any) -> Any:
    if json_type in (None, "null"):
        return None
    if json_type in ("true", "false"):
        return json_type == "true"
    if json_type in ("object", "array"):
        return load_json(value)
    return value


###############################################################################
# Envelope #####################################################################
###############################################################################
#
# Requests carry the body as a JSON array of byte values. Encoding maps each
# byte to a fixed-width 4-character cell ("  7,", " 42,", "255,": JSON allows
# the spaces), built with four bytes.translate passes and strided slice
# assignment, all in C. Large answers decode their byte array in a tiny WASM
# codec, many times faster than json.loads (bench/README.md).

_CELLS = [b"%3d," % value for value in range(256)]
_CELL_PLANES = [bytes(cell[k] for cell in _CELLS) for k in range(4)]
_DECIMALS = [b"%d" % value for value in range(256)]
_SMALL_BODY = 64   # below this a plain join is faster than the four passes
_json_string = json.encoder.encode_basestring_ascii   # what compact_json does to a str, in C
SAFE_HEADERS = frozenset({"cache-control", "etag", "last-modified", "content-disposition",
                          "content-language", "content-encoding", "vary"})
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def encode_byte_array(data: bytes) -> bytes:
    """``data`` as a JSON array of byte values, in C-speed passes."""
    if len(data) < _SMALL_BODY:
        return b"[" + b",".join(map(_DECIMALS.__getitem__, data)) + b"]"
    cells = bytearray(4 * len(data) + 1)
    for k in range(4):
        cells[1 + k::4] = data.translate(_CELL_PLANES[k])
    cells[0] = 0x5B          # '['
    cells[-1] = 0x5D         # ']' replaces the last cell's ','
    return bytes(cells)


def build_request_envelope(body: bytes, metadata: dict) -> bytes:
    """The request envelope; ``metadata`` maps plain names to strings (the ABI's metadata is all strings).

    Its JSON is what compact_json would write, faster.
    """
    fields = ",".join([f'"{name}":{_json_string(value)}' for name, value in metadata.items()])
    return b'{"arguments":%b,"metadata":{%b}}' % (encode_byte_array(body), fields.encode("ascii"))


_CODEC_WAT = r"""
(module
  (memory (export "memory") 1)
  ;; decode(src, n, dst): the digits, commas and whitespace between '[' and ']'
  ;; of a JSON byte array at src..src+n, written as bytes at dst.
  ;; Answers the byte count, or -1 when the text is not such an array.
  (func (export "decode") (param $src i32) (param $n i32) (param $dst i32) (result i32)
    (local $end i32) (local $c i32) (local $v i32) (local $digits i32)
    (local $after i32) (local $need i32) (local $out i32)
    (local.set $end (i32.add (local.get $src) (local.get $n)))
    (local.set $out (local.get $dst))
    (block $fail
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $src) (local.get $end)))
          (local.set $c (i32.load8_u (local.get $src)))
          (local.set $src (i32.add (local.get $src) (i32.const 1)))
          (if (i32.and (i32.ge_u (local.get $c) (i32.const 48)) (i32.le_u (local.get $c) (i32.const 57)))
            (then
              (br_if $fail (local.get $after))
              (br_if $fail (i32.and (i32.gt_u (local.get $digits) (i32.const 0)) (i32.eqz (local.get $v))))
              (local.set $v (i32.add (i32.mul (local.get $v) (i32.const 10))
                                     (i32.sub (local.get $c) (i32.const 48))))
              (br_if $fail (i32.gt_u (local.get $v) (i32.const 255)))
              (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
              (br $next)))
          (if (i32.or (i32.or (i32.eq (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 10)))
                      (i32.or (i32.eq (local.get $c) (i32.const 13)) (i32.eq (local.get $c) (i32.const 9))))
            (then
              (if (local.get $digits)
                (then
                  (i32.store8 (local.get $out) (local.get $v))
                  (local.set $out (i32.add (local.get $out) (i32.const 1)))
                  (local.set $v (i32.const 0)) (local.set $digits (i32.const 0))
                  (local.set $after (i32.const 1)) (local.set $need (i32.const 0))))
              (br $next)))
          (br_if $fail (i32.ne (local.get $c) (i32.const 44)))
          (if (local.get $digits)
            (then
              (i32.store8 (local.get $out) (local.get $v))
              (local.set $out (i32.add (local.get $out) (i32.const 1)))
              (local.set $v (i32.const 0)) (local.set $digits (i32.const 0))
              (local.set $after (i32.const 1))))
          (br_if $fail (i32.eqz (local.get $after)))
          (local.set $after (i32.const 0))
          (local.set $need (i32.const 1))
          (br $next)))
      (if (local.get $digits)
        (then
          (i32.store8 (local.get $out) (local.get $v))
          (local.set $out (i32.add (local.get $out) (i32.const 1)))
          (local.set $need (i32.const 0))))
      (br_if $fail (local.get $need))
      (return (i32.sub (local.get $out) (local.get $dst))))
    (i32.const -1)))
"""


class ByteArrayCodec:
    """Decodes large JSON byte arrays in a per-thread WASM instance of ``_CODEC_WAT``."""

    SMALL = 16 * KiB     # below this json.loads is as fast and has no set-up
    KEEP = 32 * MiB      # a thread keeps at most this much codec memory between calls

    def __init__(self) -> None:
        config = wasmtime.Config()
        # Reserve only what the codec's memory holds (it moves as it grows):
        # the default 4 GiB per instance would not fit a small address space.
        config.memory_reservation, config.memory_reservation_for_growth = 0, 1 * MiB
        config.memory_guard_size = SMALL_GUARD
        self.engine = wasmtime.Engine(config)
        self.module = wasmtime.Module(self.engine, wasmtime.wat2wasm(_CODEC_WAT))
        self._local = threading.local()

    def decode(self, text: bytes) -> Optional[bytes]:
        """The bytes of the array whose inside is ``text`` (no brackets), or None if invalid."""
        if len(text) < self.SMALL:
            try:
                values = load_json(b"[" + text + b"]")
                return bytes(values) if all(type(v) is int for v in values) else None
            except (ValueError, TypeError):
                return None
        state = getattr(self._local, "state", None)
        if state is None:
            store = wasmtime.Store(self.engine)
            instance = wasmtime.Instance(store, self.module, [])
            state = self._local.state = (store, instance.exports(store)["memory"],
                                         instance.exports(store)["decode"])
        store, memory, decode = state
        needed = 2 * len(text)
        have = memory.data_len(store)
        if needed > have:
            memory.grow(store, -(-(needed - have) // WASM_PAGE))
        memory.write(store, text, 0)
        count = decode(store, 0, len(text), len(text))
        result = bytes(memory.read(store, len(text), len(text) + count)) if count >= 0 else None
        if memory.data_len(store) > self.KEEP:
            self._local.state = None
        return result


@dataclasses.dataclass
class PluginAnswer:
    status: int
    content_type: str
    headers: dict
    body: bytes


_BODY_MARK = b'"body":['
_INT_TYPE = frozenset({int})


def parse_response_envelope(raw: bytes, codec: ByteArrayCodec) -> Optional[PluginAnswer]:
    """The answer as a PluginResponse, or None when it is not one (then it goes out raw)."""
    if raw[:1] != b"{" and raw.lstrip()[:1] != b"{":
        return None
    envelope, body = None, None
    start = raw.find(_BODY_MARK) if len(raw) >= codec.SMALL else -1
    if start >= 0:
        # Decode the byte array apart from the rest; a random sentinel proves
        # that the array found was the top-level body, not a nested one.
        end = raw.find(b"]", start)
        sentinel = secrets.token_hex(8)
        if end > 0:
            try:
                envelope = load_json(raw[:start] + b'"body":"' + sentinel.encode() + b'"' + raw[end + 1:])
            except (ValueError, RecursionError):   # as below: deep nesting is not an envelope
                envelope = None
            if isinstance(envelope, dict) and envelope.get("body") == sentinel:
                body = codec.decode(raw[start + len(_BODY_MARK):end])
                if body is None:
                    return None
            else:
                envelope = None
    if envelope is None:
        try:
            envelope = load_json(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(envelope, dict):
            return None
        body = envelope.get("body")
        if isinstance(body, str):
            try:
                body = body.encode("utf-8")
            except UnicodeEncodeError:   # a lone surrogate ("\\ud800"): not a text body
                return None
        elif isinstance(body, list) and _INT_TYPE.issuperset(map(type, body)):   # no floats, no bools
            try:
                body = bytes(body)
            except ValueError:   # a value outside 0-255
                return None
        else:
            return None
    return plugin_answer(envelope, body)


def plugin_answer(fields: dict, body: bytes) -> Optional[PluginAnswer]:
    """The answer ``fields`` (``status_code``, ``content_type``?, ``headers``?) describe, or None
    when they are not of those types. Both envelopes and aeordb_set_response go through here."""
    status = fields.get("status_code")
    content_type = fields.get("content_type")
    headers = fields.get("headers")
    if type(status) is not int:
        return None
    if content_type is not None and not isinstance(content_type, str):
        return None
    if headers is not None and not (isinstance(headers, dict)
                                    and all(isinstance(v, str) for v in headers.values())):
        return None
    if not 200 <= status <= 599:
        raise ApiError(500, f"plugin answered status_code {status}, outside 200-599")
    if not content_type or not is_header_value(content_type):
        content_type = DEFAULT_CONTENT_TYPE
    safe = {name: value for name, value in headers.items()
            if (name.lower().startswith("x-") or name.lower() in SAFE_HEADERS)
            and _HEADER_NAME.fullmatch(name) and is_header_value(value)} if headers else {}
    return PluginAnswer(status, content_type, safe, body)


###############################################################################
# Observability ################################################################
###############################################################################
#
# What an operator sees of plugins besides the log: per plugin a bounded ring
# of its recent log lines and failures (GET .../_logs) and its statistics
# (GET .../_stats), and for the whole server the counters of GET /_metrics
# (Prometheus text format). Everything is bounded by the deployed plugins: a
# removed plugin's lines, statistics and series go with it.

RING_LINES, RING_BYTES = 200, 64 * KiB      # per plugin
RING_TOTAL_BYTES = 8 * MiB                  # all plugins together: the fullest rings give way first
DURATION_SAMPLES = 1000                     # recent durations kept per plugin for p50/p99
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("ok", "plugin_error", "time_limit", "memory_limit", "bad_answer")


def outcome_of(status: int, message: str) -> str:
    """How an invocation ended, for statistics and metrics, from its answer."""
    if status < 400:
        return "ok"
    if "time limit" in message:
        return "time_limit"
    if "memory limit" in message:
        return "memory_limit"
    if any(mark in message for mark in ("bad pointer", "response limit", "status_code", "outside its")):
        return "bad_answer"
    return "plugin_error"


def prometheus_labels(**labels: str) -> str:
    """``{name="value",...}`` with values escaped as the text exposition format says."""
    escaped = (f'{name}="' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
               for name, value in labels.items())
    return "{" + ",".join(escaped) + "}"


@dataclasses.dataclass
class _PluginActivity:
    since: str = dataclasses.field(default_factory=utc_now_iso)   # when counting began
    lines: collections.deque = dataclasses.field(default_factory=collections.deque)
    line_bytes: int = 0
    outcomes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    durations: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=DURATION_SAMPLES))
    buckets: list = dataclasses.field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    host_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    last_error: Optional[dict] = None


def process_gauges() -> dict:
    """Resident memory and open descriptors of this process (Linux /proc; zeros elsewhere)."""
    resident = open_fds = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError):
        open_fds = len(os.listdir("/proc/self/fd"))
    return {"resident_bytes": resident, "open_fds": open_fds}


ACTIVITY_SHARE_INTERVAL = 0.25   # seconds: how far behind a worker may see the others' activity


class Activity:
    """Recent lines, statistics and counters of every plugin, and the server's own counters.

    Worker processes serving one data dir share theirs (``share``): each
    publishes a snapshot to FOLDER/<pid>.json when it changed, at most every
    ACTIVITY_SHARE_INTERVAL (not fsynced: it matters only while the worker
    lives), and ``view()`` adds up the live workers' snapshots.
    """

    def __init__(self) -> None:
        self._plugins: dict = {}
        self._lock = threading.Lock()
        self.http_requests: collections.Counter = collections.Counter()   # (route, status class)
        self.deploys = 0
        self.compile_seconds = 0.0
        self.busy_workers: Callable[[], int] = lambda: 0   # the server's count, where one serves the app
        self.started = time.time()
        self.line_bytes = 0   # of every ring
        self._removed: set = set()   # keys whose plugin is gone: a late invocation of it records nothing
        self.changes = 0   # counts every change, so a worker shares its activity only when it changed
        self.resident_bytes = 0   # of the worker processes besides this one, in a combined view
        self.shared: Optional[Path] = None   # the folder of the workers' snapshots, once shared
        self._publishing = threading.Lock()

    def _plugin(self, key: str) -> _PluginActivity:
        activity = self._plugins.get(key)
        if activity is None:
            activity = _PluginActivity()
            if key not in self._removed:
                self._plugins[key] = activity
        return activity   # for a removed key, one that is dropped: its lines must not count

    def line(self, key: str, level: str, request_id: str, message: str) -> None:
        """One line of the plugin's ring: its log lines and its failures, newest last."""
        entry = {"time": utc_now_iso(), "level": level, "request_id": request_id, "message": message}
        size = len(message) + 64
        with self._lock:
            if key in self._removed:
                return
            activity = self._plugin(key)
            activity.lines.append((entry, size))
            self.changes += 1
            activity.line_bytes += size
            self.line_bytes += size
            while len(activity.lines) > RING_LINES or activity.line_bytes > RING_BYTES:
                self._drop_oldest_line(activity)
            while self.line_bytes > RING_TOTAL_BYTES:
                self._drop_oldest_line(max(self._plugins.values(), key=lambda other: other.line_bytes))

    def _drop_oldest_line(self, activity: _PluginActivity) -> None:
        size = activity.lines.popleft()[1]
        activity.line_bytes -= size
        self.line_bytes -= size

    def invocation(self, key: str, outcome: str, seconds: float, request_bytes: int, response_bytes: int,
                   error: Optional[str], host_calls: Optional[collections.Counter] = None) -> None:
        with self._lock:
            activity = self._plugin(key)
            if host_calls:
                activity.host_calls.update(host_calls)
            activity.outcomes[outcome] += 1
            self.changes += 1
            activity.durations.append(seconds)
            activity.duration_sum += seconds
            activity.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            activity.request_bytes += request_bytes
            activity.response_bytes += response_bytes
            if error is not None:
                activity.last_error = {"time": utc_now_iso(), "outcome": outcome, "message": error}

    def deployed(self, key: str, compile_seconds: float) -> None:
        with self._lock:
            self._removed.discard(key)
            self.changes += 1
            self.deploys += 1
            self.compile_seconds += compile_seconds

    def removed(self, key: str) -> None:
        """The plugin at ``key`` was removed here: an invocation of it still in flight counts nothing."""
        self.forget(key)
        with self._lock:
            self._removed.add(key)

    def forget(self, key: str) -> None:
        """Drop what was counted of the plugin at ``key``: it is gone, or another one is there."""
        with self._lock:
            self._removed.discard(key)
            gone = self._plugins.pop(key, None)
            self.changes += 1
            if gone is not None:
                self.line_bytes -= gone.line_bytes

    def http(self, route: str, status: int) -> None:
        with self._lock:
            self.http_requests[route, status // 100] += 1
            self.changes += 1

    def share(self, folder: Path) -> None:
        """From now on publish this process's activity to ``folder`` (which Workers keeps), and
        view every live worker's."""
        self.shared = folder
        threading.Thread(target=self._publish, args=(folder / f"{os.getpid()}.json",), name="aeordb-activity",
                         daemon=True).start()

    def _publish(self, target: Path) -> None:
        published = None
        while self.shared is not None:
            time.sleep(ACTIVITY_SHARE_INTERVAL)   # a pace, not a wait for anything
            with self._publishing:
                if self.shared is not None and self.changes != published:
                    published = self.changes
                    with contextlib.suppress(OSError):
                        atomic_write(target, compact_json(self.snapshot()).encode(), durable=False)

    def stop_sharing(self) -> None:
        """At a clean stop: this worker's activity leaves the others' view."""
        with self._publishing:
            if self.shared is not None:
                with contextlib.suppress(OSError):
                    (self.shared / f"{os.getpid()}.json").unlink()
                self.shared = None

    def view(self, created: dict) -> "Activity":
        """This process's activity, or with shared workers, every live worker's added up.

        ``created``: when each plugin of interest was created (its key: its
        created_at), so that what a worker counted of an older plugin at the
        same key, before it noticed the change, is left out.
        """
        if self.shared is None:
            return self
        combined = Activity()
        combined.add(self.snapshot(), created)
        combined.resident_bytes = 0   # this process's own comes from process_gauges
        for published in self.shared.glob("*.json"):
            if published.stem.isdigit() and int(published.stem) != os.getpid() and process_alive(int(published.stem)):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    combined.add(load_json(published.read_bytes()), created)
        return combined

    def snapshot(self) -> dict:
        """Everything this process counted, as JSON, for the other worker processes to add up."""
        with self._lock:
            return {"plugins": {key: {"since": a.since, "lines": [entry for entry, _ in a.lines],
                                      "outcomes": dict(a.outcomes), "durations": list(a.durations),
                                      "buckets": list(a.buckets), "duration_sum": a.duration_sum,
                                      "request_bytes": a.request_bytes, "response_bytes": a.response_bytes,
                                      "host_calls": dict(a.host_calls), "last_error": a.last_error}
                                for key, a in self._plugins.items()},
                    "http_requests": [[route, hundreds, count] for (route, hundreds), count in self.http_requests.items()],
                    "deploys": self.deploys, "compile_seconds": self.compile_seconds,
                    "busy_workers": self.busy_workers(), "started": self.started,
                    "resident_bytes": process_gauges()["resident_bytes"]}

    def add(self, snapshot: dict, created: dict) -> None:
        """Count a worker's ``snapshot`` in too (into a combined view, not a live Activity): of the
        plugins in ``created``, what it counted since they were created."""
        for key, other in snapshot["plugins"].items():
            if key not in created or other["since"] < created[key]:   # both UTC, one format
                continue
            a = self._plugin(key)
            a.lines = collections.deque(sorted([*a.lines, *((entry, 0) for entry in other["lines"])],
                                               key=lambda line: line[0]["time"])[-RING_LINES:])
            for outcome, count in other["outcomes"].items():
                a.outcomes[outcome] = a.outcomes.get(outcome, 0) + count
            a.durations = collections.deque([*a.durations, *other["durations"]])
            a.buckets = [mine + theirs for mine, theirs in zip(a.buckets, other["buckets"])]
            a.duration_sum += other["duration_sum"]
            a.request_bytes += other["request_bytes"]
            a.response_bytes += other["response_bytes"]
            a.host_calls.update(other["host_calls"])
            if other["last_error"] and (a.last_error is None or other["last_error"]["time"] > a.last_error["time"]):
                a.last_error = other["last_error"]
        for route, hundreds, count in snapshot["http_requests"]:
            self.http_requests[route, hundreds] += count
        self.deploys += snapshot["deploys"]
        self.compile_seconds += snapshot["compile_seconds"]
        busy = self.busy_workers() + snapshot["busy_workers"]
        self.busy_workers = lambda: busy
        self.started = min(self.started, snapshot["started"])
        self.resident_bytes += snapshot["resident_bytes"]

    def logs(self, key: str, limit: int) -> list:
        with self._lock:
            lines = [entry for entry, _ in self._plugins[key].lines] if key in self._plugins else []
        return lines[-limit:] if limit else []

    def stats(self, key: str) -> dict:
        with self._lock:
            activity = self._plugins.get(key) or _PluginActivity()
            durations = sorted(activity.durations)
            outcomes, last_error = dict(activity.outcomes), activity.last_error

        def percentile(share: float) -> Optional[float]:
            if not durations:
                return None
            return round(durations[min(len(durations) - 1, int(share * len(durations)))] * 1000, 3)
        return {"invocations": sum(outcomes.values()), "outcomes": outcomes,
                "duration_ms": {"p50": percentile(0.5), "p99": percentile(0.99), "samples": len(durations)},
                "last_error": last_error}

    def prometheus(self, gauges: dict, plugin_keys: list) -> str:
        """The metrics in Prometheus' text exposition format (version 0.0.4)."""
        out = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
        with self._lock:
            plugins = {key: self._plugins.get(key) or _PluginActivity() for key in plugin_keys}
            family("aeordb_invocations_total", "counter", "Plugin invocations by outcome.")
            for key, activity in plugins.items():
                db, schema, table = key.split("/")
                for outcome, count in activity.outcomes.items():
                    labels = prometheus_labels(db=db, schema=schema, table=table, outcome=outcome)
                    out.append(f"aeordb_invocations_total{labels} {count}")
            family("aeordb_invocation_duration_seconds", "histogram", "Plugin invocation durations.")
            for key, activity in plugins.items():
                db, schema, table = key.split("/")
                running = 0
                for bound, count in zip(list(DURATION_BUCKETS) + ["+Inf"], activity.buckets):
                    running += count
                    labels = prometheus_labels(db=db, schema=schema, table=table, le=bound)
                    out.append(f"aeordb_invocation_duration_seconds_bucket{labels} {running}")
                labels = prometheus_labels(db=db, schema=schema, table=table)
                out.append(f"aeordb_invocation_duration_seconds_sum{labels} {activity.duration_sum}")
                out.append(f"aeordb_invocation_duration_seconds_count{labels} {running}")
            for name, field, text in (("aeordb_request_bytes_total", "request_bytes", "Request body bytes."),
                                      ("aeordb_response_bytes_total", "response_bytes", "Answer bytes.")):
                family(name, "counter", f"{text[:-1]} of plugin invocations.")
                for key, activity in plugins.items():
                    db, schema, table = key.split("/")
                    out.append(f"{name}{prometheus_labels(db=db, schema=schema, table=table)} "
                               f"{getattr(activity, field)}")
            family("aeordb_host_calls_total", "counter", "Host-function calls by plugins.")
            for key, activity in plugins.items():
                db, schema, table = key.split("/")
                for function, count in sorted(activity.host_calls.items()):
                    labels = prometheus_labels(db=db, schema=schema, table=table, function=function)
                    out.append(f"aeordb_host_calls_total{labels} {count}")
            family("aeordb_deploys_total", "counter", "Successful deploys.")
            out.append(f"aeordb_deploys_total {self.deploys}")
            family("aeordb_compile_seconds_total", "counter", "Seconds spent compiling deployed modules.")
            out.append(f"aeordb_compile_seconds_total {self.compile_seconds}")
            family("aeordb_http_requests_total", "counter", "HTTP requests by route template and status class.")
            for (route, hundreds), count in sorted(self.http_requests.items()):
                labels = prometheus_labels(route=route, status=f"{hundreds}xx")
                out.append(f"aeordb_http_requests_total{labels} {count}")
            family("aeordb_worker_threads_busy", "gauge", "Worker threads serving a request now.")
            out.append(f"aeordb_worker_threads_busy {self.busy_workers()}")
        family("process_resident_memory_bytes", "gauge", "Resident memory of the server process(es).")
        out.append(f"process_resident_memory_bytes {gauges['resident_bytes'] + self.resident_bytes}")
        family("process_open_fds", "gauge", "Open file descriptors of the server process.")
        out.append(f"process_open_fds {gauges['open_fds']}")
        family("aeordb_uptime_seconds", "gauge", "Seconds since the server started.")
        out.append(f"aeordb_uptime_seconds {time.time() - self.started:.3f}")
        family("aeordb_engine_mode", "gauge", "The engine's allocation mode (1 for the one in use).")
        for mode in ENGINE_MODES:
            out.append(f"aeordb_engine_mode{prometheus_labels(mode=mode)} {int(mode == gauges['engine'])}")
        family("aeordb_database_bytes", "gauge", "Bytes of files stored per database.")
        for db, stored in sorted(gauges["databases"].items()):
            out.append(f"aeordb_database_bytes{prometheus_labels(db=db)} {stored}")
        return "\n".join(out) + "\n"


###############################################################################
# WASM runtime and host functions ##############################################
###############################################################################

@dataclasses.dataclass(slots=True)
class Invocation:
    """What host functions of one invocation need; lives in a thread-local while it runs."""

    db: str
    plugin_key: str
    metadata: dict
    deadline: float
    failure: Optional[str] = None     # set by a host function that must fail the call
    failure_status: int = 500
    log_count: int = 0
    log_bytes: int = 0
    memory: Optional[wasmtime.Memory] = None   # the imported env.memory, on the slow path
    response: Optional[dict] = None   # what aeordb_set_response said, for a handle_raw answer
    output: Optional[dict] = None     # WASI stdout/stderr bytes not yet ended by a newline
    wasi_started: float = 0.0         # when its WASI context was made: the origin of WASI's monotonic clock
    # Host calls by function, counted here (one thread) and handed to Activity once, at the end.
    host_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # Log lines (level, text) kept back while the guest runs with the GIL held, as its call
    # may be started over; None: written as they come.
    held_lines: Optional[list] = None
    hold_expired: bool = False   # the hold ran out in an alloc a host function called

    def start_over(self, deadline: float) -> None:
        """Forget what a call that is started over did (its lines were held back, its writes rolled
        back); it must end by ``deadline``."""
        fresh = Invocation(self.db, self.plugin_key, self.metadata, deadline)
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(fresh, field.name))


class HoldExpired(Exception):
    """A guest running with the GIL held reached HOLD_TICKS: its call starts over with the GIL released."""


_TRAP_MESSAGES = {
    "STACK_OVERFLOW": "stack overflow (recursion too deep)",
    "MEMORY_OUT_OF_BOUNDS": "out-of-bounds memory access",
    "HEAP_MISALIGNED": "misaligned memory access",
    "TABLE_OUT_OF_BOUNDS": "out-of-bounds table access",
    "INDIRECT_CALL_TO_NULL": "indirect call to a null table entry",
    "BAD_SIGNATURE": "indirect call with a mismatched signature",
    "INTEGER_OVERFLOW": "integer overflow",
    "INTEGER_DIVISION_BY_ZERO": "integer division by zero",
    "BAD_CONVERSION_TO_INTEGER": "invalid conversion to integer",
    "UNREACHABLE": "unreachable instruction executed (the plugin panicked or aborted)",
}
MAX_HOST_ARGUMENT = 16 * MiB
MAX_LOG_MESSAGES = 100       # log lines of one invocation
MAX_LOG_BYTES = 16 * KiB      # log bytes of one invocation, all lines together
WASI_LINE = 4 * KiB           # WASI output without a newline is logged in pieces of this size
WASI_EBADF, WASI_EINTR, WASI_EINVAL = 8, 27, 28   # WASI preview 1 errno values


class WasmRuntime:
    """Runs invocations (``invoke``) and serves their host functions.

    One invocation is: its transaction (for a plugin that can write), the
    request envelope, ``run_guest``, the answer envelope; a host function's
    failure fails the invocation with its reason.

    Guest code runs with the GIL held where the fast call path allows it:
    releasing it hands it to another thread under load, which costs more
    than most plugins' whole call (README, Performance). So that a slow or
    endless guest stalls the other requests only briefly, the held call's
    Store has an epoch deadline of HOLD_TICKS: a guest that reaches it is
    started over with the GIL released and its full time limit, its writes
    rolled back and its log lines never written, and that plugin's calls
    release the GIL from then on.
    """

    def __init__(self, settings: Settings, files: FileStore, wasm: Wasm, activity: Activity):
        self.settings = settings
        self.files = files
        self.wasm = wasm
        self.activity = activity
        self.codec = ByteArrayCodec()
        self.limits = GuestLimits(memory=settings.memory_limit, table_elements=settings.table_limit,
                                  deadline_ticks=max(1, math.ceil(settings.timeout / EPOCH_TICK)),
                                  max_answer=settings.max_response_size, in_pool=wasm.pooling)
        self.held_limits = dataclasses.replace(self.limits, deadline_ticks=HOLD_TICKS)
        # A time limit within the hold leaves nothing to start over for.
        self.may_hold = wasm.ops.can_hold and self.limits.deadline_ticks > HOLD_TICKS
        self._current = threading.local()
        self._no_batch = contextlib.nullcontext()   # reusable, unlike files.batch()
        self.time_limit_reason = f"time limit of {settings.timeout:g} s exceeded"
        self._host = {
            "aeordb_read_file": self._read_file,
            "aeordb_write_file": self._write_file,
            "aeordb_delete_file": lambda inv, args: (
                self.files.delete(inv.db, _require(args, "path", str)) or {"ok": True}),
            "aeordb_file_metadata": lambda inv, args: self.files.metadata(inv.db, _require(args, "path", str)),
            "aeordb_list_directory": lambda inv, args: {
                "entries": self.files.list_directory(inv.db, _require(args, "path", str))},
            "aeordb_extract_file": lambda inv, args: self.files.extract(inv.db, args),
            "aeordb_query": lambda inv, args: self.files.query(inv.db, args),
            "aeordb_aggregate": lambda inv, args: self.files.aggregate(inv.db, args),
            "aeordb_context": self._context,
            "aeordb_set_response": self._set_response,
        }

    # -- linking ---------------------------------------------------------------

    def new_linker(self) -> wasmtime.Linker:
        """A linker with everything a plugin may import.

        The ABI's host functions (import module "aeordb"); wasmtime's own WASI
        preview 1, whose poll_oneoff is replaced by one that keeps the
        invocation's deadline (wasmtime's sleeps through it); and
        AssemblyScript's env.abort.
        """
        linker = wasmtime.Linker(self.wasm.engine)
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        for name, handler in self._host.items():
            linker.define_func("aeordb", name, wasmtime.FuncType([i32, i32], [i64]),
                               self._host_entry(name, handler), access_caller=True)
        linker.define_func("aeordb", LOG_FUNCTION_NAME, wasmtime.FuncType([i32] * 4, []),
                           self._log_message, access_caller=True)
        linker.define_wasi()
        linker.allow_shadowing = True
        linker.define_func(WASI_MODULE, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]),
                           self._poll_oneoff, access_caller=True)
        linker.allow_shadowing = False
        linker.define_func("env", "abort", wasmtime.FuncType([i32] * 4, []), self._abort, access_caller=True)
        return linker


    # -- invoking --------------------------------------------------------------

    def invoke(self, plugin: Plugin, body: bytes, invocation: Invocation) -> tuple:
        """(answer, raw): the plugin's PluginResponse, or None and the raw bytes it answered.

        Every write of the invocation commits when this returns and rolls back
        when it raises; only a plugin that can write needs that transaction.
        ApiError(500) names the cause of any failure. Its outcome goes to the
        plugin's statistics, and a failure to the log and the plugin's ring.
        """
        started = time.perf_counter()
        raw_entry = plugin.shape.entry == "handle_raw"   # the body as it is, the answer as it is
        # Never with WASI (wasmtime's WASI hands stdout to its Python callback from another
        # thread) nor with a ticker thread: either would wait for the GIL this thread holds.
        hold = (self.may_hold and plugin.holds_gil and plugin.pre is not None and not plugin.shape.wasi
                and self.wasm.ticker == "timer")
        try:
            request = body if raw_entry else build_request_envelope(body, invocation.metadata)
            while True:
                try:
                    with self.files.batch() if plugin.shape.writes_files else self._no_batch:
                        raw = self._run(plugin, request, invocation, hold)
                        request = b""   # four times the body as an envelope: gone before the answer is parsed
                        answer = (plugin_answer(invocation.response or {"status_code": 200}, raw) if raw_entry
                                  else parse_response_envelope(raw, self.codec))
                    break
                except HoldExpired:   # with the time limit afresh
                    plugin.holds_gil = hold = False
                    invocation.start_over(time.monotonic() + self.settings.timeout)
        except ApiError as exc:
            self._failed(plugin, invocation, exc, time.perf_counter() - started, len(body))
            raise
        self.activity.invocation(plugin.key, "ok", time.perf_counter() - started, len(body), len(raw), None,
                                 invocation.host_calls)
        return answer, raw

    def _failed(self, plugin: Plugin, invocation: Invocation, error: ApiError, seconds: float,
                request_bytes: int) -> None:
        outcome = outcome_of(error.status, error.message)
        request_id = invocation.metadata.get("request_id", "-")
        self.activity.invocation(plugin.key, outcome, seconds, request_bytes, 0, error.message, invocation.host_calls)
        self.activity.line(plugin.key, "ERROR", request_id, f"failed ({error.status}): {error.message}")
        log.warning("invocation failed: plugin=%s function=%s status=%d outcome=%s duration=%.1fms "
                    "request=%s cause=%s", plugin.key, invocation.metadata.get("function_name", "-"),
                    error.status, outcome, seconds * 1000, request_id, error.message)

    def _run(self, plugin: Plugin, request: bytes, invocation: Invocation, hold: bool = False) -> bytes:
        """The guest's answer to ``request``; HoldExpired when a call with the GIL ``hold`` ran past HOLD_TICKS."""
        if plugin.pre is not None:
            ops, target = self.wasm.ops, plugin.pre
        else:
            ops, target = self.wasm.public_ops, functools.partial(
                self._instantiate_importing_memory, plugin, invocation)
        shape = plugin.shape
        self._current.invocation = invocation
        self.files.set_deadline(invocation.deadline)   # host functions' queries stop there too
        invocation.held_lines = [] if hold else None
        answer = b""
        try:
            answer = run_guest(ops, self.wasm.engine, self.held_limits if hold else self.limits, target, request,
                               has_alloc=shape.has_alloc, quick_instantiate=shape.quick_instantiate,
                               entry=shape.entry, initialize=shape.initialize,
                               wasi=self._sealed_wasi(invocation) if shape.wasi else None, hold=hold)
        except GuestFailure as failure:
            if hold and interrupted(failure.error) and not invocation.failure:
                invocation.hold_expired = True
            elif not invocation.hold_expired:
                if no_memory_left(failure.error):
                    raise ApiError(503, "no memory left for the plugin's instance right now: "
                                        f"{_first_line(failure.error)}", RETRY_SOON) from None
                raise ApiError(500, "plugin invocation failed: "
                               + self._explain(failure.error, invocation, failure.memory_in_use)) from None
        except ApiError:
            # The hold ran out in a host function's alloc (whatever the guest did then), or a
            # host function's reason comes first.
            if not invocation.hold_expired and not invocation.failure:
                raise
        finally:
            self._current.invocation = None
            self.files.set_deadline(None)
            if invocation.output:
                for stream in invocation.output:
                    self._wasi_output(invocation, stream, b"", flush=True)
            held_lines, invocation.held_lines = invocation.held_lines, None
            for level, text in () if invocation.hold_expired else held_lines or ():
                self._write_line(invocation, level, text)
        if invocation.hold_expired:
            raise HoldExpired()
        if invocation.failure:   # a host function's reason comes first
            raise ApiError(invocation.failure_status, f"plugin invocation failed: {invocation.failure}")
        return answer

    def _instantiate_importing_memory(self, plugin: Plugin, invocation: Invocation,
                                      store: wasmtime.Store) -> tuple:
        """Slow path: a module importing env.memory needs that memory created in its Store."""
        linker = self.new_linker()
        memory_type = next(i.type for i in plugin.module.imports if i.module == "env")
        invocation.memory = wasmtime.Memory(store, memory_type)
        linker.define(store, "env", "memory", invocation.memory)
        return linker.instantiate(store, plugin.module), invocation.memory

    def _explain(self, error: Exception, invocation: Optional[Invocation], memory_in_use: Optional[int]) -> str:
        if invocation is not None and invocation.failure:
            return invocation.failure
        code = getattr(error, "trap_code", None)
        name = getattr(code, "name", None)
        # wasmtime reports no refused memory.grow, and an allocator asks for
        # what it needs (a growing Vec doubles), so the refusal can come well
        # below the cap: an abort with over half the limit in use is most
        # likely out-of-memory.
        if name == "UNREACHABLE" and memory_in_use is not None and memory_in_use * 2 >= self.settings.memory_limit:
            return (f"memory limit of {self.settings.memory_limit // MiB} MiB reached "
                    f"(the plugin aborted with {memory_in_use // MiB} MiB in use: it most likely "
                    "ran out of memory)")
        if name == "INTERRUPT":
            return self.time_limit_reason
        if name in _TRAP_MESSAGES:
            return _TRAP_MESSAGES[name]
        text = str(error)
        exited = re.search(r"[Ee]xited with i32 exit status (-?\d+)", text)
        if exited:
            return f"the plugin exited with code {exited.group(1)} (WASI proc_exit)"
        if "memory" in text and ("limit" in text or "maximum" in text or "exceed" in text):
            return f"memory limit of {self.settings.memory_limit // MiB} MiB reached: {_first_line(error)}"
        cause = text.split("Caused by:", 1)[-1].strip()
        return _first_line(Exception(cause)) if cause else type(error).__name__

    # -- host functions --------------------------------------------------------

    def _host_entry(self, name: str, handler: Callable) -> Callable:
        def entry(caller: wasmtime.Caller, ptr: int, length: int) -> int:
            # Never raise here: wasmtime-py would keep the exception in a global
            # and re-raise it in whichever thread traps next.
            invocation = self._current.invocation
            try:
                invocation.host_calls[name] += 1
                memory = self._guest_memory(caller, invocation)
                try:
                    try:
                        args = load_json(_guest_bytes(caller, memory, ptr, length, MAX_HOST_ARGUMENT))
                    except (ValueError, RecursionError) as exc:
                        raise ApiError(400, f"arguments are not valid JSON: {exc}") from None
                    if not isinstance(args, dict):
                        raise ApiError(400, f"{name} takes a JSON object")
                    answer = handler(invocation, args)
                except ApiError as exc:
                    if exc.status == 507:   # over the database's quota: nothing of this call may stay
                        return self._fail(caller, invocation, exc.message, 507)
                    answer = {"error": exc.message}
                except TimeLimitReached:
                    return self._fail(caller, invocation, self.time_limit_reason)
                except Exception as exc:   # a bug of ours must not kill the guest or the server
                    log.exception("host function %s failed", name)
                    answer = {"error": f"{name} failed: {type(exc).__name__}"}
                data = compact_json(answer).encode()
                ops = self.wasm.public_ops
                call = ops.in_caller(caller, memory)
                pointer = place_in_guest(ops, call, data, f"answer of {name}", call.alloc is not None)
                return (pointer << 32) | len(data)
            except ApiError as exc:
                return self._fail(caller, invocation, exc.message)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:   # the guest's alloc trapped
                if (invocation is not None and invocation.held_lines is not None and invocation.failure is None
                        and interrupted(exc)):   # the hold ran out: not a failure, the call starts over
                    invocation.hold_expired = True
                    Wasm.interrupt(caller)
                    return 0
                in_use = None
                with contextlib.suppress(Exception):
                    in_use = self._guest_memory(caller, invocation).data_len(caller)
                why = self._explain(exc, invocation, in_use)
                return self._fail(caller, invocation, f"{name} could not answer: alloc failed: {why}")
            except Exception as exc:
                return self._fail(caller, invocation, f"{name} could not answer: {_first_line(exc)}")
        return entry

    @staticmethod
    def _fail(caller: wasmtime.Caller, invocation: Invocation, reason: str, status: int = 500) -> int:
        """Fail the invocation from inside a host function: record why, interrupt the guest.

        Compiled code rereads the epoch deadline on function entry only (loops
        check a cached copy), so the guest stops at its next call, or at the
        latest at its own time limit; either way the answer gives this reason.
        """
        if invocation is not None and invocation.failure is None:
            invocation.failure, invocation.failure_status = reason, status
        Wasm.interrupt(caller)
        return 0

    def _log_message(self, caller: wasmtime.Caller, level_ptr: int, level_len: int,
                     msg_ptr: int, msg_len: int) -> None:
        invocation = self._current.invocation
        try:
            if invocation is None or invocation.log_count > MAX_LOG_MESSAGES:
                return
            memory = self._guest_memory(caller, invocation)
            level = _guest_bytes(caller, memory, level_ptr, level_len, 16).decode("utf-8", "replace")
            _guest_bytes(caller, memory, msg_ptr + msg_len, 0, 0)   # the whole message lies in memory
            kept = min(msg_len, max(0, MAX_LOG_BYTES - invocation.log_bytes) + 1)
            message = _guest_bytes(caller, memory, msg_ptr, kept, MAX_LOG_BYTES + 1)
            level_no = getattr(logging, level.strip().upper(), logging.INFO)
            self.plugin_line(invocation, level_no if isinstance(level_no, int) else logging.INFO, message)
        except Exception:
            pass

    def plugin_line(self, invocation: Invocation, level: int, message: bytes) -> None:
        """One line of a plugin's log (the server log and the plugin's ring), within the
        invocation's caps on lines and bytes."""
        if invocation.log_count > MAX_LOG_MESSAGES:
            return
        invocation.log_count += 1
        room = MAX_LOG_BYTES - invocation.log_bytes
        if invocation.log_count > MAX_LOG_MESSAGES or room <= 0:
            invocation.log_count = MAX_LOG_MESSAGES + 1
            text = (f"log limit reached ({MAX_LOG_MESSAGES} lines or {MAX_LOG_BYTES // KiB} KiB per "
                    "invocation); the rest are dropped")
        else:
            text = message[:room].decode("utf-8", "replace")
            if len(message) > room:
                text += " [truncated]"
            invocation.log_bytes += min(len(message), room)
        # One plugin line is one log line: a plugin must not forge others.
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if invocation.held_lines is not None:
            invocation.held_lines.append((level, text))
        else:
            self._write_line(invocation, level, text)

    def _write_line(self, invocation: Invocation, level: int, text: str) -> None:
        request_id = invocation.metadata.get("request_id", "-")
        plugin_log.log(level, "[%s request=%s] %s", invocation.plugin_key, request_id, text)
        self.activity.line(invocation.plugin_key, logging.getLevelName(level), request_id, text)

    # -- WASI and AssemblyScript -----------------------------------------------

    @staticmethod
    def _guest_memory(caller: wasmtime.Caller, invocation: Optional[Invocation]) -> Any:
        """The calling guest's memory: its export, or the env.memory it imported."""
        return caller.get("memory") or (invocation.memory if invocation is not None else None)

    def _sealed_wasi(self, invocation: Invocation) -> wasmtime.WasiConfig:
        """wasmtime's WASI with nothing of the host: no directories, environment or arguments,
        an empty stdin; stdout and stderr go to the plugin's log. Clocks and random work."""
        config = wasmtime.WasiConfig()
        invocation.output = {"stdout": bytearray(), "stderr": bytearray()}
        invocation.wasi_started = time.monotonic()
        config.stdout_custom = lambda data: self._wasi_output(invocation, "stdout", data)
        config.stderr_custom = lambda data: self._wasi_output(invocation, "stderr", data)
        return config

    def _wasi_output(self, invocation: Invocation, stream: str, data: bytes, flush: bool = False) -> None:
        """What a plugin wrote to stdout or stderr: its log, one line per line written."""
        pending = invocation.output[stream]
        pending += data
        while True:
            end = pending.find(b"\n")
            if end < 0 and (len(pending) >= WASI_LINE or flush and pending):
                end = min(len(pending), WASI_LINE)
            if end < 0 or not pending:
                break
            line = bytes(pending[:end])
            del pending[:end + 1 if pending[end:end + 1] == b"\n" else end]
            self.plugin_line(invocation, logging.INFO, stream.encode() + b": " + line)

    def _poll_oneoff(self, caller: wasmtime.Caller, subscriptions: int, events: int, count: int,
                     written: int) -> int:
        # Never raise here: wasmtime-py would re-raise it in whichever thread traps next.
        try:
            return self._poll(caller, subscriptions, events, count, written)
        except Exception:
            log.exception("poll_oneoff failed")
            return WASI_EINVAL

    def _poll(self, caller: wasmtime.Caller, subscriptions: int, events: int, count: int, written: int) -> int:
        """WASI's poll_oneoff within the invocation's deadline.

        The sandbox has stdin (empty: ready at once), stdout and stderr
        (always writable) and clocks. A sleep that would pass the deadline
        sleeps to the deadline and fails the invocation there.
        """
        invocation = self._current.invocation
        if count <= 0:
            return WASI_EINVAL
        try:
            memory = self._guest_memory(caller, invocation)
            raw = _guest_bytes(caller, memory, subscriptions, count * 48, 48 * 4096)
            _guest_bytes(caller, memory, events, count * 32, 32 * 4096)
            _guest_bytes(caller, memory, written, 4, 4)
        except ApiError:
            return WASI_EINVAL
        ready, wake, now = [], math.inf, time.monotonic()
        for index in range(count):
            userdata, tag = struct.unpack_from("<QB", raw, index * 48)
            if tag > 2:
                return WASI_EINVAL
            if tag == 0:   # clock: id, timeout (ns), precision, flags (1: absolute)
                clock_id, timeout, _, flags = struct.unpack_from("<IxxxxQQH", raw, index * 48 + 16)
                delay = timeout / 1e9
                if flags & 1:   # WASI's monotonic clock starts with its context, the realtime one is the wall's
                    delay -= time.time() if clock_id == 0 else now - invocation.wasi_started
                wake = min(wake, now + max(0.0, delay))
                ready.append((userdata, tag, 0, now + max(0.0, delay)))
            else:          # fd_read / fd_write
                (fd,) = struct.unpack_from("<I", raw, index * 48 + 16)
                ready.append((userdata, tag, 0 if fd in (0, 1, 2) else WASI_EBADF, now))
        if not any(at <= now for *_, at in ready):
            deadline = invocation.deadline if invocation is not None else math.inf
            time.sleep(max(0.0, min(wake, deadline) - now))
            if wake > deadline:
                self._fail(caller, invocation, self.time_limit_reason)
                return WASI_EINTR
            now = time.monotonic()
        out = b"".join(struct.pack("<QHBxxxxxQHxxxxxx", userdata, error, tag, 0, 1 if tag == 1 else 0)
                       for userdata, tag, error, at in ready if at <= now + 1e-6)
        memory.write(caller, out, events)
        memory.write(caller, struct.pack("<I", len(out) // 32), written)
        return 0

    def _abort(self, caller: wasmtime.Caller, message: int, file: int, line: int, column: int) -> None:
        """AssemblyScript's env.abort: the invocation fails with the message and where it was raised."""
        invocation = self._current.invocation
        try:
            self._fail(caller, invocation, self._abort_reason(caller, invocation, message, file, line, column))
        except Exception:   # never raise here (see _poll_oneoff)
            self._fail(caller, invocation, "the plugin aborted")

    def _abort_reason(self, caller: wasmtime.Caller, invocation: Optional[Invocation], message: int, file: int,
                      line: int, column: int) -> str:
        memory = self._guest_memory(caller, invocation)

        def utf16(pointer: int) -> str:   # AssemblyScript strings: UTF-16LE, byte length at pointer - 4
            try:
                (size,) = struct.unpack("<I", _guest_bytes(caller, memory, pointer - 4, 4, 4))
                return _guest_bytes(caller, memory, pointer, min(size, 2048), 2048).decode("utf-16-le", "replace")
            except (ApiError, struct.error):
                return "?"
        where = f"{utf16(file) if file else '?'}:{line & 0xFFFFFFFF}:{column & 0xFFFFFFFF}"
        return f"the plugin aborted: {utf16(message) if message else 'abort'} at {where}"

    def _set_response(self, invocation: Invocation, args: dict) -> dict:
        """aeordb_set_response: the status, content type and headers of a handle_raw answer."""
        fields = {**args}
        if plugin_answer(fields, b"") is None:   # the same checks as an envelope's
            raise ApiError(400, "aeordb_set_response takes {\"status_code\": int, \"content_type\"?: str, "
                                "\"headers\"?: {str: str}}")
        invocation.response = fields
        return {"ok": True}

    # -- files -------------------------------------------------------------------

    def _read_file(self, invocation: Invocation, args: dict) -> dict:
        data, meta = self.files.read(invocation.db, _require(args, "path", str))
        return {"data": base64.b64encode(data).decode("ascii"), "content_type": meta["content_type"],
                "size": meta["size"]}

    def _write_file(self, invocation: Invocation, args: dict) -> dict:
        encoded = _require(args, "data", str)
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise ApiError(400, "'data' must be base64") from None
        content_type = args.get("content_type")
        if content_type is not None and not isinstance(content_type, str):
            raise ApiError(400, "'content_type' must be a string")
        meta, _ = self.files.write(invocation.db, _require(args, "path", str), data, content_type)
        return {"ok": True, "size": meta["size"]}

    @staticmethod
    def _context(invocation: Invocation, args: dict) -> dict:
        return {**invocation.metadata, "db": invocation.db,
                "remaining_ms": max(0, int((invocation.deadline - time.monotonic()) * 1000))}


def _guest_bytes(caller: Any, memory: Any, ptr: int, length: int, cap: int) -> bytes:
    """Bounds-checked read of guest memory (wasmtime's read would wrap negatives and clip)."""
    if not isinstance(memory, wasmtime.Memory):
        raise ApiError(400, "plugin has no memory")
    if ptr < 0 or length < 0:
        raise ApiError(400, f"negative pointer or length ({ptr}, {length})")
    if length > cap:
        raise ApiError(400, f"argument of {length} bytes exceeds the limit of {cap} bytes")
    if ptr + length > memory.data_len(caller):
        raise ApiError(400, f"{length} bytes at {ptr} are outside plugin memory")
    return bytes(memory.read(caller, ptr, ptr + length))


###############################################################################
# API keys #####################################################################
###############################################################################
#
# The token is the admin credential. With it, API keys are made for least
# privilege: each has scopes (what it may do) and databases (where). A key's
# secret is shown once; DATA_DIR/keys.json keeps only its SHA-256, which is
# enough for a secret of 256 random bits (nobody can search that space, so no
# salt or slow hash is needed), and a look-up hashes the presented secret and
# finds it by its digest: timing can tell nothing about a stored secret.

KEY_PREFIX = "aeo_"
SCOPES = ("invoke", "deploy", "read", "write", "metrics")
_KEY_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts for: the token (everything) or an API key (its scopes, in its databases)."""

    name: str                          # for the audit log: "token" or the key's name and id
    scopes: frozenset
    databases: Optional[frozenset]     # None: every database
    admin: bool = False

    def refusal(self, scope: Optional[str], db: Optional[str]) -> Optional[str]:
        """Why this principal may not do ``scope`` in ``db`` (None: it may)."""
        if self.admin:
            return None
        if scope == "admin":
            return "this route needs the admin token, not an API key"
        if scope not in self.scopes:
            return f"this API key lacks the scope {scope!r} (it has: {', '.join(sorted(self.scopes))})"
        if db is not None and self.databases is not None and db not in self.databases:
            return f"this API key may not use database {db!r}"
        return None


ADMIN = Principal("token", frozenset(SCOPES), None, admin=True)


class KeyStore:
    """API keys, kept hashed in DATA_DIR/keys.json (owner-only, written atomically).

    The file is read again when it changes, so keys made or revoked by
    another process serving the same data dir count at once; a change
    holds DATA_DIR/keys.lock, so two processes' changes never undo each other.
    """

    def __init__(self, data_dir: Path):
        self.file = data_dir / "keys.json"
        self._file_name = str(self.file)
        self._lock_name = str(data_dir / "keys.lock")
        self._lock = threading.Lock()
        self._keys: list = []
        self._by_digest: dict = {}
        self._seen: Optional[tuple] = None
        self._reload()

    def _reload(self) -> None:
        try:
            stat = os.stat(self._file_name)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        keys, by_digest = [], {}
        if seen is not None:
            try:
                keys = load_json(self.file.read_bytes())["keys"]
                by_digest = {key["sha256"]: (self._principal(key), _parse_time(key["expires_at"])
                                             if key.get("expires_at") else None) for key in keys}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("cannot read %s (%s): no API key is accepted until it is fixed", self.file, exc)
                keys, by_digest = [], {}
        self._keys, self._by_digest, self._seen = keys, by_digest, seen

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the file against other processes too, so a create there cannot undo a revoke here."""
        with self._lock, held_lock_file(self._lock_name):
            self._seen = None   # read it again under the lock, whatever its stat says
            self._reload()
            yield

    def _save(self, keys: list) -> None:
        atomic_write(self.file, json.dumps({"keys": keys}, indent=2).encode())
        self._seen = None
        self._reload()

    def create(self, name: Any, scopes: Any, databases: Any, expires_at: Any) -> dict:
        """A new key: its record, with the secret (shown this once)."""
        if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
            raise ApiError(400, "'name' must be 1-128 printable characters")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(scope, str) for scope in scopes) \
                or not set(scopes) <= set(SCOPES):
            raise ApiError(400, f"'scopes' must be a non-empty list of: {', '.join(SCOPES)}")
        if databases != ["*"]:
            if not isinstance(databases, list) or not databases or not all(isinstance(db, str) for db in databases):
                raise ApiError(400, "'databases' must be a non-empty list of database names, or [\"*\"]")
            for db in databases:
                check_segments(db)
        if expires_at is not None:
            if not isinstance(expires_at, str) or _parse_time(expires_at) is None:
                raise ApiError(400, "'expires_at' must be an RFC 3339 time such as 2027-01-31T00:00:00Z, or null")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = {"id": "key_" + secrets.token_hex(6), "name": name, "scopes": sorted(set(scopes)),
                  "databases": sorted(set(databases)), "created_at": utc_now_iso(), "expires_at": expires_at,
                  "sha256": hashlib.sha256(secret.encode()).hexdigest()}
        with self._changing():
            self._save(self._keys + [record])
        return {**self.public(record), "key": secret}

    def list(self) -> list:
        with self._lock:
            self._reload()
            return [self.public(key) for key in self._keys]

    def revoke(self, key_id: str) -> dict:
        with self._changing():
            kept = [key for key in self._keys if key["id"] != key_id]
            if len(kept) == len(self._keys):
                raise ApiError(404, f"no API key {key_id!r}")
            revoked = next(key for key in self._keys if key["id"] == key_id)
            self._save(kept)
        return self.public(revoked)

    def find(self, secret: str) -> Optional[Principal]:
        """The principal of a presented key secret; None when unknown, revoked or expired."""
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
        with self._lock:
            self._reload()
            found = self._by_digest.get(digest)
        if found is None:
            return None
        principal, expires = found
        if expires is not None and expires <= time.time():
            return None
        return principal

    @staticmethod
    def _principal(key: dict) -> Principal:
        databases = None if key["databases"] == ["*"] else frozenset(key["databases"])
        return Principal(f"key {key['name']!r} ({key['id']})", frozenset(key["scopes"]), databases)

    @staticmethod
    def public(key: dict) -> dict:
        return {name: key[name] for name in ("id", "name", "scopes", "databases", "created_at", "expires_at")}


def _parse_time(text: str) -> Optional[float]:
    """Seconds since the epoch of an RFC 3339 time with a zone, or None."""
    with contextlib.suppress(ValueError):
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is not None:
            return moment.timestamp()
    return None


###############################################################################
# The OpenAPI document #########################################################
###############################################################################
#
# GET /_openapi.json describes the API as OpenAPI 3.1. The list of paths and
# methods is never written by hand: it is read from the app's own routes, so it
# cannot drift from what is served. What a route means (summary, body, answers,
# errors) comes from ROUTE_DOCS, keyed by the name of the Api method serving
# it; a route whose method has no entry makes openapi_document raise, so the
# tests fail the day a route is added without being described.
# 3.1 rather than 3.0: its schemas are JSON Schema 2020-12 (so answers can be
# checked with jsonschema, and a field can be "string or null"), and its
# security requirements may name the scope a bearer credential needs.


def _schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict) -> dict:
    """A JSON answer (or request body) of ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict, optional: tuple = ()) -> dict:
    """A JSON object with exactly these fields (every one present but ``optional``): an answer
    gaining a field fails the tests until its schema says so."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": [name for name in properties if name not in optional]}


_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
_MS = {"type": "integer", "description": "milliseconds since the epoch"}
_ISO_TIME = {"type": "string", "format": "date-time"}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_PLUGIN_ID = {"type": "string", "description": "kept across redeploys: a UUIDv4 (32 hex digits for a "
                                               "plugin first deployed by an older version)"}
_CHECKSUM = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$",
             "description": "SHA-256 of the module (AeorDB itself answers blake3:...)"}
_FREE_TEXT = {"type": "string", "maxLength": 128, "description": "as given at deploy"}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_FIELDS = {"type": "array", "items": _STRING, "description": "dotted JSON paths, such as address.city"}
_BY_FIELD = {"type": "object", "additionalProperties": _NUMBER_OR_NULL,
             "description": "field: value, null where no document has a number in that field"}
_KEY_PROPERTIES = {
    "id": {"type": "string", "pattern": "^key_"},
    "name": _STRING,
    "scopes": {"type": "array", "items": {"enum": list(SCOPES)}},
    "databases": {"type": "array", "items": _STRING, "description": 'database names, or ["*"]: every one'},
    "created_at": _ISO_TIME,
    "expires_at": {"type": ["string", "null"], "format": "date-time"},
}

OPENAPI_SCHEMAS = {
    "Error": _object({"error": {"type": "string", "minLength": 1, "description": "what was wrong"}}),
    "PluginMeta": _object({
        "plugin_id": _PLUGIN_ID,
        "name": _STRING,
        "path": {"type": "string", "description": "the plugin's place, db/schema/table"},
        "plugin_type": {"enum": ["wasm"]},
        "deployed_at": {**_ISO_TIME, "description": "when this version was deployed (as updated_at)"},
        "sha256": _SHA256,
        "size": {"type": "integer", "minimum": 1, "description": "the module's size in bytes"},
        "version": _FREE_TEXT,
        "author": _FREE_TEXT,
        "created_at": {**_ISO_TIME, "description": "the first deploy at this path"},
        "updated_at": {**_ISO_TIME, "description": "the latest deploy at this path"},
        "checksum": _CHECKSUM,
    }, optional=("version", "author")),
    "TodayPluginMeta": _object({
        "plugin_id": _PLUGIN_ID,
        "name": _STRING,
        "path": {"type": "string", "description": "the {name} of /plugins/{name}; for another plugin of "
                                                  "the default database, its db/schema/table"},
        "plugin_type": {"enum": ["wasm"]},
        "created_at": {**_ISO_TIME, "description": "the first deploy"},
        "version": {"type": ["string", "null"], "maxLength": 128},
        "author": {"type": ["string", "null"], "maxLength": 128},
        "checksum": _CHECKSUM,
        "updated_at": {**_ISO_TIME, "description": "the latest deploy"},
    }),
    "FileMeta": _object({
        "path": _STRING, "size": _COUNT, "content_type": _STRING, "created_at": _MS, "updated_at": _MS,
        "etag": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    }),
    "DirectoryListing": _object({
        "path": _STRING,
        "entries": {"type": "array", "items": _object({
            "name": _STRING, "type": {"enum": ["file", "directory"]},
            "size": {**_COUNT, "description": "a directory's size is the sum of its files'"}})},
    }),
    "Query": {
        "type": "object",
        "description": "Over the JSON documents directly inside the directory 'path'. With 'aggregate', an "
                       "aggregate (answered as an AggregateAnswer), else a query (a QueryAnswer).",
        "properties": {
            "path": {"type": "string", "default": "/"},
            "where": {"description": "one condition {field, op, value, ...} (op: eq, in, gt, lt, between, "
                                     "contains, similar, phonetic, fuzzy, match; field: a dotted path or an @ "
                                     "field such as @path, @size), or {and: [...]}, {or: [...]}, {not: node}; a "
                                     "list is an implicit and; absent, {} or [] match everything",
                      "type": ["object", "array", "null"]},
            "order_by": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string", "description": "a dotted path, an @ field, or @score"},
                "direction": {"enum": ["asc", "desc"]}}}},
            "limit": {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_LIMIT, "default": 100},
            "offset": {"type": "integer", "minimum": 0, "default": 0},
            "after": {"type": "string", "description": "a cursor: the items after the one it names"},
            "before": {"type": "string", "description": "a cursor: the items before the one it names"},
            "include_total": {"type": "boolean", "default": False},
            "aggregate": {"type": "object", "properties": {
                "count": {"type": "boolean"}, "sum": _FIELDS, "avg": _FIELDS, "min": _FIELDS, "max": _FIELDS,
                "group_by": _FIELDS}, "additionalProperties": False},
        },
    },
    "QueryAnswer": _object({
        "items": {"type": "array", "items": _schema("QueryItem")},
        "results": {"type": "array", "items": _schema("QueryItem"), "description": "items again, for older SDKs"},
        "has_more": {"type": "boolean"},
        "total": {**_COUNT, "description": "with include_total"},
        "next_cursor": {"type": "string", "description": "names the page's last item, when more follow"},
        "prev_cursor": {"type": "string", "description": "names the page's first item, after an offset or cursor"},
        "default_limit_hit": {"const": True, "description": "no limit was given and more items follow"},
        "default_limit": {**_COUNT, "description": "the limit applied, with default_limit_hit"},
    }, optional=("total", "next_cursor", "prev_cursor", "default_limit_hit", "default_limit")),
    "QueryItem": _object({
        "path": _STRING, "size": _COUNT, "score": {"type": "number"}, "total_size": _COUNT,
        "content_type": _STRING, "created_at": _MS, "updated_at": _MS,
        "matched_by": {"type": "array", "items": _STRING,
                       "description": "the fields of the plain conditions, then the labels of the text "
                                      "conditions the item met (trigram, soundex, dmetaphone, exact, fuzzy...)"},
    }),
    "AggregateAnswer": _object({
        "count": {**_COUNT, "description": "with aggregate.count"},
        "sum": _BY_FIELD, "avg": _BY_FIELD, "min": _BY_FIELD, "max": _BY_FIELD,
        "groups": {"type": "array", "items": _object({
            "key": {"type": "object", "description": "group_by field: its value"}, "count": _COUNT,
            "sum": _BY_FIELD, "avg": _BY_FIELD, "min": _BY_FIELD, "max": _BY_FIELD})},
        "total_count": _COUNT,
        "has_more": {"type": "boolean"},
    }, optional=("count",)),
    "KeySpec": {
        "type": "object", "required": ["name", "scopes", "databases"],
        "properties": {name: _KEY_PROPERTIES[name] for name in ("name", "scopes", "databases", "expires_at")},
    },
    "Key": _object(_KEY_PROPERTIES),
    "CreatedKey": _object({**_KEY_PROPERTIES, "key": {
        "type": "string", "pattern": f"^{KEY_PREFIX}",
        "description": "the key's secret, shown this once: send it as a bearer token"}}),
    "PluginLogs": _object({
        "path": _STRING,
        "lines": {"type": "array", "maxItems": RING_LINES, "items": _object({
            "time": _ISO_TIME, "level": _STRING, "request_id": _STRING, "message": _STRING})},
    }),
    "PluginStats": _object({
        "path": _STRING,
        "invocations": _COUNT,
        "outcomes": _object({outcome: _COUNT for outcome in OUTCOMES}),
        "duration_ms": _object({"p50": _NUMBER_OR_NULL, "p99": _NUMBER_OR_NULL, "samples": _COUNT}),
        "last_error": {"oneOf": [{"type": "null"}, _object({
            "time": _ISO_TIME, "outcome": {"enum": list(OUTCOMES)}, "message": _STRING})]},
        "version": _object({"sha256": _SHA256, "deployed_at": _ISO_TIME}),
    }),
}

# The error answers, each with the headers it carries besides X-Request-Id.
OPENAPI_ERRORS = {
    400: ("bad input", {}),
    401: ("missing or invalid bearer token (unknown, revoked or expired key)", {"WWW-Authenticate": "Bearer"}),
    403: ("the API key lacks the route's scope or database, or the route needs the admin token", {}),
    404: ("not found", {}),
    405: ("method not allowed on this path", {"Allow": "the methods the path takes"}),
    409: ("conflict", {}),
    413: ("the body is over its size limit", {}),
    500: ("internal error", {}),
    503: ("storage unavailable, no memory left, or too many large requests at once: retry",
          {"Retry-After": "seconds to wait, when a retry may succeed soon"}),
    507: ("the database is over its quota (--max-db-size)", {}),
}

# Where a route's path names a parameter, this says what it is.
_SEGMENT = {"type": "string", "pattern": r"^(?!_)(?!\.\.?$)[A-Za-z0-9._-]{1,128}$",
            "description": "1-128 letters, digits, '-', '_' or '.', not starting with '_' and not '.' or '..'"}
PATH_PARAMETERS = {
    "db": ("the database", _SEGMENT),
    "schema": ("the plugin's schema", _SEGMENT),
    "table": ("the plugin's table", _SEGMENT),
    "function": ("the function name, passed to the plugin as metadata.function_name (and name)", _SEGMENT),
    "name": ("the plugin's name on today's AeorDB routes: the plugin at <default db>/plugins/<name>",
             {"type": "string", "pattern": r"^(?![._])[A-Za-z0-9._-]{1,128}$",
              "description": "1-128 letters, digits, '-', '_' or '.', not starting with '.' or '_'"}),
    "path": ("the file's path inside the database; it may contain '/' (a/b/c.json), sent unescaped. "
             "Ending in '/' it names a directory", {"type": "string", "maxLength": 1024}),
    "key_id": ("the API key's id", {"type": "string"}),
}

_ANY_BYTES = {"*/*": {"schema": {}}}

# What each route means, by the name of the Api method serving it. "errors" are
# the route's own; 401/403 (routes that need a credential) and 500 are added to
# every route they apply to.
def _free_text_parameters(description: str) -> list:
    return [{"name": name, "in": "query", "required": False, "schema": {"type": "string", "maxLength": 128},
             "description": description} for name in ("version", "author")]


_MODULE_BODY = {"required": True, "description": "the module's bytes (WebAssembly binary format)",
                "content": {"application/wasm": {"schema": {}}, **_ANY_BYTES}}
_INVOKE_BODY = {"required": False, "description": "any bytes, passed to the plugin", "content": _ANY_BYTES}
_PLUGIN_ANSWER = {"200": {"description": "the plugin's answer (its own status when it sets one)", "content": _ANY_BYTES}}
_INVOKE_FAILED = "the invocation failed (a trap, its time or memory limit, a bad answer): the reason"

ROUTE_DOCS = {
    # -- system
    "health": {
        "tag": "system", "summary": "Health check (no credential)",
        "responses": {"200": _json("the server is up", _object({"status": {"const": "ok"},
                                                               "engine": {"type": "string"}}))},
    },
    "openapi": {
        "tag": "system", "summary": "This document (no credential)",
        "responses": {"200": _json("the OpenAPI 3.1 description of every route",
                                   {"type": "object", "required": ["openapi", "info", "paths"]})},
    },
    "metrics": {
        "tag": "observing", "summary": "Prometheus metrics (text exposition format 0.0.4)",
        "responses": {"200": {"description": "the metrics", "content": {
            "text/plain": {"schema": {"type": "string"}}}}},
    },
    # -- keys
    "create_key": {
        "tag": "keys", "summary": "Create an API key (admin token only)",
        "requestBody": {"required": True, **_json("the key's name, scopes, databases and expiry",
                                                  _schema("KeySpec"))},
        "responses": {"201": _json("the key, with its secret shown this once", _schema("CreatedKey"))},
        "errors": {400: "a bad name, scope, database or expiry, or not a JSON object", 413: None, 503: None},
    },
    "list_keys": {
        "tag": "keys", "summary": "List the API keys (never their secrets; admin token only)",
        "responses": {"200": _json("the keys", {"type": "array", "items": _schema("Key")})},
    },
    "revoke_key": {
        "tag": "keys", "summary": "Revoke an API key at once (admin token only)",
        "responses": {"200": _json("revoked", _object({"revoked": {"const": True}, "id": _STRING}))},
        "errors": {404: "no such key", 503: None},
    },
    # -- files and queries
    "get_file": {
        "tag": "files", "summary": "Read a file, or list a directory",
        "description": "A file answers its bytes with their Content-Type, ETag and Last-Modified; a "
                       "directory (the database's root, or a path ending in '/') answers a listing. "
                       "HEAD answers the same headers without the body.",
        "parameters": [{"name": "If-None-Match", "in": "header", "required": False,
                        "schema": {"type": "string"}, "description": "an ETag, or '*': 304 when it matches"}],
        "responses": {
            "200": {"description": "the file's bytes (with its own Content-Type), or a directory's listing",
                    "headers": {"ETag": {"schema": _STRING}, "Last-Modified": {"schema": _STRING}},
                    "content": {"application/json": {"schema": {"anyOf": [
                        _schema("DirectoryListing"), {"description": "a stored file that is JSON"}]}},
                                "*/*": {"schema": {"description": "the stored bytes"}}}},
            "304": {"description": "not modified (If-None-Match matched)",
                    "headers": {"ETag": {"schema": _STRING}, "Last-Modified": {"schema": _STRING}}},
        },
        "errors": {400: "a bad database name or path, or a file's path ending in '/'",
                   404: "no such file or directory", 503: None},
    },
    "put_file": {
        "tag": "files", "summary": "Store a file (created or replaced)",
        "description": "Stores the body with the request's Content-Type (guessed from the path when absent). "
                       "A file whose bytes are one JSON object can be queried.",
        "requestBody": {"required": True, "description": "the file's bytes", "content": _ANY_BYTES},
        "responses": {"201": _json("created", _schema("FileMeta")), "200": _json("replaced", _schema("FileMeta"))},
        "errors": {400: "a bad database name, path or content type", 409: "a file is in the way, or the path "
                   "is a directory", 413: None, 503: None, 507: None},
    },
    "delete_file": {
        "tag": "files", "summary": "Delete a file",
        "responses": {"200": _json("deleted", _object({"deleted": {"const": True}, "path": _STRING}))},
        "errors": {400: None, 404: "no such file", 503: None},
    },
    "query": {
        "tag": "files", "summary": "Query or aggregate the JSON documents of a directory",
        "requestBody": {"required": True, **_json("a query, or with 'aggregate' an aggregate", _schema("Query"))},
        "responses": {"200": _json("the matching documents, or the aggregate", {"anyOf": [
            _schema("QueryAnswer"), _schema("AggregateAnswer")]})},
        "errors": {400: "a bad query (unknown operator, too many conditions, over its time limit...)",
                   413: None, 503: None},
    },
    # -- plugins
    "deploy": {
        "tag": "plugins", "summary": "Deploy a plugin (replacing the one there)",
        "description": "The module is compiled and its imports and exports checked before anything is "
                       "written; its start function does not run.",
        "parameters": [
            {"name": "name", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 128},
             "description": "the plugin's name; defaults to the table"},
            {"name": "plugin_type", "in": "query", "required": False,
             "schema": {"enum": ["wasm"], "default": "wasm"}},
            *_free_text_parameters("free text, kept in the plugin's metadata"),
        ],
        "requestBody": _MODULE_BODY,
        "responses": {"200": _json("deployed", _schema("PluginMeta"))},
        "errors": {400: "empty body, not a module, an unsupported plugin_type, a missing handle export or "
                        "memory, or imports the server does not provide", 413: None,
                   503: "no memory left to compile it, or storage unavailable: retry"},
    },
    "invoke": {
        "tag": "plugins", "summary": "Invoke a plugin",
        "description": "Runs the plugin's handle with the request envelope (the body, and metadata such as "
                       "the function name, query string, content type and request id). The plugin's answer "
                       "is sent as it gave it: its status, headers and content type.",
        "requestBody": _INVOKE_BODY,
        "responses": _PLUGIN_ANSWER,
        "errors": {400: None, 404: "no plugin deployed there", 413: None,
                   500: _INVOKE_FAILED,
                   503: None},
    },
    "list_plugins": {
        "tag": "plugins", "summary": "List a database's plugins",
        "responses": {"200": _json("the plugins", {"type": "array", "items": _schema("PluginMeta")})},
        "errors": {400: None},
    },
    "remove": {
        "tag": "plugins", "summary": "Remove a plugin",
        "responses": {"200": _json("removed", _object({"removed": {"const": True}, "path": _STRING}))},
        "errors": {400: None, 404: "no plugin deployed there", 503: None},
    },
    # -- today's AeorDB plugin routes (in the default database)
    "today_deploy": {
        "tag": "plugins", "summary": "Deploy a plugin by name, as today's AeorDB (replacing the one there)",
        "description": "The plugin at <default db>/plugins/{name}: checked, stored and served as a seed-era "
                       "deploy there. A redeploy keeps plugin_id and created_at.",
        "parameters": [
            {"name": "name", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 128},
             "description": "the display name; defaults to {name}"},
            {"name": "plugin_type", "in": "query", "required": False,
             "schema": {"enum": ["wasm", "native", "rule"], "default": "wasm"},
             "description": "only wasm plugins run here: native and rule are a 400"},
            *_free_text_parameters("free text; null when not given"),
        ],
        "requestBody": _MODULE_BODY,
        "responses": {"200": _json("deployed", _schema("TodayPluginMeta"))},
        "errors": {400: "a bad name, plugin_type, an empty body or an invalid plugin", 413: None,
                   503: "no memory left to compile it, or storage unavailable: retry"},
    },
    "today_invoke": {
        "tag": "plugins", "summary": "Invoke a plugin by name, as today's AeorDB",
        "description": "As the seed's invoke, with the envelope's metadata name={name}, path=/plugins/{name}, "
                       "plugin_path={name} and function_name={name}; host functions reach the default "
                       "database's files.",
        "requestBody": _INVOKE_BODY,
        "responses": _PLUGIN_ANSWER,
        "errors": {400: None, 404: "Plugin not found: {name}", 413: None,
                   500: _INVOKE_FAILED,
                   503: None},
    },
    "today_list": {
        "tag": "plugins", "summary": "List the default database's plugins, as today's AeorDB",
        "responses": {"200": _json("the plugins, sorted by path", _object({
            "items": {"type": "array", "items": _schema("TodayPluginMeta")}}))},
    },
    "today_remove": {
        "tag": "plugins", "summary": "Remove a plugin by name, as today's AeorDB",
        "responses": {"200": _json("removed", _object({"removed": {"const": True}, "path": _STRING}))},
        "errors": {400: None, 404: "Plugin not found: {name}", 503: None},
    },
    "plugin_logs": {
        "tag": "observing", "summary": "A plugin's recent log lines, newest last",
        "parameters": [{"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": RING_LINES, "default": 100}}],
        "responses": {"200": _json("the lines", _schema("PluginLogs"))},
        "errors": {400: None, 404: "no plugin deployed there"},
    },
    "plugin_stats": {
        "tag": "observing", "summary": "A plugin's invocation statistics",
        "responses": {"200": _json("the statistics", _schema("PluginStats"))},
        "errors": {400: None, 404: "no plugin deployed there"},
    },
}

_RULE_PARAMETER = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z_]*(?::(?:\\.|[^\\>])*)?)?>")
_REQUEST_ID_HEADER = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}


def openapi_path(rule: str) -> tuple:
    """A bottle rule as an OpenAPI path and its parameter names: '/<db>/_files/<path:path>'
    is '/{db}/_files/{path}' (OpenAPI has no wildcard: PATH_PARAMETERS says '/' is allowed)."""
    names = _RULE_PARAMETER.findall(rule)
    path = _RULE_PARAMETER.sub(lambda match: "{" + match.group(1) + "}", rule)
    if "<" in path or ">" in path or "" in names:
        raise ValueError(f"route {rule!r}: only named <name> or <name:filter> wildcards can be described")
    return path, names


def _error_response(status: int, description: Optional[str]) -> dict:
    """An error answer: the shared one, or its route's own description of it."""
    response = {"$ref": f"#/components/responses/Error{status}"}
    if description:
        response["description"] = description   # 3.1: a reference may override its description
    return response


def _operation(route: bottle.Route, doc: dict, path_names: list, operation_id: str) -> dict:
    scope = route.config.get("scope")
    if scope not in (None, "admin", *SCOPES):
        raise ValueError(f"route {route.method} {route.rule}: unknown scope {scope!r}")
    responses = {}
    for status, response in doc["responses"].items():   # new dicts: ROUTE_DOCS stays as written
        response = {**response, "headers": {**response.get("headers", {}), **_REQUEST_ID_HEADER}}
        if route.method == "HEAD":
            response.pop("content", None)
        responses[status] = response
    errors = dict(doc.get("errors", {}))
    if scope is not None:
        errors.setdefault(401, None)
        errors.setdefault(403, None)
    errors.setdefault(500, None)
    for status in sorted(errors):
        responses[str(status)] = _error_response(status, errors[status])
    parameters = [{"name": name, "in": "path", "required": True, "description": PATH_PARAMETERS[name][0],
                   "schema": PATH_PARAMETERS[name][1]} for name in path_names]
    operation = {
        "operationId": operation_id,
        "tags": [doc["tag"]],
        "summary": doc["summary"] + (" (headers only)" if route.method == "HEAD" else ""),
        "parameters": parameters + doc.get("parameters", []),
        "responses": responses,
        # 3.1 lets a bearer requirement name the role it needs: the route's scope.
        "security": [] if scope is None else [{"bearer": [scope]}],
        "x-aeordb-scope": scope,
    }
    if "description" in doc:
        operation["description"] = doc["description"]
    if "requestBody" in doc and route.method not in ("GET", "HEAD", "DELETE"):
        operation["requestBody"] = doc["requestBody"]
    return operation


def openapi_document(app: bottle.Bottle) -> dict:
    """The OpenAPI 3.1 document of ``app``'s routes, each described by ROUTE_DOCS.

    Raises LookupError for a route whose method ROUTE_DOCS does not describe, or
    a path parameter PATH_PARAMETERS does not: an undescribed route is a bug.
    The document shares the tables' dicts (it is only serialized): do not change it.
    """
    paths: dict = {}
    operation_ids: set = set()
    for route in app.routes:
        name = getattr(route.callback, "__name__", repr(route.callback))
        doc = ROUTE_DOCS.get(name)
        if doc is None:
            raise LookupError(f"route {route.method} {route.rule} (callback {name!r}) has no entry in "
                              "ROUTE_DOCS: describe it there")
        path, names = openapi_path(route.rule)
        undescribed = [parameter for parameter in names if parameter not in PATH_PARAMETERS]
        if undescribed:
            raise LookupError(f"route {route.rule}: describe the parameter(s) {', '.join(undescribed)} "
                              "in PATH_PARAMETERS")
        method = route.method.lower()
        if method in paths.get(path, {}):
            raise ValueError(f"two routes for {route.method} {path}")
        base = name + ("_head" if route.method == "HEAD" else "")
        operation_id, number = base, 1
        while operation_id in operation_ids:   # one method serving several routes (get_file)
            number += 1
            operation_id = f"{base}_{number}"
        operation_ids.add(operation_id)
        paths.setdefault(path, {})[method] = _operation(route, doc, names, operation_id)
    responses = {}
    for status, (description, headers) in OPENAPI_ERRORS.items():
        responses[f"Error{status}"] = {
            "description": description,
            "headers": {**_REQUEST_ID_HEADER, **{header: {"description": text, "schema": _STRING}
                                                 for header, text in headers.items()}},
            "content": {"application/json": {"schema": _schema("Error")}},
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aeordb.py",
            "version": __version__,
            "description": (
                "WebAssembly plugins and per-database file trees over HTTP. Every route but the public ones "
                "needs 'Authorization: Bearer <credential>': the admin token, or an API key (aeo_...) that has "
                "the route's scope (x-aeordb-scope; 'admin' routes take the token only) in the route's "
                "database. Every error is JSON {\"error\": \"...\"}. Every answer carries X-Request-Id. "
                "HEAD works wherever GET does. A wrong method on a known path is a 405 with Allow; an "
                "unknown path is a 404."),
            "license": {"name": "see LICENSE", "identifier": "MIT"},
        },
        "paths": paths,
        "components": {
            "schemas": OPENAPI_SCHEMAS,
            "responses": responses,
            "headers": {"X-Request-Id": {
                "description": "the request's id (the client's own X-Request-Id when it is 1-64 letters, "
                               "digits or ._:-), named in every log line about the request",
                "schema": _STRING}},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "the admin token, or an API key made with POST /_keys (also a bearer token)"}},
        },
        "security": [{"bearer": []}],
        "tags": [{"name": name} for name in ("system", "keys", "files", "plugins", "observing")],
    }


###############################################################################
# HTTP routes ##################################################################
###############################################################################
#
# ``Api`` holds the app's registry, file store and runtime; each route is one
# of its methods, mounted by ``Api.mount`` with bottle's ``app.route(...,
# callback=...)``. ``ApiPlugin`` wraps every route: token check, ApiError and
# dict/list results to JSON. ``App`` is bottle's app with a lean dispatch in
# front of its router for the invoke routes, running the same ApiPlugin steps
# and the same invocation. ``create_app`` only wires these together.

def _json_response(payload: Any, status: int = 200, headers: Optional[dict] = None) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(payload), status=status,
                               headers={"Content-Type": "application/json", **(headers or {})})


_STATUS_LINES = {code: f"{code} {reason}" for code, reason in bottle.HTTP_CODES.items()}
_NO_BODY = (204, 304)   # the statuses bottle sends without a body (a plugin's are 200-599)


def wsgi_answer(answer: PluginAnswer, request_id: str) -> tuple:
    """(status line, headers, body) for WSGI: what bottle writes for the response Api.invoke sets.

    As bottle does: header names title-cased, a plugin's names differing in
    case grouped under one, X-Request-Id ours, Content-Length last; the
    headers bottle drops on 204 and 304 dropped, and no body; values as
    WSGI's latin-1 strings of their UTF-8 bytes (PEP 3333).
    """
    grouped: dict = {}
    for name, value in answer.headers.items():
        grouped.setdefault(name.title().replace("_", "-"), []).append(value)
    grouped["Content-Type"] = [answer.content_type]
    grouped["X-Request-Id"] = [request_id]
    grouped["Content-Length"] = [str(len(answer.body))]
    dropped = bottle.BaseResponse.bad_headers.get(answer.status, ())
    headers = [(name, value if value.isascii() else value.encode("utf-8").decode("latin-1"))
               for name, values in grouped.items() if name not in dropped for value in values]
    line = _STATUS_LINES.get(answer.status) or f"{answer.status} Unknown"
    return line, headers, [] if answer.status in _NO_BODY else [answer.body]


def wsgi_error(error: bottle.HTTPResponse) -> tuple:
    """(status line, headers, body) for WSGI of a JSON error answer, from bottle's own response object."""
    body = error.body.encode("utf-8")
    error.set_header("Content-Length", str(len(body)))
    return error.status_line, error.headerlist, [body]


LARGE_BODY = 1 * MiB   # bodies and answers from this size on count against the memory budget


class MemoryBudget:
    """Bytes of large request bodies and plugin answers being worked on at once.

    Each such byte costs several in memory (the envelope, the guest's copy,
    the answer), so their sum is bounded: past the budget a request is
    refused with 503 at once, and peak memory stays predictable.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size: int, what: str, refuse: bool = True) -> None:
        """Count ``size`` bytes against the budget until the request ends (ApiPlugin gives them back)."""
        if size < LARGE_BODY:
            return
        environ = bottle.request.environ
        own = environ.get("aeordb.reserved", 0)
        with self._lock:
            # One request alone always goes through.
            if refuse and self.used > own and self.used + size > self.capacity:
                raise ApiError(503, f"too many large requests at once: the {what} of {size} bytes does "
                                    f"not fit the memory budget of {self.capacity} bytes (--memory-budget): "
                                    "retry", RETRY_SOON)
            self.used += size
        environ["aeordb.reserved"] = own + size

    def release(self, environ: dict) -> None:
        reserved = environ.pop("aeordb.reserved", 0)
        if reserved:
            with self._lock:
                self.used -= reserved
            release_free_memory()


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")   # a client's X-Request-Id we keep


def _new_request_prefix() -> None:
    """A fresh prefix for this process's request ids (again in a forked child, so ids stay unique)."""
    global _request_prefix
    _request_prefix = f"{secrets.token_hex(3)}{os.getpid():x}-"


_new_request_prefix()
_request_numbers = itertools.count(1)
os.register_at_fork(after_in_child=_new_request_prefix)


def make_request_id(environ: dict) -> str:
    """The request's id: the client's X-Request-Id when it is sane, else a new one."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return _request_prefix + str(next(_request_numbers))


class ApiPlugin:
    """Bottle plugin around every route: credentials and scopes, request ids, ApiError and dict/list
    results to JSON, the memory budget given back, and the request counted.

    It replaces bottle's JSONPlugin: one wrapper per request instead of two.
    A route's ``scope`` config says what a credential needs (None: public),
    and its ``db`` config the database of a route that names none in its path.
    ``lean`` runs the same steps around an invoke route served by App.
    """

    name = "aeordb-api"
    api = 2

    def __init__(self, token: str, keys: KeyStore, access_log: bool, budget: MemoryBudget, activity: Activity):
        self.token = token.encode("ascii")
        self.keys = keys
        self.access_log = access_log
        self.budget = budget
        self.activity = activity
        self._refused, self._refused_logged = 0, 0.0

    def authenticate(self, header: str) -> Optional[Principal]:
        """Who an Authorization header speaks for (the scheme is case-insensitive, RFC 7235), or None."""
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        if hmac.compare_digest(credentials.encode("utf-8", "surrogateescape"), self.token):
            return ADMIN
        if credentials.startswith(KEY_PREFIX):
            return self.keys.find(credentials)
        return None

    def refused(self, environ: dict) -> None:
        """Log refused credentials at INFO, at most one line a second (a flood cannot fill the disk)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:
            log.info("refused %d request(s) without a valid credential (last: %s %s from %s)", self._refused,
                     environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), environ.get("REMOTE_ADDR", "?"))
            self._refused, self._refused_logged = 0, now

    # -- the steps of every request, on bottle's routes and on App's lean ones --

    def begin(self, environ: dict) -> tuple:
        """(when the request started, its id): the id goes into the environ for the routes and the log."""
        started = time.perf_counter() if self.access_log else 0.0
        request_id = environ["aeordb.request_id"] = make_request_id(environ)
        return started, request_id

    def admit(self, environ: dict, scope: Optional[str], db: Optional[str]) -> None:
        """ApiError 401 or 403 unless the request's credential may use a route of ``scope`` on ``db``."""
        if scope is None:
            return
        principal = self.authenticate(environ.get("HTTP_AUTHORIZATION", ""))
        if principal is None:
            self.refused(environ)
            raise ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": 'Bearer realm="aeordb"'})
        refusal = principal.refusal(scope, db)
        if refusal:
            raise ApiError(403, refusal)
        environ["aeordb.principal"] = principal

    def error_response(self, error: Exception, request_id: str) -> bottle.HTTPResponse:
        """The JSON answer for an error a route raised (called where it was caught)."""
        if isinstance(error, ApiError):
            return _json_response({"error": error.message}, error.status, error.headers)
        log.exception("unexpected error on %s %s (request=%s)", bottle.request.method, bottle.request.path,
                      request_id)
        if is_storage_fault(error):
            return _json_response({"error": storage_error("serving", error).message}, 503)
        return _json_response({"error": f"internal error: {type(error).__name__}"}, 500)

    def finish(self, environ: dict, rule: str, status: int, started: float, request_id: str) -> None:
        """The memory budget given back, the request counted and (with --access-log) logged."""
        self.budget.release(environ)
        self.activity.http(rule, status)
        if self.access_log:
            log.info("%s %s %s %.1fms request=%s", bottle.request.method, bottle.request.path, status,
                     (time.perf_counter() - started) * 1000, request_id)

    # -- around bottle's routes and App's lean ones ----------------------------

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        scope, route_db = route.config.get("scope"), route.config.get("db")
        rule = route.rule

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            environ = bottle.request.environ
            started, request_id = self.begin(environ)
            try:
                self.admit(environ, scope, kwargs.get("db", route_db))
                result = callback(*args, **kwargs)
                if isinstance(result, (dict, list)):
                    result = _json_response(result)
            except bottle.HTTPResponse:
                self.budget.release(environ)
                raise
            except Exception as exc:
                result = self.error_response(exc, request_id)
            status = getattr(result, "status_code", None) or bottle.response.status_code
            (result if isinstance(result, bottle.HTTPResponse) else bottle.response).set_header(
                "X-Request-Id", request_id)
            self.finish(environ, rule, status, started, request_id)
            return result
        return wrapper

    def lean(self, route: bottle.Route, answer: Callable[..., PluginAnswer]) -> Callable[[dict, dict], tuple]:
        """``wrapper``'s steps for ``route`` served by App: a handler of (environ, the URL's arguments)
        answering (status line, headers, body) for WSGI, ``answer(**arguments)`` being the route's work."""
        scope, route_db = route.config.get("scope"), route.config.get("db")
        rule = route.rule

        def handler(environ: dict, arguments: dict) -> tuple:
            started, request_id = self.begin(environ)
            try:
                self.admit(environ, scope, arguments.get("db", route_db))
                result = answer(**arguments)
                status = result.status
                line, headers, body = wsgi_answer(result, request_id)
            except Exception as exc:   # no bottle.HTTPResponse: only a body without a Content-Length raises one
                error = self.error_response(exc, request_id)
                error.set_header("X-Request-Id", request_id)
                status = error.status_code
                line, headers, body = wsgi_error(error)
            self.finish(environ, rule, status, started, request_id)
            return line, headers, body
        return handler


def read_body(limit: int, what: str, budget: MemoryBudget) -> bytes:
    """The request body, refused with 413 (or 503, over the memory budget) before anything is read."""
    request = bottle.request
    length = request.content_length
    if length > limit:
        raise ApiError(413, f"{what} of {length} bytes exceeds the limit of {limit} bytes")
    budget.reserve(length, what)
    if length < 0:
        data = request.body.read(limit + 1)
        budget.reserve(len(data), what)
    else:
        data = request.environ["wsgi.input"].read(length) if length else b""
    if len(data) > limit:
        raise ApiError(413, f"{what} exceeds the limit of {limit} bytes")
    return data


def read_json_body(limit: int, budget: MemoryBudget) -> Any:
    try:
        return load_json(read_body(limit, "request body", budget) or b"null")
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def json_error_page(error: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, wrong method) as JSON, like every other error."""
    bottle.response.content_type = "application/json"
    bottle.response.set_header("X-Request-Id", make_request_id(bottle.request.environ))
    message = {404: "no such route", 405: f"method {bottle.request.method} not allowed"}.get(
        error.status_code, error.body if isinstance(error.body, str) else error.status_line)
    return json.dumps({"error": message})


def refuse_invalid_utf8_path() -> None:
    """Before routing: bottle routes on the path with invalid UTF-8 bytes
    silently dropped ('/a%FFb' would reach '/ab')."""
    raw_path = bottle.request.environ.get("bottle.raw_path", "")
    if raw_path.isascii():
        return
    with contextlib.suppress(UnicodeEncodeError):
        try:
            raw_path.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise _json_response({"error": "request path is not valid UTF-8"}, 400) from None


class Api:
    """The HTTP API: one method per route, grouped by resource (system, files and queries, plugins)."""

    PUBLIC_ROUTES = ("/_health", "/_openapi.json")   # the routes served without a credential

    def __init__(self, settings: Settings, registry: PluginRegistry, files: FileStore, runtime: WasmRuntime,
                 budget: MemoryBudget, keys: KeyStore, activity: Activity):
        self.settings = settings
        self.registry = registry
        self.files = files
        self.runtime = runtime
        self.budget = budget
        self.keys = keys
        self.activity = activity
        self.app: Optional[bottle.Bottle] = None   # set by mount; the OpenAPI document reads its routes
        try:
            check_segments(settings.default_db)
        except ApiError as exc:
            raise StartupError(f"--default-db / AEORDB_DEFAULT_DB: {exc.message}") from None

    def mount(self, app: bottle.Bottle) -> None:
        """Every route with the scope a credential needs for it, in matching order: the file
        routes come before the plugin routes, since '/db/_files/a/b/_deploy' is a file path.
        Today's AeorDB plugin routes name no database: theirs is --default-db."""
        self.app = app
        files = ("/<db>/_files", "/<db>/_files/", "/<db>/_files/<path:path>")
        routes = [
            ("GET", "/_health", self.health, None),
            ("GET", "/_openapi.json", self.openapi, None),
            ("GET", "/_metrics", self.metrics, "metrics"),
            ("POST", "/_keys", self.create_key, "admin"),
            ("GET", "/_keys", self.list_keys, "admin"),
            ("DELETE", "/_keys/<key_id>", self.revoke_key, "admin"),
            *((["GET", "HEAD"], route, self.get_file, "read") for route in files),
            ("PUT", "/<db>/_files/<path:path>", self.put_file, "write"),
            ("DELETE", "/<db>/_files/<path:path>", self.delete_file, "write"),
            ("POST", "/<db>/_query", self.query, "read"),
            ("PUT", "/<db>/<schema>/<table>/_deploy", self.deploy, "deploy"),
            ("POST", "/<db>/<schema>/<table>/<function>/_invoke", self.invoke, "invoke"),
            ("GET", "/<db>/_plugins", self.list_plugins, "deploy"),
            ("DELETE", "/<db>/<schema>/<table>/<function>/_remove", self.remove, "deploy"),
            ("GET", "/<db>/<schema>/<table>/_logs", self.plugin_logs, "metrics"),
            ("GET", "/<db>/<schema>/<table>/_stats", self.plugin_stats, "metrics"),
        ]
        for method, route, callback, scope in routes:
            assert (scope is None) == (route in self.PUBLIC_ROUTES), route
            app.route(route, method, callback, scope=scope)
        today = [
            ("PUT", "/plugins/<name>", self.today_deploy, "deploy"),
            ("POST", "/plugins/<name>/invoke", self.today_invoke, "invoke"),
            ("GET", "/plugins", self.today_list, "deploy"),
            ("DELETE", "/plugins/<name>", self.today_remove, "deploy"),
        ]
        for method, route, callback, scope in today:
            app.route(route, method, callback, scope=scope, db=self.settings.default_db)

    def lean_routes(self) -> dict:
        """The invoke routes App also serves before bottle's router: each POST route's rule, and
        what answers it from the URL's arguments (finds the plugin, then ``call_plugin``)."""
        return {"/<db>/<schema>/<table>/<function>/_invoke": self.invoke_answer,
                "/plugins/<name>/invoke": self.today_invoke_answer}

    @staticmethod
    def actor() -> str:
        """Who the request acts for, for the audit log (never a secret)."""
        principal = bottle.request.environ.get("aeordb.principal")
        return principal.name if principal else "-"

    def audit(self, message: str, *args: Any) -> None:
        """One audit line: what was done, by whom, in which request."""
        log.info("audit: " + message + " by=%s request=%s", *args, self.actor(),
                 bottle.request.environ["aeordb.request_id"])

    # -- keys --------------------------------------------------------------------

    def create_key(self) -> bottle.HTTPResponse:
        spec = read_json_body(self.settings.max_request_size, self.budget)
        if not isinstance(spec, dict):
            raise ApiError(400, "send {\"name\", \"scopes\": [...], \"databases\": [...], \"expires_at\"?}")
        created = self.keys.create(spec.get("name"), spec.get("scopes"), spec.get("databases"), spec.get("expires_at"))
        self.audit("key created: id=%s name=%r scopes=%s databases=%s", created["id"], created["name"],
                   ",".join(created["scopes"]), ",".join(created["databases"]))
        return _json_response(created, 201)

    def list_keys(self) -> list:
        return self.keys.list()

    def revoke_key(self, key_id: str) -> dict:
        revoked = self.keys.revoke(key_id)
        self.audit("key revoked: id=%s name=%r", key_id, revoked["name"])
        return {"revoked": True, "id": key_id}

    # -- observing plugins -------------------------------------------------------

    def metrics(self) -> bottle.HTTPResponse:
        visible = bottle.request.environ["aeordb.principal"].databases   # None: every database
        stored = {} if self.files.unavailable else self.files.stored_bytes()
        gauges = {**process_gauges(), "engine": self.runtime.wasm.mode,
                  "databases": {db: size for db, size in stored.items() if visible is None or db in visible}}
        metas = [meta for meta in self.registry.list_all()
                 if visible is None or meta["path"].split("/", 1)[0] in visible]
        created = {meta["path"]: meta["created_at"] for meta in metas}
        return bottle.HTTPResponse(self.activity.view(created).prometheus(gauges, list(created)), status=200,
                                   headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def plugin_logs(self, db: str, schema: str, table: str) -> dict:
        check_segments(db, schema, table)
        plugin = self.registry.get(f"{db}/{schema}/{table}")
        text = bottle.request.query.get("limit", "100")
        if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) > RING_LINES:
            raise ApiError(400, f"limit must be a whole number from 0 to {RING_LINES}")
        return {"path": plugin.key, "lines": self.activity.view({plugin.key: plugin.meta["created_at"]}).logs(plugin.key, int(text))}

    def plugin_stats(self, db: str, schema: str, table: str) -> dict:
        check_segments(db, schema, table)
        plugin = self.registry.get(f"{db}/{schema}/{table}")
        return {"path": plugin.key, **self.activity.view({plugin.key: plugin.meta["created_at"]}).stats(plugin.key),
                "version": {"sha256": plugin.meta["sha256"], "deployed_at": plugin.meta["deployed_at"]}}

    # -- system ------------------------------------------------------------------

    def health(self) -> dict:
        return {"status": "ok", "engine": self.runtime.wasm.mode}

    def openapi(self) -> dict:
        """This API's OpenAPI document, made from the app's own routes (see ROUTE_DOCS)."""
        return openapi_document(self.app)

    # -- files and queries -------------------------------------------------------

    def get_file(self, db: str, path: str = "") -> Any:
        check_segments(db)
        target = normalize_file_path("/" + path, allow_root=True)
        if target == "/" or path.endswith("/") or self.files.is_directory(db, target):
            return {"path": target, "entries": self.files.list_directory(db, target)}
        data, meta = self.files.read(db, target)
        etag = f'"{meta["etag"]}"'
        headers = {"Content-Type": meta["content_type"], "ETag": etag,
                   "Last-Modified": email.utils.formatdate(meta["updated_at"] / 1000, usegmt=True)}
        if_none_match = bottle.request.get_header("If-None-Match", "")
        if etag in if_none_match or if_none_match.strip() == "*":   # '*': any current version
            return bottle.HTTPResponse(status=304, headers=headers)
        return bottle.HTTPResponse(data, status=200, headers=headers)

    def put_file(self, db: str, path: str) -> bottle.HTTPResponse:
        check_segments(db)
        if path.endswith("/"):   # GET answers such a path with a listing: it names a directory
            raise ApiError(400, f"cannot store a file at a directory path ending in '/': /{path}")
        target = normalize_file_path("/" + path)
        data = read_body(self.settings.max_file_size, "file", self.budget)
        meta, created = self.files.write(db, target, data, bottle.request.get_header("Content-Type"))
        return _json_response(meta, 201 if created else 200)

    def delete_file(self, db: str, path: str) -> dict:
        check_segments(db)
        target = normalize_file_path("/" + path)
        self.files.delete(db, target)
        return {"deleted": True, "path": target}

    def query(self, db: str) -> dict:
        check_segments(db)
        spec = read_json_body(self.settings.max_request_size, self.budget)
        limit = self.settings.query_timeout or self.settings.timeout
        self.files.set_deadline(time.monotonic() + limit)
        try:
            if isinstance(spec, dict) and "aggregate" in spec:
                return self.files.aggregate(db, spec)
            return self.files.query(db, spec)
        except TimeLimitReached:
            raise ApiError(400, f"query stopped at its time limit of {limit:g} s: narrow it "
                                "(fewer conditions, a smaller directory, a smaller limit)") from None
        finally:
            self.files.set_deadline(None)

    # -- plugins -----------------------------------------------------------------

    def deploy(self, db: str, schema: str, table: str) -> dict:
        check_segments(db, schema, table)
        name, plugin_type, version, author = self._deploy_options(default_name=table)
        if plugin_type != "wasm":
            raise ApiError(400, f"unsupported plugin_type {plugin_type!r}: only 'wasm'")
        wasm_bytes = read_body(self.settings.max_module_size, "module", self.budget)
        if not wasm_bytes:
            raise ApiError(400, "empty body: send the module's bytes")
        return self._deploy(db, schema, table, wasm_bytes, name, plugin_type, version, author)

    @staticmethod
    def _deploy_options(default_name: str) -> tuple:
        """(name, plugin_type, version, author) from a deploy's query string, as both eras take it."""
        query = bottle.request.query
        for key in ("name", "plugin_type", "version", "author"):
            if key in query and query.getunicode(key) is None:   # bottle answers None for bad UTF-8
                raise ApiError(400, f"{key} is not valid UTF-8")
        name = query.getunicode("name") or default_name
        plugin_type = query.getunicode("plugin_type") or "wasm"
        version = query.getunicode("version") or None
        author = query.getunicode("author") or None
        for what, value in (("name", name), ("version", version or "v"), ("author", author or "a")):
            if len(value) > 128 or any(ord(ch) < 32 for ch in value):
                raise ApiError(400, f"{what} must be 1-128 printable characters")
        return name, plugin_type, version, author

    def _deploy(self, db: str, schema: str, table: str, wasm_bytes: bytes, *options: Optional[str]) -> dict:
        started = time.perf_counter()
        meta = self.registry.deploy(db, schema, table, wasm_bytes, *options)
        self.activity.deployed(meta["path"], time.perf_counter() - started)
        self.audit("deployed %s sha256=%s size=%d", meta["path"], meta["sha256"], meta["size"])
        return meta

    def invoke(self, db: str, schema: str, table: str, function: str) -> bytes:
        return self.respond(self.invoke_answer(db, schema, table, function))

    @staticmethod
    def respond(answer: PluginAnswer) -> bytes:
        """A plugin's answer as bottle's response: set on it, and the bytes returned (an
        HTTPResponse would be built, then copied onto the response twice)."""
        response = bottle.response
        response.status = answer.status
        for name, value in answer.headers.items():
            response.add_header(name, value)   # 'X-A' and 'x-a' both go out, as the plugin said
        response.content_type = answer.content_type
        return answer.body

    def invoke_answer(self, db: str, schema: str, table: str, function: str) -> PluginAnswer:
        """The answer of the plugin /db/schema/table/function/_invoke names (on either path)."""
        check_segments(db, schema, table, function)
        plugin = self.registry.get(f"{db}/{schema}/{table}")
        return self.call_plugin(plugin, db, {"name": function, "function_name": function,
                                             "path": f"/{db}/{schema}/{table}/{function}", "plugin_path": plugin.key})

    def call_plugin(self, plugin: Plugin, db: str, route_metadata: dict) -> PluginAnswer:
        """The one invocation of every invoke route (both eras', on bottle's route or App's lean
        one): the request's body and the envelope's metadata (the route's, then the request's) to
        the plugin; its answer (a raw one as 200) counted."""
        body = read_body(self.settings.max_request_size, "request body", self.budget)
        environ = bottle.request.environ
        metadata = {**route_metadata, "method": environ["REQUEST_METHOD"],
                    "query_string": environ.get("QUERY_STRING", ""),
                    "content_type": environ.get("CONTENT_TYPE", ""), "request_id": environ["aeordb.request_id"]}
        invocation = Invocation(db=db, plugin_key=plugin.key, metadata=metadata,
                                deadline=time.monotonic() + self.settings.timeout)
        answer, raw = self.runtime.invoke(plugin, body, invocation)
        # Counted, never refused: the invocation's writes are committed, and a
        # 503 would invite a retry that repeats them.
        self.budget.reserve(len(raw), "plugin's answer", refuse=False)
        return answer or PluginAnswer(200, DEFAULT_CONTENT_TYPE, {}, raw)

    def list_plugins(self, db: str) -> list:
        check_segments(db)
        return self.registry.list(db)

    def remove(self, db: str, schema: str, table: str, function: str) -> dict:
        check_segments(db, schema, table, function)
        self._remove(db, schema, table)
        return {"removed": True, "path": f"{db}/{schema}/{table}"}

    def _remove(self, db: str, schema: str, table: str) -> None:
        self.registry.remove(db, schema, table)
        self.activity.removed(f"{db}/{schema}/{table}")
        self.audit("removed %s/%s/%s", db, schema, table)

    # -- today's AeorDB plugin routes ----------------------------------------------
    # /plugins/{name} is the plugin at key "<default db>/plugins/<name>" (see
    # PluginRegistry): the seed routes' checks, limits and guarantees, with
    # today's answers and messages.

    @contextlib.contextmanager
    def _today_plugin(self, name: str) -> Iterator[None]:
        """A missing plugin said as today's AeorDB says it."""
        try:
            yield
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise ApiError(404, f"Plugin not found: {name}") from None

    def today_deploy(self, name: str) -> dict:
        check_plugin_name(name)
        display_name, plugin_type, version, author = self._deploy_options(default_name=name)
        if plugin_type not in ("wasm", "native", "rule"):
            raise ApiError(400, f"Invalid plugin type: unknown plugin type: {plugin_type}")
        if plugin_type != "wasm":
            raise ApiError(400, f"Invalid plugin type: only wasm plugins run here, not {plugin_type}")
        wasm_bytes = read_body(self.settings.max_module_size, "module", self.budget)
        if not wasm_bytes:
            raise ApiError(400, "Plugin body must not be empty")
        try:
            meta = self._deploy(self.settings.default_db, DEFAULT_DB_PLUGINS, name, wasm_bytes,
                                display_name, plugin_type, version, author)
        except ApiError as exc:
            if exc.status != 400:
                raise
            raise ApiError(400, f"Invalid plugin: {exc.message}") from None
        return today_meta(meta, self.settings.default_db)

    def today_invoke(self, name: str) -> bytes:
        return self.respond(self.today_invoke_answer(name))

    def today_invoke_answer(self, name: str) -> PluginAnswer:
        """The answer of the plugin /plugins/{name}/invoke names (on either path)."""
        check_plugin_name(name)
        with self._today_plugin(name):
            plugin = self.registry.get(f"{self.settings.default_db}/{DEFAULT_DB_PLUGINS}/{name}")
        return self.call_plugin(plugin, self.settings.default_db, {"name": name, "function_name": name,
                                                                   "path": f"/plugins/{name}", "plugin_path": name})

    def today_list(self) -> dict:
        default_db = self.settings.default_db
        return {"items": sorted((today_meta(meta, default_db) for meta in self.registry.list(default_db)),
                                key=lambda meta: meta["path"])}

    def today_remove(self, name: str) -> dict:
        check_plugin_name(name)
        with self._today_plugin(name):
            self._remove(self.settings.default_db, DEFAULT_DB_PLUGINS, name)
        return {"removed": True, "path": name}


class App(bottle.Bottle):
    """bottle's app, whose invoke routes are dispatched before bottle's router.

    bottle's routing, hooks and response object are a large share of an
    invocation's cost. For a POST on a lean route (a precompiled pattern of
    its rule), ``__call__`` runs the handler ApiPlugin.lean made for it: the
    same steps as bottle's route around the same work (``Api.call_plugin``),
    the answer written as bottle would. Everything else goes to bottle, and
    so do the requests a lean route leaves to it: a path that is not ASCII
    (bottle's UTF-8 check and the segment validation answer it), a body
    without a Content-Length (bottle reads it). bottle's hooks do not run on
    a lean route: refuse_invalid_utf8_path needs no run on an ASCII path, and
    a new hook must be added to ApiPlugin's steps to reach both paths.
    ``wsgi`` is bottle's own dispatch, lean routes included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lean_routes: list = []   # (pattern, handler(environ, arguments) -> (status line, headers, body))

    def add_lean_route(self, rule: str, handler: Callable[[dict, dict], tuple]) -> None:
        # bottle's default wildcard: one or more characters other than '/'
        pattern = "".join(f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("<") else re.escape(part)
                          for part in re.split(r"(<\w+>)", rule) if part)
        self.lean_routes.append((re.compile(pattern), handler))

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        path = environ.get("PATH_INFO", "")
        if (environ["REQUEST_METHOD"] == "POST" and path.isascii()
                and environ.get("CONTENT_LENGTH", "").isdecimal()):
            for pattern, handler in self.lean_routes:
                match = pattern.fullmatch(path)
                if match:
                    bottle.request.bind(environ)   # the shared steps read the request through bottle's
                    line, headers, body = handler(environ, match.groupdict())
                    start_response(line, headers)
                    return body
        return self.wsgi(environ, start_response)


def create_app(settings: Optional[Settings] = None) -> bottle.Bottle:
    """The WSGI application for ``settings``: isolated state, nothing shared but the engine."""
    settings = settings or Settings()
    prepare_data_dir(settings.data_dir)
    token, token_created = load_or_create_token(settings)
    wasm = Wasm.shared(settings.memory_limit, settings.table_limit, mode=settings.engine,
                       fast=settings.fast_calls, slots=pool_slots(settings.threads))
    files = FileStore(settings)
    activity = Activity()
    runtime = WasmRuntime(settings, files, wasm, activity)
    registry = PluginRegistry(settings, wasm, runtime.new_linker)
    registry.forgotten = activity.forget
    keys = KeyStore(settings.data_dir)
    tune_malloc()
    budget = MemoryBudget(settings.memory_budget)

    app = App()
    app.config.update({"aeordb.settings": settings, "aeordb.token": token,
                       "aeordb.token_created": token_created, "aeordb.registry": registry,
                       "aeordb.files": files, "aeordb.runtime": runtime, "aeordb.budget": budget,
                       "aeordb.keys": keys, "aeordb.activity": activity})
    api_plugin = ApiPlugin(token, keys, settings.access_log, budget, activity)
    # What a server may check from a request's head alone, before reading its body.
    app.config["aeordb.authorize"] = lambda route, authorization: (
        route in Api.PUBLIC_ROUTES or api_plugin.authenticate(authorization) is not None)
    app.uninstall(bottle.JSONPlugin)
    app.install(api_plugin)
    app.default_error_handler = json_error_page
    app.add_hook("before_request", refuse_invalid_utf8_path)
    api = Api(settings, registry, files, runtime, budget, keys, activity)
    api.mount(app)
    for rule, answer in api.lean_routes().items():
        route = next(route for route in app.routes if route.rule == rule and route.method == "POST")
        app.add_lean_route(rule, api_plugin.lean(route, answer))
    return app


###############################################################################
# Serving ######################################################################
###############################################################################
#
# The listening socket is bound before anything else happens, so a port in
# use is a one-line start-up error and no token is printed for a server that
# never listened. SIGTERM and SIGINT stop the server cleanly: no new
# connections, the requests in flight finish (within the invocation time limit
# and a grace period), the WAL is folded into the database file, exit status 0.
#
# waitress reads a request's whole head and body before the app sees it, and
# writes some errors itself. So the server's connections are guarded where
# waitress parses (GuardedParser, GuardedChannel): a request head must arrive
# within --header-timeout; a request without a valid token is answered 401 as
# soon as its head is read, its body never read; and the errors waitress
# writes are JSON like every other.

SHUTDOWN_GRACE = 5.0   # seconds a stop waits for requests beyond the invocation time limit
SHUTDOWN_SETTLE = 0.2  # seconds a stop reads from its connections before it judges them idle
GUARD_INTERVAL = 0.5   # seconds between checks of the connections' head deadlines
CROWDED = 0.9          # share of --connection-limit from which slow connections are shed first
FILES_BESIDE_CONNECTIONS = 64   # descriptors the server needs besides one per connection
SEND_BUFFER = 64 * KiB   # bytes of an answer waitress buffers before a worker thread sends them itself


def bind_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; StartupError when that cannot be.

    ``reuse_port``: one of a group of sockets on the same port (SO_REUSEPORT),
    among which the kernel spreads incoming connections.
    """
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {where}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(address)
    except OSError as exc:
        listener.close()
        hint = {errno.EADDRINUSE: " (is another server running on that port?)",
                errno.EADDRNOTAVAIL: " (no network interface has that address)",
                errno.EACCES: " (ports below 1024 need privileges)"}.get(exc.errno, "")
        raise StartupError(f"cannot listen on {where}: {exc.strerror}{hint}") from None
    return listener


def bind_listeners(host: str, port: int, count: int) -> list:
    """Sockets for ``count`` worker processes on (host, port): one each where the system
    has SO_REUSEPORT, so that the kernel spreads connections evenly (a single shared
    socket tends to hand them all to one worker), else one socket they all share.

    A plain socket is bound first: it fails like a single server would when the
    port is taken (sockets with SO_REUSEPORT would join another server's group
    instead), and it picks the port when ``port`` is 0.
    """
    shared = bind_listener(host, port)
    if count == 1:
        return [shared]
    if not reuse_port_available():
        log.info("SO_REUSEPORT is not available: the %d workers share one listening socket", count)
        return [shared]
    port = shared.getsockname()[1]
    shared.close()
    listeners: list = []
    try:
        for _ in range(count):
            listeners.append(bind_listener(host, port, reuse_port=True))
    except StartupError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def reuse_port_available() -> bool:
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except (AttributeError, OSError):   # AttributeError: the platform has no SO_REUSEPORT
        return False
    return True


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), as ``--workers auto`` counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # pragma: no cover - not Linux
        return os.cpu_count() or 1


def fit_open_files(connections: int) -> int:
    """The connection limit the process's open-file limit allows: raised to fit where it may, else lowered."""
    import resource
    needed = connections + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard) if hard != resource.RLIM_INFINITY
                                                        else needed, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - FILES_BESIDE_CONNECTIONS)
        log.warning("the open-file limit (%d) allows %d connections, not %d: raise it (ulimit -n)",
                    soft, fitted, connections)
        return fitted
    return connections


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach (gc.freeze).

    What a server holds when it starts serving (modules, the app, waitress)
    lives as long as the process: frozen, it is not walked again by every
    collection a request's garbage sets off (README, Performance), and in a
    parent about to fork, its pages stay shared with the workers instead of
    being copied when a worker's collector touches them.
    """
    gc.collect()   # what is garbage already is freed, not kept for ever
    gc.freeze()


def _waitress_parts() -> tuple:
    import waitress.channel
    import waitress.parser
    import waitress.server
    import waitress.task
    import waitress.utilities
    return waitress.channel, waitress.parser, waitress.server, waitress.task, waitress.utilities


class Server:
    """waitress serving ``app`` on a bound socket, with guarded connections, until SIGTERM or SIGINT."""

    def __init__(self, app: bottle.Bottle, settings: Settings, listener: socket.socket):
        channel, parser, server, task, utilities = _waitress_parts()
        self.app = app
        self.settings = settings
        self.connection_limit = fit_open_files(settings.connection_limit)
        authorize = app.config["aeordb.authorize"]

        class Unauthorized(utilities.Error):
            code, reason = 401, "Unauthorized"

        class GuardedParser(parser.HTTPRequestParser):
            """waitress's parser, which refuses a request without a valid token once its head is read."""

            def __init__(self, adj: Any):
                super().__init__(adj)
                self.started = time.monotonic()

            def parse_header(self, header_plus: bytes) -> None:
                super().parse_header(header_plus)
                if not authorize(self.path, self.headers.get("AUTHORIZATION", "")):
                    # Answer now; the body is never read (the connection closes after the 401).
                    self.error = Unauthorized("missing or invalid bearer token")
                    self.body_rcv, self.content_length, self.chunked = None, 0, False
                    self.expect_continue = False
                    self.completed = True

        class JsonErrorTask(task.ErrorTask):
            """The errors waitress writes itself, as ``{"error": ...}`` like every other."""

            def execute(self) -> None:
                error = self.request.error
                body = json.dumps({"error": f"{error.reason}: {error.body}" if error.code != 401
                                   else error.body}).encode()
                self.status = f"{error.code} {error.reason}"
                self.response_headers.append(("Content-Type", "application/json"))
                self.response_headers.append(("X-Request-Id", make_request_id({})))
                if error.code == 401:
                    self.response_headers.append(("WWW-Authenticate", 'Bearer realm="aeordb"'))
                self.set_close_on_finish()
                self.content_length = len(body)
                self.write(body)

        class GuardedChannel(channel.HTTPChannel):
            parser_class = GuardedParser
            error_task_class = JsonErrorTask

            def service(self) -> None:
                super().service()
                # With a pipelined request behind this one, waitress would keep this answer
                # until SEND_BUFFER bytes wait (see below): send it now, unless the next one
                # is being written (its task sends both then).
                if self.requests and self.total_outbufs_len:
                    self._flush_exception(self._flush_some_if_lockable, do_close=False)

        self.waitress = server.create_server(
            app, sockets=[listener], threads=settings.threads, ident="aeordb.py",
            asyncore_use_poll=True,   # select() cannot watch descriptors past 1023
            max_request_body_size=settings.max_body_size, connection_limit=self.connection_limit,
            channel_timeout=max(1, int(settings.idle_timeout)),
            cleanup_interval=max(1, int(settings.idle_timeout / 4)))
        self.waitress.channel_class = GuardedChannel
        # waitress sends each piece of an answer (head, then body) from the worker thread as
        # it is written: two sends, each a hand-off of the GIL under load (README,
        # Performance). Buffered, an answer goes out in one send from the serving loop, which
        # wakes for the finished request anyway. Where waitress has no such knob, as it sends.
        if hasattr(self.waitress.adj, "send_bytes"):
            self.waitress.adj.send_bytes = SEND_BUFFER
        app.config["aeordb.activity"].busy_workers = lambda: self.waitress.task_dispatcher.active_count
        self._stopping = threading.Event()

    def stop(self, *_: Any) -> None:
        """Begin a clean stop (also a signal handler): the serving loop wakes and drains."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.waitress.pull_trigger()

    def run(self) -> None:
        """Serve until stopped. On the main thread the server owns the process: it takes
        SIGTERM and SIGINT, and freezes the heap (see ``freeze_heap``); both are given back at the end."""
        server = self.waitress
        previous = {}
        owns_process = threading.current_thread() is threading.main_thread()
        if owns_process:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self.stop)
            freeze_heap()
        loop = functools.partial(server.asyncore.loop, map=server._map,
                                 use_poll=server.adj.asyncore_use_poll, count=1)
        next_guard = 0.0
        while not self._stopping.is_set():
            loop(timeout=GUARD_INTERVAL)
            now = time.monotonic()
            if now >= next_guard:
                next_guard = now + GUARD_INTERVAL
                self._drop_slow_heads(now)
        for dispatcher in list(server._map.values()):   # stop accepting, keep the connections
            if isinstance(dispatcher, _waitress_parts()[2].BaseWSGIServer):
                dispatcher.del_channel()
                dispatcher.socket.close()
        log.info("stopping: letting requests in flight finish")
        now = time.monotonic()
        deadline, settled = now + self.settings.timeout + SHUTDOWN_GRACE, now + SHUTDOWN_SETTLE
        # What connections sent before the stop is in flight too: read for a moment before judging.
        while (time.monotonic() < settled or self._busy()) and time.monotonic() < deadline:
            loop(timeout=0.05)
            self._drop_slow_heads(time.monotonic())
        for signum, handler in previous.items():   # before the trigger's descriptor is closed and reused
            signal.signal(signum, handler)
        if owns_process:
            gc.unfreeze()
        server.task_dispatcher.shutdown(timeout=1)
        server.asyncore.close_all(server._map)
        self.app.config["aeordb.files"].checkpoint()
        self.app.config["aeordb.activity"].stop_sharing()
        log.info("stopped")

    def _drop_slow_heads(self, now: float) -> None:
        """Close connections whose request head has not arrived within --header-timeout.

        waitress has no such deadline: a client sending a byte a second would
        hold its connection for ever, and enough of them every connection.
        Near the connection limit the deadline shrinks: connections waiting on
        a head or idle for longer than a second are closed, oldest first, so
        new clients are accepted instead of waiting for slow ones.
        """
        channels = list(self.waitress.active_channels.values())
        # waitress counts its own listener and trigger against the limit too.
        crowded = len(self.waitress._map) >= CROWDED * self.connection_limit
        limit = min(self.settings.header_timeout, 1.0) if crowded else self.settings.header_timeout
        stalled = []
        for channel in channels:
            if channel.requests:
                continue
            request = channel.request
            if request is not None and not request.headers_finished:
                waited = now - request.started
            elif request is None and crowded:   # idle between keep-alive requests
                waited = time.time() - channel.last_activity
            else:
                continue
            if waited > limit:
                stalled.append((waited, channel))
        if crowded:   # down to three quarters of the limit at most
            excess = len(self.waitress._map) - int(0.75 * self.connection_limit)
            stalled = sorted(stalled, key=lambda item: -item[0])[:max(0, excess)]
        for _, channel in stalled:
            channel.will_close = True
            channel.handle_close()

    def _busy(self) -> bool:
        """Whether a request is being received, waits for or holds a worker, or has output unsent."""
        tasks = self.waitress.task_dispatcher
        return bool(tasks.active_count or tasks.queue or any(
            channel.request is not None or channel.requests or channel.total_outbufs_len
            for channel in list(self.waitress.active_channels.values())))


_prctl = _libc_function("prctl")
PR_SET_PDEATHSIG = 1   # <sys/prctl.h>


class Workers:
    """The parent of ``count`` worker processes, each serving ``app_factory()`` on its socket.

    Each worker builds its app, engine and epoch ticker after the fork: a
    ticker thread does not survive one. The parent starts no thread. It keeps
    the sockets open, so the connections pending on a dead worker's socket
    wait for its replacement instead of being reset; a worker that keeps dying
    soon after starting is replaced later and later, and meanwhile its socket
    is closed (new connections go to the others) and bound again for the
    replacement. A worker of the first start that could not start (status 2)
    stops them all. SIGTERM or SIGINT reaches every worker, which stops
    cleanly; the parent waits for them (exit status 1 if it had to kill one).

    The workers share what they observe in ACTIVITY_DIR/<parent pid>/: the
    parent makes it, removes a dead worker's snapshot, and removes it at the end.
    """

    QUICK_DEATH = 1.0     # seconds: a worker that dies sooner is restarted after a growing delay
    MAX_RESTART_DELAY = 10.0

    def __init__(self, settings: Settings, listeners: list, count: int, app_factory: Callable[[], bottle.Bottle]):
        self.settings = settings
        self.listeners = listeners    # one per worker, or one they share
        self.address = listeners[0].getsockname()[:2]
        self.count = count
        self.app_factory = app_factory
        self.running: dict = {}       # pid: (worker number, start time)
        self.restarts: dict = {}      # worker number: monotonic time of its restart
        self.restarted: set = set()   # numbers started more than once
        self.quick_deaths = 0
        self.stopping: Optional[float] = None   # the deadline of a stop once one began
        self.status = 0
        self.parent = os.getpid()
        self.activity = settings.data_dir / "activity" / str(self.parent)

    def run(self) -> int:
        """Start the workers and supervise them until they stopped; answers the exit status."""
        self._fresh_activity_folder()
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        handlers = {signum: signal.signal(signum, self.stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)   # wakes the select below
        freeze_heap()   # before the first fork
        try:
            for number in range(1, self.count + 1):
                if self.stopping is None:
                    self._start(number, wake_read, wake_write)
            while self.running or (self.restarts and self.stopping is None):
                self._reap()
                now = time.monotonic()
                for number, at in list(self.restarts.items()):
                    if at <= now and self.stopping is None:
                        del self.restarts[number]
                        self.restarted.add(number)
                        self._start(number, wake_read, wake_write)
                if self.stopping is not None and now > self.stopping:
                    for pid in self.running:
                        log.warning("worker (pid %d) did not stop in time: killing it", pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.stopping, self.status = math.inf, self.status or 1
                waits = [at - now for at in self.restarts.values()]
                if self.stopping is not None:
                    waits.append(0.05)
                with contextlib.suppress(InterruptedError):
                    select.select([wake_read], [], [], max(0.0, min(waits, default=GUARD_INTERVAL)))
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 4096)
        finally:
            signal.set_wakeup_fd(-1)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            for fd in (wake_read, wake_write):
                os.close(fd)
            self._close_listeners()
            shutil.rmtree(self.activity, ignore_errors=True)
        log.info("stopped")
        return self.status

    def _fresh_activity_folder(self) -> None:
        """This run's folder, empty; those of servers no longer running go (a pid may come again)."""
        with contextlib.suppress(OSError):
            for folder in self.activity.parent.iterdir():
                if folder.name.isdigit() and (folder == self.activity or not process_alive(int(folder.name))):
                    shutil.rmtree(folder, ignore_errors=True)
        make_dirs(self.activity)

    def stop(self, *_: Any) -> None:
        """Begin a stop (also the signal handler): every worker is asked to stop cleanly."""
        if self.stopping is None:
            self.stopping = time.monotonic() + self.settings.timeout + SHUTDOWN_GRACE + 5.0
            log.info("stopping %d worker(s)", len(self.running))
            for pid in self.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()

    def _listener(self, number: int) -> socket.socket:
        """Worker ``number``'s socket, bound again if it was closed while the worker was down."""
        if len(self.listeners) == 1:
            return self.listeners[0]
        listener = self.listeners[number - 1]
        if listener.fileno() == -1:
            listener = self.listeners[number - 1] = bind_listener(*self.address, reuse_port=True)
        return listener

    def _start(self, number: int, wake_read: int, wake_write: int) -> None:
        try:
            listener = self._listener(number)
        except StartupError as exc:
            self._retry(number, f"cannot bind its socket again ({exc})")
            return
        # Signals wait until the new worker is known: a stop must reach it too.
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            try:
                pid = os.fork()
            except OSError as exc:   # a process limit, or no memory: the others go on serving
                self.quick_deaths += 1
                self._retry(number, f"could not be started ({exc.strerror or exc})")
                return
            if pid == 0:
                status = 1
                try:
                    signal.set_wakeup_fd(-1)
                    for signum in blocked:
                        signal.signal(signum, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
                    os.close(wake_read)
                    os.close(wake_write)
                    status = self._serve(number, listener)
                except BaseException:   # a worker never returns into the parent's code
                    log.exception("worker %d failed", number)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(status)
            self.running[pid] = (number, time.monotonic())
            log.info("worker %d started (pid %d)", number, pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)

    def _serve(self, number: int, listener: socket.socket) -> int:
        if _prctl is not None:   # Linux: a worker never outlives its parent (SIGKILLed, say)
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != self.parent:   # it died before that took effect
                return 0
        for other in self.listeners:
            if other is not listener:
                other.close()
        try:
            app = self.app_factory()
            server = Server(app, self.settings, listener)
        except (StartupError, OSError) as exc:
            print(f"aeordb.py: worker {number} cannot start: {exc}", file=sys.stderr)
            return 2
        app.config["aeordb.activity"].share(self.activity)
        server.run()
        return 0

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.running.clear()
                return
            if pid == 0:
                return
            number, started = self.running.pop(pid, (None, 0.0))
            with contextlib.suppress(OSError):
                (self.activity / f"{pid}.json").unlink()   # what it counted leaves the sum
            if number is None or self.stopping is not None:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            if code == 2 and number not in self.restarted:
                log.error("worker %d (pid %d) could not start: stopping", number, pid)
                self.status = 2
                self.stop()
                continue
            lived = time.monotonic() - started
            self.quick_deaths = self.quick_deaths + 1 if lived < self.QUICK_DEATH else 0
            self._retry(number, f"(pid {pid}) {how} after {lived:.1f} s")

    def _retry(self, number: int, what: str) -> None:
        """Start worker ``number`` again: at once, or later while workers keep failing quickly
        (its socket closed meanwhile, so that new connections go to the others)."""
        delay = min(self.MAX_RESTART_DELAY, 0.1 * 2 ** self.quick_deaths) if self.quick_deaths else 0.0
        if delay and len(self.listeners) > 1:
            self.listeners[number - 1].close()
        log.warning("worker %d %s; starting another%s", number, what, f" in {delay:.1f} s" if delay else "")
        self.restarts[number] = time.monotonic() + delay


###############################################################################
# Command line #################################################################
###############################################################################
#
# ``python aeordb.py [serve] [options]`` serves. The other commands are the
# operator's tools in the same file: a client of a running server (deploy,
# invoke, list, remove, logs, stats, keys), and offline ones (check, token,
# backup, restore). Exit status: 0 success, 1 the server answered an error
# (its message printed), 2 a usage or connection error (one line).

class CommandError(Exception):
    """A command failed: its message is printed as one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def configure_logging(level: str, process_ids: bool = False) -> None:
    """``process_ids``: each line names its process, as the workers of one server log together."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s"
                        + ("[%(process)d]" if process_ids else "") + ": %(message)s")
    # Under load waitress warns "Task queue depth is N" on every request.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def serve(argv: list) -> int:
    """Serve until stopped; answers the exit status (2: it could not start, one line on stderr says why)."""
    settings = parse_settings(argv)
    workers = settings.workers or usable_cores()
    configure_logging(settings.log_level, process_ids=workers > 1)
    listeners: list = []
    try:
        listeners = bind_listeners(settings.host, settings.port, workers)
        if workers == 1:
            app = create_app(settings)
            server = Server(app, settings, listeners[0])
            token, token_created = app.config["aeordb.token"], app.config["aeordb.token_created"]
            engine = app.config["aeordb.runtime"].wasm.mode
        else:   # the workers build their apps; the parent settles what they must agree on
            prepare_data_dir(settings.data_dir)
            token, token_created = load_or_create_token(settings)
            engine = Wasm.choose_mode(settings.engine, settings.memory_limit, settings.table_limit,
                                      pool_slots(settings.threads))
    except (StartupError, OSError) as exc:
        for listener in listeners:
            listener.close()
        print(f"aeordb.py: cannot start: {exc}", file=sys.stderr)
        return 2
    plugins = len(plugin_metadata_files(settings.data_dir / "plugins"))
    if token_created:
        # Printed on purpose, once, on the start that created it: the operator needs it.
        token_line = f"new token: {token} (kept in {settings.data_dir / 'token'})"
    elif settings.token:
        token_line = "token:     as configured (--token / AEORDB_TOKEN)"
    else:
        token_line = f"token:     in {settings.data_dir / 'token'}"
    sockets = "a socket each" if len(listeners) > 1 else "one shared socket"
    print(f"aeordb.py {__version__} listening on http://{settings.host}:{listeners[0].getsockname()[1]}\n"
          f"  data dir:  {settings.data_dir} ({plugins} plugin(s))\n"
          f"  engine:    {engine}\n"
          + (f"  workers:   {workers} processes ({sockets})\n" if workers > 1 else "")
          + f"  {token_line}", flush=True)
    if workers == 1:
        server.run()
        return 0
    return Workers(settings, listeners, workers, lambda: create_app(settings)).run()


class Client:
    """A client of a running server's HTTP API (urllib, standard library only)."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.token = token

    def request(self, method: str, route: str, body: Optional[bytes] = None,
                headers: Optional[dict] = None) -> tuple:
        """(status, headers, body) of one request; CommandError(2) when the server cannot be reached."""
        import http.client
        import urllib.error
        import urllib.request
        try:
            request = urllib.request.Request(self.url + route, data=body, method=method,
                                             headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as answer:
            return answer.code, dict(answer.headers), answer.read()
        except (urllib.error.URLError, OSError) as exc:
            raise CommandError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
        except http.client.HTTPException as exc:
            raise CommandError(f"{self.url} did not answer as an HTTP server: {exc!r}") from None
        except (ValueError, UnicodeError) as exc:   # a URL or token that cannot go into a request
            raise CommandError(f"cannot send the request: {exc}") from None

    def json(self, method: str, route: str, body: Optional[bytes] = None) -> Any:
        """The JSON answer of a request; CommandError(1) with the server's message for an error."""
        status, _, data = self.request(method, route, body)
        try:
            answer = load_json(data)
        except ValueError:
            answer = {"error": data[:200].decode("utf-8", "replace")}
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise CommandError(f"{status}: {message or data[:200].decode('utf-8', 'replace')}", status=1)
        return answer


def _plugin_route(text: str, parts: int) -> str:
    """``db/schema/table`` (or ``/function``) checked as URL segments, as a route prefix."""
    segments = text.strip("/").split("/")
    if len(segments) != parts:
        raise CommandError(f"expected {'/'.join(['DB', 'SCHEMA', 'TABLE', 'FUNCTION'][:parts])}, got {text!r}")
    try:
        check_segments(*segments)
    except ApiError as exc:
        raise CommandError(exc.message) from None
    return "/" + "/".join(segments)


def _token_file_text(data_dir: Path, strict: bool) -> str:
    token_file = data_dir / "token"
    try:
        mode = token_file.stat().st_mode & 0o777
        text = token_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"no token: cannot read {token_file} ({exc}); pass --token or AEORDB_TOKEN") from None
    if strict and mode & 0o077:
        raise CommandError(f"{token_file} is readable by others (mode {mode:o}): run chmod 600 on it first")
    return text


def _client(args: argparse.Namespace) -> Client:
    token = args.token or os.environ.get("AEORDB_TOKEN") or _token_file_text(args.data_dir, strict=False)
    return Client(args.url, token)


def _print(args: argparse.Namespace, answer: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(answer, indent=2) if args.json else human(answer))


def command_deploy(args: argparse.Namespace) -> int:
    route = _plugin_route(args.plugin, 3)
    try:
        module = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    query = urllib_parse.urlencode({key: value for key, value in (("name", args.name), ("version", args.version))
                                    if value})
    meta = _client(args).json("PUT", f"{route}/_deploy" + (f"?{query}" if query else ""), module)
    _print(args, meta, lambda m: f"deployed {m['path']} ({m['name']}), {m['size']} bytes, sha256 {m['sha256'][:16]}")
    return 0


def command_invoke(args: argparse.Namespace) -> int:
    route = _plugin_route(args.function, 4)
    if args.data_file == "-" or args.stdin:
        body = sys.stdin.buffer.read()
    elif args.data_file:
        try:
            body = Path(args.data_file).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {args.data_file}: {exc.strerror}") from None
    else:
        body = (args.data or "").encode()
    status, headers, data = _client(args).request("POST", f"{route}/_invoke", body,
                                                  {"Content-Type": args.content_type})
    if args.verbose:
        print(f"HTTP {status}", file=sys.stderr)
        for name, value in headers.items():
            print(f"{name}: {value}", file=sys.stderr)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    if status >= 400:
        try:
            message = load_json(data).get("error")
        except (ValueError, AttributeError):
            message = None
        if message:
            print(f"aeordb.py: {status}: {message}", file=sys.stderr)
        return 1
    return 0


def command_list(args: argparse.Namespace) -> int:
    check_db = _plugin_route(args.db, 1)
    plugins = _client(args).json("GET", f"{check_db}/_plugins")
    _print(args, plugins, lambda ps: "\n".join(f"{p['path']}\t{p['name']}\t{p['deployed_at']}\t{p['sha256'][:16]}"
                                               for p in ps) or "no plugins")
    return 0


def command_remove(args: argparse.Namespace) -> int:
    route = _plugin_route(args.plugin, 3)
    answer = _client(args).json("DELETE", f"{route}/plugin/_remove")
    _print(args, answer, lambda a: f"removed {a['path']}")
    return 0


def _log_text(line: dict) -> str:
    return f"{line['time']} {line['level']:<7} {line['request_id']}  {line['message']}"


def command_logs(args: argparse.Namespace) -> int:
    route = _plugin_route(args.plugin, 3)
    limit = args.limit
    if not 0 <= limit <= RING_LINES:
        raise CommandError(f"--limit must be from 0 to {RING_LINES}")
    client = _client(args)
    seen: list = []
    while True:
        lines = client.json("GET", f"{route}/_logs?limit={RING_LINES if args.follow else limit}")["lines"]
        # The ring only grows at its end: print what follows the last line already printed.
        start = 0
        if seen:
            for index in range(len(lines) - 1, -1, -1):
                if lines[index] == seen[-1]:
                    start = index + 1
                    break
        for line in lines[start:]:
            print(json.dumps(line) if args.json else _log_text(line), flush=True)
        seen = lines or seen
        if not args.follow:
            return 0
        try:
            time.sleep(1.0)   # the polling interval of --follow
        except KeyboardInterrupt:   # how --follow is meant to end
            return 0


def command_stats(args: argparse.Namespace) -> int:
    route = _plugin_route(args.plugin, 3)
    stats = _client(args).json("GET", f"{route}/_stats")

    def human(s: dict) -> str:
        outcomes = ", ".join(f"{name} {count}" for name, count in s["outcomes"].items() if count)
        error = s["last_error"]
        return (f"{s['path']}: {s['invocations']} invocation(s) ({outcomes or 'none'}), "
                f"p50 {s['duration_ms']['p50']} ms, p99 {s['duration_ms']['p99']} ms; version "
                f"{s['version']['sha256'][:16]} deployed {s['version']['deployed_at']}"
                + (f"\nlast error at {error['time']}: {error['message']}" if error else ""))
    _print(args, stats, human)
    return 0


def command_keys(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "create":
        if not args.name or not args.scopes:
            raise CommandError("keys create needs --name and --scopes")
        spec = {"name": args.name, "scopes": args.scopes.split(","), "databases": args.databases.split(","),
                "expires_at": args.expires_at}
        key = client.json("POST", "/_keys", json.dumps(spec).encode())
        _print(args, key, lambda k: f"{k['id']} {k['name']}: {','.join(k['scopes'])} on {','.join(k['databases'])}"
                                    f"\nkey (shown once): {k['key']}")
    elif args.action == "list":
        keys = client.json("GET", "/_keys")
        _print(args, keys, lambda ks: "\n".join(
            f"{k['id']}\t{k['name']}\t{','.join(k['scopes'])}\t{','.join(k['databases'])}\t"
            f"expires {k['expires_at'] or 'never'}" for k in ks) or "no keys")
    else:
        if not args.id:
            raise CommandError("keys revoke needs the key's id")
        answer = client.json("DELETE", f"/_keys/{urllib_parse.quote(args.id, safe='')}")
        _print(args, answer, lambda a: f"revoked {a['id']}")
    return 0


def command_check(args: argparse.Namespace) -> int:
    """Validate a module offline exactly as a deploy would, and say what it is."""
    try:
        module_bytes = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    logging.getLogger("aeordb").setLevel(logging.WARNING)
    settings = dataclasses.replace(parse_settings(args.serve_options, environ={}), token="c" * MIN_TOKEN_LENGTH)
    with tempfile.TemporaryDirectory(prefix="aeordb-check-") as scratch:
        app = create_app(dataclasses.replace(settings, data_dir=Path(scratch)))
        try:
            module, shape = app.config["aeordb.registry"].check(module_bytes)
        except ApiError as exc:
            raise CommandError(f"refused: {exc.message}", status=1) from None
    report = {
        "file": args.file, "size": len(module_bytes), "sha256": hashlib.sha256(module_bytes).hexdigest(),
        "entry": shape.entry, "exports_alloc": shape.has_alloc, "wasi_reactor": shape.initialize,
        "imports_wasi": shape.wasi, "imports_env_memory": shape.imports_memory, "may_write_files": shape.writes_files,
        "imports": [{"name": f"{item.module}.{item.name}", "type": _describe(item.type)} for item in module.imports],
        "exports": [{"name": item.name, "type": _describe(item.type)} for item in module.exports],
        "limits": {"memory": settings.memory_limit, "table": settings.table_limit},
    }

    def human(r: dict) -> str:
        lines = [f"{r['file']}: a valid plugin ({r['size']} bytes, sha256 {r['sha256'][:16]})",
                 f"  entry point: {r['entry']}" + (" (raw bodies: aeordb.py only)" if r["entry"] == "handle_raw" else
                                                   " (the AeorDB envelope)"),
                 f"  alloc: {'exported' if r['exports_alloc'] else 'not exported (answers are written at offset 0)'}",
                 f"  WASI: {'imported (sealed sandbox)' if r['imports_wasi'] else 'not imported'}"
                 + ("; a reactor (_initialize runs first)" if r["wasi_reactor"] else ""),
                 f"  writes files: {'may' if r['may_write_files'] else 'no'} (its invocations "
                 f"{'are' if r['may_write_files'] else 'need not be'} transactions)",
                 f"  fits the limits: memory {r['limits']['memory'] // MiB} MiB, table {r['limits']['table']} elements",
                 "  imports:"] + [f"    {i['name']}: {i['type']}" for i in r["imports"]] + (
                 ["    (none)"] if not r["imports"] else [])
        return "\n".join(lines)
    _print(args, report, human)
    return 0


def command_token(args: argparse.Namespace) -> int:
    print(_token_file_text(args.data_dir, strict=True))
    return 0


BACKUP_FILES = ("token", "keys.json")   # besides the database and plugins/; the compiled cache is rebuilt


@contextlib.contextmanager
def failures_as_command_errors(what: str) -> Iterator[None]:
    """A backup or restore that fails on the file system, the archive or the database: one line, exit 2."""
    import tarfile
    try:
        yield
    except (OSError, tarfile.TarError, sqlite3.Error, StartupError) as exc:
        raise CommandError(f"{what} failed: {exc}") from None


def command_backup(args: argparse.Namespace) -> int:
    """A consistent snapshot of a (running) server's data dir into a directory or a .tar.gz."""
    source, destination = args.data_dir, Path(args.destination)
    database = source / DATABASE_NAME
    if not database.exists():
        raise CommandError(f"{source} holds no {DATABASE_NAME}: is --data-dir right?")
    with failures_as_command_errors("backup"):
        plugins = _backup(source, destination, progress=not args.json)
    summary = {"backup": str(destination), "plugins": plugins, "database_bytes": database.stat().st_size}
    _print(args, summary, lambda s: f"backed up {source} to {s['backup']}: the database and {s['plugins']} plugin(s)")
    return 0


def _backup(source: Path, destination: Path, progress: bool) -> int:
    database = source / DATABASE_NAME
    archive = destination.name.endswith((".tar.gz", ".tgz"))
    with tempfile.TemporaryDirectory(prefix="aeordb-backup-", dir=destination.parent if archive else None) as work:
        target = Path(work) if archive else destination
        if not archive:
            if destination.exists() and any(destination.iterdir()):
                raise CommandError(f"{destination} is not empty")
            make_dirs(destination)
        snapshot_database(database, target / DATABASE_NAME, progress=progress)
        plugins = copy_plugins(source / "plugins", target / "plugins")
        for name in BACKUP_FILES:
            with contextlib.suppress(FileNotFoundError):
                atomic_write(target / name, (source / name).read_bytes())
        if archive:
            import tarfile
            temp = destination.with_name(destination.name + TEMP_MARK + "part")
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()   # left by a backup that was killed
            # Owner-only from its first byte: the archive holds the token and the keys.
            with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as raw:
                try:
                    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                        tar.add(target, arcname=".")
                except BaseException:
                    temp.unlink()
                    raise
            os.replace(temp, destination)
    return plugins


def snapshot_database(source: Path, target: Path, progress: bool = False) -> None:
    """SQLite's online backup: a consistent copy while the server goes on writing."""
    reported = []

    def report(status: int, remaining: int, total: int) -> None:
        if progress and total > 10_000:   # pages: say how far a large copy has got
            reported.append(True)
            print(f"\r  database: {100 * (total - remaining) // total}%", end="", file=sys.stderr, flush=True)
    reader = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True)
    os.close(os.open(target, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    writer = sqlite3.connect(target)
    try:
        reader.backup(writer, pages=1024, progress=report)
        writer.execute("PRAGMA journal_mode=DELETE")   # one self-contained file, no -wal or -shm beside it
    finally:
        writer.close()
        reader.close()
    if reported:
        print(file=sys.stderr)   # ends the line the percentages were written over


def copy_plugins(source: Path, target: Path) -> int:
    """Each plugin's plugin.json and the module it names (a deploy running meanwhile: the old or the new).

    A backup may come from anyone: only real folders with valid names, holding a module whose
    bytes match the sha256 its plugin.json names, are copied; anything else is skipped and said.
    """
    copied = 0
    for meta_file in sorted(source.glob("*/*/*/plugin.json")):
        parts = meta_file.parent.relative_to(source).parts
        try:
            meta_bytes = meta_file.read_bytes()
            sha256 = load_json(meta_bytes)["sha256"]
            if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
                raise ValueError("its plugin.json names no valid sha256")
            module_file = meta_file.parent / f"module-{sha256}.wasm"
            folders = [source.joinpath(*parts[:depth]) for depth in (1, 2, 3)]
            if not all(map(_VALID_SEGMENT.fullmatch, parts)) or any(
                    path.is_symlink() for path in folders + [meta_file, module_file]):
                raise ValueError("not a plugin folder of aeordb.py")
            module = module_file.read_bytes()
            if hashlib.sha256(module).hexdigest() != sha256:
                raise ValueError("its module does not match its sha256")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"aeordb.py: skipped {'/'.join(parts)}: {exc}", file=sys.stderr)
            continue
        folder = target.joinpath(*parts)
        atomic_write(folder / module_file.name, module)
        atomic_write(folder / "plugin.json", meta_bytes)
        copied += 1
    return copied


def command_restore(args: argparse.Namespace) -> int:
    source, target = Path(args.source), args.data_dir
    if (target / DATABASE_NAME).exists() and not args.force:
        raise CommandError(f"{target} already holds a database: restore into an empty data dir, or stop its "
                           "server and pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="aeordb-restore-") as work, failures_as_command_errors("restore"):
        if source.is_file():
            import tarfile
            with tarfile.open(source, "r:gz") as tar:
                tar.extractall(work, filter="data")
            source = Path(work)
        if not (source / DATABASE_NAME).exists():
            raise CommandError(f"{args.source} is not a backup of aeordb.py (no {DATABASE_NAME})")
        prepare_data_dir(target)
        for name in (DATABASE_NAME + "-wal", DATABASE_NAME + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (target / name).unlink()
        snapshot_database(source / DATABASE_NAME, target / DATABASE_NAME)
        shutil.rmtree(target / "plugins", ignore_errors=True)
        shutil.rmtree(target / "cache", ignore_errors=True)
        plugins = copy_plugins(source / "plugins", target / "plugins")
        for name in BACKUP_FILES:   # the backup's, or none: a key the backup does not hold must not stay valid
            try:
                atomic_write(target / name, (source / name).read_bytes())
            except FileNotFoundError:
                with contextlib.suppress(FileNotFoundError):
                    (target / name).unlink()
    _print(args, {"restored": str(target), "plugins": plugins},
           lambda r: f"restored {plugins} plugin(s) and the database into {target}")
    return 0


def command_parser() -> argparse.ArgumentParser:
    """The commands besides ``serve``, each with its own --help."""
    parser = argparse.ArgumentParser(prog="aeordb.py", description="aeordb.py's commands. With no command (or "
                                     "'serve'), it serves: python aeordb.py serve --help lists the server's options.")
    commands = parser.add_subparsers(dest="command", required=True)
    default_dir = Settings.data_dir   # the field's default

    def command(name: str, handler: Callable, text: str, client: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--data-dir", type=Path, default=Path(os.environ.get("AEORDB_DATA_DIR", default_dir)),
                         help="the local data dir (its token file is the credential when none is given)")
        sub.add_argument("--json", action="store_true", help="print JSON, for scripts")
        if client:
            sub.add_argument("--url", default=os.environ.get("AEORDB_URL", "http://127.0.0.1:3000"),
                             help="the server (env AEORDB_URL; default http://127.0.0.1:3000)")
            sub.add_argument("--token", help="bearer token or API key (env AEORDB_TOKEN; default: DATA_DIR/token)")
        return sub

    deploy = command("deploy", command_deploy, "deploy a module: deploy FILE DB/SCHEMA/TABLE")
    deploy.add_argument("file")
    deploy.add_argument("plugin", metavar="DB/SCHEMA/TABLE")
    deploy.add_argument("--name")
    deploy.add_argument("--version")
    invoke = command("invoke", command_invoke, "invoke a plugin: the answer's body goes to stdout")
    invoke.add_argument("function", metavar="DB/SCHEMA/TABLE/FUNCTION")
    invoke.add_argument("stdin", nargs="?", choices=["-"], help="read the body from standard input")
    invoke.add_argument("--data", help="the body, as text")
    invoke.add_argument("--data-file", help="the body, from a file ('-': standard input)")
    invoke.add_argument("--content-type", default="application/octet-stream")
    invoke.add_argument("-v", "--verbose", action="store_true", help="status and headers on stderr")
    listing = command("list", command_list, "list a database's plugins")
    listing.add_argument("db", metavar="DB")
    remove = command("remove", command_remove, "remove a plugin")
    remove.add_argument("plugin", metavar="DB/SCHEMA/TABLE")
    logs = command("logs", command_logs, "a plugin's recent log lines and failures")
    logs.add_argument("plugin", metavar="DB/SCHEMA/TABLE")
    logs.add_argument("--limit", type=int, default=50)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    stats = command("stats", command_stats, "a plugin's statistics")
    stats.add_argument("plugin", metavar="DB/SCHEMA/TABLE")
    keys = command("keys", command_keys, "API keys: keys create|list|revoke (needs the token)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("id", nargs="?", help="the key to revoke")
    keys.add_argument("--name")
    keys.add_argument("--scopes", help="comma-separated: " + ",".join(SCOPES))
    keys.add_argument("--databases", default="*", help="comma-separated database names (default: *)")
    keys.add_argument("--expires-at", help="RFC 3339, e.g. 2030-01-01T00:00:00Z")
    check = command("check", command_check, "check a module offline exactly as a deploy would", client=False)
    check.add_argument("file")
    check.add_argument("serve_options", nargs=argparse.REMAINDER,
                       help="server options whose limits apply (e.g. --memory-limit 16777216)")
    command("token", command_token, "print the local data dir's token (it must be owner-only)", client=False)
    backup = command("backup", command_backup, "a consistent snapshot of the data dir (a directory or .tar.gz), "
                     "safe while the server runs", client=False)
    backup.add_argument("destination")
    restore = command("restore", command_restore, "restore a backup into an empty (or, with --force, a "
                      "stopped) data dir", client=False)
    restore.add_argument("source")
    restore.add_argument("--force", action="store_true")
    return parser


COMMANDS = ("deploy", "invoke", "list", "remove", "logs", "stats", "keys", "check", "token", "backup", "restore")


def main(argv: Optional[list] = None) -> int:
    """Parse the command line and dispatch: serve (no command, or 'serve') or one of COMMANDS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        return serve(argv[1:] if argv[:1] == ["serve"] else argv)
    args = command_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as exc:
        print(f"aeordb.py: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:   # an interrupted command did not finish: never report success
        print("aeordb.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
