#!/bin/sh
# Builds examples/c/echo.wasm and notes.wasm from source (wasm32-wasi reactors).
# Toolchain (Debian bookworm):
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32 binaryen
#   (clang 14 + wasm-ld from lld; wasi-libc in /usr/include/wasm32-wasi and
#    /usr/lib/wasm32-wasi, which Debian's clang finds by itself; elsewhere pass
#    --sysroot=/path/to/wasi-sysroot; binaryen (wasm-opt) is optional.)
# Alternative: Zig's clang with its own wasi-libc (pip install ziglang):
#   CC="python3 -m ziglang cc" ./build.sh
#   (the first run compiles Zig's wasi-libc: about 2 minutes; Zig's default
#    stack makes 16 MiB of initial memory: add -Wl,-z,stack-size=65536 to trim)
# No libc at all (no stdio; runs on AeorDB too): the kit works with
#   clang --target=wasm32 -nostdlib -Wl,--no-entry -Oz -s -o notes.wasm notes.c
# Takes about 2 s.
set -eu
cd "$(dirname "$0")"
CC=${CC:-clang}
for name in echo notes; do
    $CC --target=wasm32-wasi -mexec-model=reactor -Oz -s -Wall -Wextra -o "$name.wasm" "$name.c"
    if command -v wasm-opt >/dev/null 2>&1; then
        wasm-opt -all -Oz --strip-debug --strip-producers "$name.wasm" -o "$name.opt.wasm"
        if [ "$(wc -c < "$name.opt.wasm")" -lt "$(wc -c < "$name.wasm")" ]; then
            mv "$name.opt.wasm" "$name.wasm"
        else
            rm "$name.opt.wasm"
        fi
    fi
    echo "c: $name.wasm $(wc -c < "$name.wasm") bytes"
done
