#!/bin/sh
# Builds every example plugin by calling examples/<lang>/build.sh, then with
# --check runs examples/check_examples.py against a real aeordb.py.
#
#   examples/build.sh [--check] [language ...]      (default: every language present)
#
# Toolchains (Debian bookworm; each <lang>/build.sh says more in its first lines):
#   zig:            pip install ziglang==0.17.1
#   c:              apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32
#   rust:           apt-get install rustc libstd-rust-dev-wasm32 lld
#   go:             see examples/go/build.sh (the Go kit)
#   assemblyscript: see examples/assemblyscript/build.sh (the AssemblyScript kit)
#   all, optional:  apt-get install binaryen   (wasm-opt -Oz)
# Timing on 2 cores: zig 5 s cold (1 s warm), c 3 s, rust 10-20 s (LTO over
# std), assemblyscript about 25 s; the check about 15 s more. A language whose
# toolchain is missing fails alone: the others still build and get checked.
# PYTHON picks the interpreter (default: the repository's .venv if present),
# used for `python -m ziglang` and for the check.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
LANGS=${*:-zig c rust go assemblyscript}
FAILED=""
for lang in $LANGS; do
    script="$HERE/$lang/build.sh"
    if [ ! -f "$script" ]; then
        echo "== $lang: no $lang/build.sh, skipped"
        continue
    fi
    echo "== $lang"
    start=$(date +%s)
    if sh "$script"; then
        echo "== $lang built in $(( $(date +%s) - start )) s"
    else
        echo "== $lang FAILED (is its toolchain installed? see the first lines of $lang/build.sh)"
        FAILED="$FAILED $lang"
    fi
done
STATUS=0
if [ "$CHECK" = 1 ]; then
    echo "== check"
    # shellcheck disable=SC2086
    "$PYTHON" "$HERE/check_examples.py" ${*:-} || STATUS=1
fi
if [ -n "$FAILED" ]; then
    echo "build failed:$FAILED"
    STATUS=1
fi
exit $STATUS
