#!/usr/bin/env bash
# arm64-check.sh: run aeordb.py on 64-bit ARM the way a Raspberry Pi runs it,
# under qemu-user emulation of an arm64 Debian bookworm userland, with a
# 39-bit (512 GiB) address space, and check that it serves and contains plugins.
#
#   sudo bash tools/arm64-check.sh [--work DIR] [--aeordb PATH] [--reserved-va SIZE]
#
# Sets up from scratch and caches under the work dir (default
# /var/tmp/aeordb-arm64): the arm64 root fs (mmdebstrap, no emulation), a
# static qemu-aarch64 from Debian trixie (qemu-user 10; taken from the .deb
# with dpkg-deb after a download through a private apt configuration, so the
# host's apt state is left alone) and a venv inside the guest with the
# runtime requirements (aarch64 wheels from PyPI). Then it starts the server
# under `chroot ROOT /usr/bin/qemu-aarch64` with QEMU_RESERVED_VA, deploys
# and invokes examples/hello.wasm, an endless loop and a memory bomb, checks
# the server still serves, stops it with SIGTERM and prints a verdict:
# "VERDICT: PASS" (exit 0) or "VERDICT: FAIL (reasons)" (exit 1).
#
# Environment: ARM64_RESERVED_VA (default 512G, i.e. 39 bits; "none" runs
# qemu without a reservation), ARM64_HEALTH_TIMEOUT (seconds to wait for the
# server, default 180). Needs root (chroot, mounts), the network to reach the
# Debian mirror and PyPI, and about 200 MB of disk in the work dir (about
# 700 MB for a moment on the first run, while the qemu-user package is unpacked).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
WORK=/var/tmp/aeordb-arm64
AEORDB=$REPO/aeordb.py
RESERVED_VA=${ARM64_RESERVED_VA-512G}
HEALTH_TIMEOUT=${ARM64_HEALTH_TIMEOUT:-180}
SUITE=bookworm
QEMU_SUITE=trixie
TOKEN=arm64-check-token
GUEST_VENV=/opt/aeordb-venv
GUEST_APP=/opt/aeordb
GUEST_DATA=/var/lib/aeordb-check

usage() {
    echo "usage: bash tools/arm64-check.sh [--work DIR] [--aeordb PATH] [--reserved-va SIZE|none]"
}

while [ $# -gt 0 ]; do
    case $1 in
        --work) WORK=${2:?--work needs a directory}; shift 2 ;;
        --aeordb) AEORDB=${2:?--aeordb needs a path}; shift 2 ;;
        --reserved-va) RESERVED_VA=${2:?--reserved-va needs a size}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "arm64-check.sh needs root (it uses chroot and mounts): run it with sudo" >&2
    exit 2
fi
[ -f "$AEORDB" ] || { echo "no such file: $AEORDB" >&2; exit 2; }
AEORDB=$(cd "$(dirname "$AEORDB")" && pwd)/$(basename "$AEORDB")
case $RESERVED_VA in
    none|"") RESERVED_VA="" ;;
    *[!0-9kKMG]*|[!0-9]*) echo "reserved VA size must be like 512G or 2048G (qemu knows k, M, G), or none: $RESERVED_VA" >&2; exit 2 ;;
esac

# The guest's /proc and /dev are mounted in a private mount namespace, so
# they vanish with this process however it ends.
if [ -z "${ARM64_CHECK_IN_NAMESPACE:-}" ]; then
    ARM64_CHECK_IN_NAMESPACE=1 exec unshare --mount --propagation private \
        bash "${BASH_SOURCE[0]}" --work "$WORK" --aeordb "$AEORDB" --reserved-va "${RESERVED_VA:-none}"
fi

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ROOT=$WORK/rootfs
QEMU=$WORK/qemu-aarch64
LOG=$WORK/logs
mkdir -p "$LOG"

FAILURES=()
fail() { FAILURES+=("$1"); }

# -- step timing ---------------------------------------------------------------

T0=$EPOCHREALTIME
STEP_START=$T0
begin() { STEP_START=$EPOCHREALTIME; }
# done_step WHAT: one line saying what the step did and how long it took
done_step() {
    local now=$EPOCHREALTIME
    awk -v a="$STEP_START" -v b="$now" -v t="$T0" -v what="$1" \
        'BEGIN { printf "[%6.1fs] %s (%.1f s)\n", b - t, what, b - a }'
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

SERVER_PID=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

CHROOT=$(command -v chroot)
# The guest's environment: nothing from the host's but what is set here.
GUEST_ENV=(PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8)
if [ -n "$RESERVED_VA" ]; then GUEST_ENV+=("QEMU_RESERVED_VA=$RESERVED_VA"); fi
guest() {
    env -i "${GUEST_ENV[@]}" "$CHROOT" "$ROOT" /usr/bin/qemu-aarch64 "$@"
}
# how_ended STATUS: a shell exit status in words
how_ended() {
    if [ "$1" -gt 128 ]; then
        echo "killed by signal $(($1 - 128)) (SIG$(kill -l "$(($1 - 128))"))"
    else
        echo "exit status $1"
    fi
}

echo "arm64-check: aeordb=$AEORDB work=$WORK QEMU_RESERVED_VA=${RESERVED_VA:-unset}"

# -- host tools ----------------------------------------------------------------

begin
declare -A NEED=([mmdebstrap]=mmdebstrap [curl]=curl [dpkg-deb]=dpkg [unshare]=util-linux)
missing=()
for tool in "${!NEED[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${NEED[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing host packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
        "${missing[@]}" >"$LOG/host-apt.log" 2>&1 \
        || { cat "$LOG/host-apt.log"; echo "VERDICT: FAIL (could not install ${missing[*]})"; exit 1; }
    done_step "host tools: installed ${missing[*]}"
else
    done_step "host tools: mmdebstrap, curl, dpkg-deb already present"
fi

# The host's Python with wasmtime builds the loop and bomb modules from WAT.
begin
HOST_PY=""
for candidate in "$REPO/.venv/bin/python" "$WORK/host-venv/bin/python" python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import wasmtime" 2>/dev/null; then
        HOST_PY=$candidate; break
    fi
done
if [ -z "$HOST_PY" ]; then
    if ! { python3 -m venv "$WORK/host-venv" \
           && "$WORK/host-venv/bin/python" -m pip install -q "$(grep -E '^wasmtime' "$REPO/requirements.txt")"; } \
           >"$LOG/host-venv.log" 2>&1; then
        cat "$LOG/host-venv.log"; echo "VERDICT: FAIL (no host python with wasmtime)"; exit 1
    fi
    HOST_PY=$WORK/host-venv/bin/python
fi
done_step "host python for wat2wasm: $HOST_PY"

# -- the Debian mirror, as the host's apt configuration names it ----------------

begin
MIRROR=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    MIRROR=$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i !~ /security/) { print $i; exit } else break } }' \
        /etc/apt/sources.list)
fi
if [ -z "$MIRROR" ]; then
    echo "VERDICT: FAIL (no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list)"
    exit 1
fi
MIRROR=${MIRROR%/}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
done_step "mirror from the host's apt sources: $MIRROR"

# -- qemu-user 10 from trixie, through a private apt configuration ---------------

begin
if [ -x "$QEMU" ] && "$QEMU" --version >/dev/null 2>&1; then
    done_step "qemu: cached $QEMU ($("$QEMU" --version | head -1))"
else
    APT=$WORK/apt-$QEMU_SUITE
    mkdir -p "$APT/etc/sources.list.d" "$APT/etc/preferences.d" "$APT/state/lists/partial" \
        "$APT/cache/archives/partial" "$APT/debs"
    echo "deb [signed-by=$KEYRING] $MIRROR $QEMU_SUITE main" >"$APT/etc/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$APT/etc/sources.list"
              -o "Dir::Etc::SourceParts=$APT/etc/sources.list.d"
              -o "Dir::Etc::Preferences=$APT/etc/preferences"
              -o "Dir::Etc::PreferencesParts=$APT/etc/preferences.d"
              -o "Dir::State=$APT/state" -o "Dir::State::status=$APT/state/status"
              -o "Dir::Cache=$APT/cache" -o "APT::Architectures::=")
    touch "$APT/state/status"
    apt-get "${apt_opts[@]}" -q update >"$LOG/qemu-apt.log" 2>&1 \
        || { cat "$LOG/qemu-apt.log"; echo "VERDICT: FAIL (apt-get update of $QEMU_SUITE failed)"; exit 1; }
    # In trixie qemu-user holds the static binaries; qemu-user-static is a
    # transitional package. Take whichever ships usr/bin/qemu-aarch64{,-static}.
    rm -rf "$APT/extract" "$APT/debs" && mkdir -p "$APT/extract" "$APT/debs"
    for pkg in qemu-user qemu-user-static; do
        (cd "$APT/debs" && apt-get "${apt_opts[@]}" -q download "$pkg") >>"$LOG/qemu-apt.log" 2>&1 || continue
        debs=("$APT"/debs/"${pkg}"_*.deb)
        deb=${debs[0]}
        dpkg-deb -x "$deb" "$APT/extract"
        for bin in usr/bin/qemu-aarch64 usr/bin/qemu-aarch64-static; do
            if [ -f "$APT/extract/$bin" ] && file_type=$(head -c 4 "$APT/extract/$bin" | od -An -c | tr -d ' ') \
                    && [ "$file_type" = '177ELF' ]; then
                cp "$APT/extract/$bin" "$QEMU.tmp" && chmod 755 "$QEMU.tmp" && mv "$QEMU.tmp" "$QEMU"
                QEMU_FROM="$(basename "$deb") $bin"
                break 2
            fi
        done
    done
    rm -rf "$APT/extract" "$APT/debs"
    if [ ! -x "$QEMU" ]; then
        cat "$LOG/qemu-apt.log"; echo "VERDICT: FAIL (no qemu-aarch64 in $QEMU_SUITE's qemu-user packages)"; exit 1
    fi
    if ldd "$QEMU" 2>/dev/null | grep -q '=>'; then
        echo "warning: $QEMU is dynamically linked; inside the chroot it needs host libraries"
    fi
    done_step "qemu: downloaded $QEMU_FROM ($("$QEMU" --version | head -1))"
fi

# -- the arm64 root fs ------------------------------------------------------------

# Nothing may be mounted under ROOT before it is deleted.
assert_no_mounts() {
    if awk -v r="$ROOT/" 'index($2 "/", r) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        echo "VERDICT: FAIL (something is mounted under $ROOT; refusing to touch it)"; exit 1
    fi
}

begin
if [ -f "$ROOT/.arm64-check-rootfs" ] && [ -x "$ROOT/usr/bin/python3" ]; then
    done_step "root fs: cached $ROOT ($(du -sh "$ROOT" 2>/dev/null | cut -f1))"
else
    assert_no_mounts
    rm -rf "$ROOT"
    mmdebstrap --arch=arm64 --variant=extract --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$ROOT" "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$LOG/mmdebstrap.log" 2>&1 \
        || { tail -30 "$LOG/mmdebstrap.log"; echo "VERDICT: FAIL (mmdebstrap failed)"; exit 1; }
    touch "$ROOT/.arm64-check-rootfs"
    done_step "root fs: mmdebstrap --variant=extract arm64 $SUITE into $ROOT ($(du -sh "$ROOT" | cut -f1))"
fi

begin
install -m 755 "$QEMU" "$ROOT/usr/bin/qemu-aarch64"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"   # pip's name look-ups in the guest
printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"
# --variant=extract runs no maintainer scripts: build the CA bundle Debian's
# pip reads, as update-ca-certificates would, from the ca-certificates
# package, plus the host's bundle (the guest shares the host's network, so
# whatever the host trusts, e.g. a TLS-inspecting proxy's CA, it trusts too).
mkdir -p "$ROOT/etc/ssl/certs"
cat "$ROOT"/usr/share/ca-certificates/mozilla/*.crt >"$ROOT/etc/ssl/certs/ca-certificates.crt"
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cat /etc/ssl/certs/ca-certificates.crt >>"$ROOT/etc/ssl/certs/ca-certificates.crt"
fi
mkdir -p "$ROOT/proc" "$ROOT/dev" "$ROOT/tmp" "$ROOT/root"
chmod 1777 "$ROOT/tmp"
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
done_step "guest: qemu-aarch64, resolv.conf and CA bundle (guest's + host's) copied in, /proc and /dev mounted (private mount namespace)"

# -- the guest's venv -----------------------------------------------------------

begin
grep -E '^(bottle|waitress|wasmtime)([^a-zA-Z0-9_.-]|$)' "$REPO/requirements.txt" >"$WORK/requirements-runtime.txt"
if [ "$(wc -l <"$WORK/requirements-runtime.txt")" -ne 3 ]; then
    echo "VERDICT: FAIL (requirements.txt lacks one of bottle, waitress, wasmtime)"; exit 1
fi
cp "$WORK/requirements-runtime.txt" "$ROOT/tmp/requirements-runtime.txt"
stamp=$ROOT$GUEST_VENV/.arm64-check-requirements
if [ -x "$ROOT$GUEST_VENV/bin/python" ] && cmp -s "$stamp" "$WORK/requirements-runtime.txt"; then
    done_step "guest venv: cached $GUEST_VENV ($(tr '\n' ' ' <"$stamp"))"
else
    rm -rf "${ROOT:?}$GUEST_VENV"
    wheels=("$ROOT"/usr/share/python-wheels/pip-*.whl)
    pip_wheel=${wheels[0]#"$ROOT"/}
    [ -f "$ROOT/$pip_wheel" ] || { echo "VERDICT: FAIL (no pip wheel in the guest's /usr/share/python-wheels)"; exit 1; }
    { guest /usr/bin/python3 -m venv --without-pip "$GUEST_VENV" \
        && guest "$GUEST_VENV/bin/python" "/$pip_wheel/pip" install --no-cache-dir --disable-pip-version-check \
            --only-binary=:all: -r /tmp/requirements-runtime.txt; } >"$LOG/guest-pip.log" 2>&1 \
        || { tail -30 "$LOG/guest-pip.log"; echo "VERDICT: FAIL (pip in the guest failed)"; exit 1; }
    cp "$WORK/requirements-runtime.txt" "$stamp"
    done_step "guest venv: $GUEST_VENV, pip from /$pip_wheel installed $(grep -o 'Successfully installed.*' "$LOG/guest-pip.log" | cut -d' ' -f3- || true)"
fi

begin
# shellcheck disable=SC2016
info=$(guest "$GUEST_VENV/bin/python" -c '
import importlib.metadata as m, platform, sys
print(platform.machine(), platform.python_version(), "wasmtime", m.version("wasmtime"))' 2>&1) || true
done_step "guest python: platform.machine() $info"
case $info in
    aarch64\ *) ;;
    *) fail "guest python check did not say aarch64: $info" ;;
esac

# -- plugins -------------------------------------------------------------------

begin
MODS=$WORK/modules
mkdir -p "$MODS"
cp "$REPO/examples/hello.wasm" "$MODS/hello.wasm"
# shellcheck disable=SC2016
"$HOST_PY" - "$MODS" <<'PY'
import pathlib, sys, wasmtime
out = pathlib.Path(sys.argv[1])
# An endless loop: only the epoch deadline (the time limit) stops it.
(out / "loop.wasm").write_bytes(wasmtime.wat2wasm("""
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param i32 i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0)))
"""))
# A memory bomb: grows its memory a page at a time until memory.grow fails,
# then traps with unreachable, as an allocator's abort would.
(out / "bomb.wasm").write_bytes(wasmtime.wat2wasm("""
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param i32 i32) (result i64)
    (block $refused
      (loop $grow
        (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $grow)))
    unreachable))
"""))
PY
done_step "modules: hello.wasm ($(stat -c %s "$MODS/hello.wasm") B), loop.wasm, bomb.wasm built with wat2wasm on the host"

# -- the server ----------------------------------------------------------------

begin
mkdir -p "$ROOT$GUEST_APP"
cp "$AEORDB" "$ROOT$GUEST_APP/aeordb.py"
rm -rf "${ROOT:?}$GUEST_DATA"
PORT=$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
SERVER_LOG=$LOG/server.log
started=$EPOCHREALTIME
# Not through the function: $! must be the server's own process.
env -i "${GUEST_ENV[@]}" "$CHROOT" "$ROOT" /usr/bin/qemu-aarch64 \
    "$GUEST_VENV/bin/python" "$GUEST_APP/aeordb.py" --host 127.0.0.1 --port "$PORT" --token "$TOKEN" \
    --data-dir "$GUEST_DATA" --timeout 5 >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!   # env and chroot exec: this is the qemu process
healthy=""
while :; do
    if curl -fsS --max-time 5 "$BASE/_health" >/dev/null 2>&1; then healthy=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    awk -v a="$started" -v b="$EPOCHREALTIME" -v t="$HEALTH_TIMEOUT" 'BEGIN { exit !(b - a > t) }' && break
    sleep 0.25
done
if [ -n "$healthy" ]; then
    done_step "server: started under qemu (pid $SERVER_PID), GET /_health answered after $(elapsed "$started") s"
else
    status=running
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        set +e; wait "$SERVER_PID"; rc=$?; set -e
        status="server process $(how_ended "$rc")"
    fi
    done_step "server: no answer from GET /_health within $(elapsed "$started") s ($status)"
    fail "server did not start under QEMU_RESERVED_VA=${RESERVED_VA:-unset} ($status)"
fi
echo "---- server output ----"
sed 's/^/  | /' "$SERVER_LOG"
echo "-----------------------"
LOG_SHOWN=$(wc -l <"$SERVER_LOG")

peak_rss() {
    awk '/^VmPeak/ { printf "virtual peak %.1f GiB, ", $2 / 1048576 }
         /^VmHWM/ { printf "resident peak (VmHWM) %.0f MiB ", $2 / 1024 }' "/proc/$SERVER_PID/status" 2>/dev/null || true
}

# request METHOD PATH [FILE]: sets CODE and BODY
request() {
    local args=(-sS --max-time 120 -o "$WORK/body" -w '%{http_code}' -X "$1"
                -H "Authorization: Bearer $TOKEN")
    [ $# -ge 3 ] && args+=(--data-binary "@$3" -H "Content-Type: application/wasm")
    CODE=$(curl "${args[@]}" "$BASE$2" 2>"$WORK/curl.err") || CODE="curl: $(cat "$WORK/curl.err")"
    BODY=$(cat "$WORK/body" 2>/dev/null || true)
}

# json_check EXPR: EXPR over the parsed BODY (as j) must be true
json_check() {
    "$HOST_PY" -c 'import json, sys; j = json.loads(sys.argv[2]); sys.exit(0 if eval(sys.argv[1]) else 1)' \
        "$1" "$BODY" 2>/dev/null
}

deploy() {   # deploy NAME
    begin
    request PUT "/check/arm64/$1/_deploy" "$MODS/$1.wasm"
    done_step "deploy $1.wasm: HTTP $CODE $(head -c 200 <<<"$BODY")"
    [ "$CODE" = 200 ] || fail "deploy $1 answered $CODE"
}

invoke() {   # invoke NAME: sets CODE, BODY and SECONDS_TAKEN
    begin
    local t=$EPOCHREALTIME
    request POST "/check/arm64/$1/run/_invoke"
    SECONDS_TAKEN=$(elapsed "$t")
}

if [ -n "$healthy" ]; then
    echo "server process: $(peak_rss)(after start)"
    deploy hello
    invoke hello
    done_step "invoke hello: HTTP $CODE $BODY in $SECONDS_TAKEN s"
    { [ "$CODE" = 200 ] && json_check 'j == {"hello": "world"}'; } || fail "hello answered $CODE $BODY"

    deploy loop
    invoke loop
    done_step "invoke loop (endless): HTTP $CODE $BODY after $SECONDS_TAKEN s (limit --timeout 5)"
    { [ "$CODE" = 500 ] && json_check '"time limit" in j["error"]'; } \
        || fail "endless loop answered $CODE $BODY (expected 500 naming the time limit)"

    deploy bomb
    invoke bomb
    done_step "invoke bomb (memory): HTTP $CODE $BODY in $SECONDS_TAKEN s"
    { [ "$CODE" = 500 ] && json_check '"memory limit" in j["error"]'; } \
        || fail "memory bomb answered $CODE $BODY (expected 500 naming the memory limit)"

    invoke hello
    done_step "invoke hello again: HTTP $CODE $BODY in $SECONDS_TAKEN s"
    { [ "$CODE" = 200 ] && json_check 'j == {"hello": "world"}'; } || fail "hello after the bomb answered $CODE $BODY"

    echo "server process: $(peak_rss)(peak, host memory of the qemu process)"
fi

# -- stop ----------------------------------------------------------------------

if kill -0 "$SERVER_PID" 2>/dev/null; then
    begin
    kill -TERM "$SERVER_PID"
    stopped=""
    for _ in $(seq 1 60); do
        kill -0 "$SERVER_PID" 2>/dev/null || { stopped=1; break; }
        sleep 0.25
    done
    if [ -n "$stopped" ]; then
        set +e; wait "$SERVER_PID"; rc=$?; set -e
        how=$(how_ended "$rc")
        done_step "stop: SIGTERM, server ended: $how"
        if [ "$rc" != 0 ] && [ "$rc" != 143 ]; then fail "server ended with $how after SIGTERM"; fi
    else
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        done_step "stop: SIGTERM, server still running after 15 s; killed"
        fail "server ignored SIGTERM"
    fi
    SERVER_PID=""
    if [ "$(wc -l <"$SERVER_LOG")" -gt "$LOG_SHOWN" ]; then
        echo "---- server output after start-up ----"
        tail -n +"$((LOG_SHOWN + 1))" "$SERVER_LOG" | sed 's/^/  | /'
        echo "--------------------------------------"
    fi
fi
if grep -q "pooling allocator unavailable" "$SERVER_LOG"; then
    echo "note: the server fell back to on-demand allocation: $(grep -o 'pooling allocator unavailable.*' "$SERVER_LOG" | head -1 | cut -c1-300)"
fi

echo "total: $(elapsed "$T0") s"
if [ ${#FAILURES[@]} -eq 0 ]; then
    echo "VERDICT: PASS (aarch64 under qemu-user, QEMU_RESERVED_VA=${RESERVED_VA:-unset})"
    exit 0
fi
reasons=$(printf '%s; ' "${FAILURES[@]}")
echo "VERDICT: FAIL (${reasons%; }; QEMU_RESERVED_VA=${RESERVED_VA:-unset})"
exit 1
