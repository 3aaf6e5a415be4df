#!/bin/sh
# Builds examples/zig/echo.wasm and notes.wasm from source.
# Toolchain: pip install ziglang==0.17.1   (Zig from PyPI; nothing else needed.
#   Tested with 0.17.1; Zig's language still changes between releases.)
# Takes about 5 s cold (Zig builds its wasm32 runtime once and caches it), 1 s warm.
# No wasm-opt on purpose: the output depends on the pip package alone, so a
# rebuild gives the committed bytes (wasm-opt -all -Oz would save about 10%).
# PYTHON picks the interpreter that has ziglang (default python3).
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
for name in echo notes; do
    "$PYTHON" -m ziglang build-exe "$name.zig" -target wasm32-freestanding -O ReleaseSmall \
        -fno-entry -rdynamic -fstrip -femit-bin="$name.wasm"
    rm -f "$name.wasm.o"
    echo "zig: $name.wasm $(wc -c < "$name.wasm") bytes"
done
