#!/bin/sh
# Builds examples/zig/echo.wasm and notes.wasm from source.
# Toolchain: pip install ziglang        (Zig 0.17 from PyPI; nothing else needed)
#   optional: apt-get install binaryen  (wasm-opt -Oz, a few per cent smaller)
# Takes about 10 s (Zig compiles its std for wasm32 once, then caches it).
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
for name in echo notes; do
    "$PYTHON" -m ziglang build-exe "$name.zig" -target wasm32-freestanding -O ReleaseSmall \
        -fno-entry -rdynamic -fstrip -femit-bin="$name.wasm"
    if command -v wasm-opt >/dev/null 2>&1; then
        wasm-opt -all -Oz --strip-debug --strip-producers "$name.wasm" -o "$name.wasm"
    fi
    rm -f "$name.wasm.o"
    echo "zig: $name.wasm $(wc -c < "$name.wasm") bytes"
done
