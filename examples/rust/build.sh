#!/bin/sh
# Builds examples/rust/echo.wasm and notes.wasm from source (no cargo, no crates).
# Toolchain (Debian bookworm, Rust 1.63):
#   apt-get install rustc libstd-rust-dev-wasm32 lld binaryen
#   (libstd-rust-dev-wasm32 brings std for wasm32-wasi, which rustup now calls
#    wasm32-wasip1; lld brings wasm-ld-14, the linker; binaryen is optional.)
# rustup instead:  rustup target add wasm32-wasip1
#   RUSTC=rustc TARGET=wasm32-wasip1 LINK= ./build.sh    (uses rustup's rust-lld)
# Without WASI (runs on AeorDB too; eprintln! prints nothing):
#   TARGET=wasm32-unknown-unknown ./build.sh
# Takes about 30 s (LTO over std).
set -eu
cd "$(dirname "$0")"
# Debian's rustc by default: a rustup rustc earlier in PATH may lack the wasm target.
RUSTC=${RUSTC:-$( [ -x /usr/bin/rustc ] && echo /usr/bin/rustc || echo rustc )}
TARGET=${TARGET:-wasm32-wasi}
LINK=${LINK-$(command -v wasm-ld-14 || command -v wasm-ld || true)}
for name in echo notes; do
    "$RUSTC" --edition 2021 --crate-type cdylib --target "$TARGET" -C opt-level=s -C lto \
        -C codegen-units=1 -C panic=abort -C strip=symbols ${LINK:+-C linker=$LINK} \
        "$name.rs" -o "$name.wasm"
    if command -v wasm-opt >/dev/null 2>&1; then
        wasm-opt -all -Oz --strip-debug --strip-producers "$name.wasm" -o "$name.opt.wasm"
        if [ "$(wc -c < "$name.opt.wasm")" -lt "$(wc -c < "$name.wasm")" ]; then
            mv "$name.opt.wasm" "$name.wasm"
        else
            rm "$name.opt.wasm"
        fi
    fi
    echo "rust: $name.wasm $(wc -c < "$name.wasm") bytes"
done
