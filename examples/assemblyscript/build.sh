#!/bin/sh
# Builds echo.wasm and notes.wasm from echo.ts / notes.ts and the kit aeordb.ts.
# Toolchain: Node.js >= 20 with npm (assemblyscript 0.28 asks for it; Debian
# bookworm's own nodejs is 18), then, in this folder:
#   npm ci        # installs assemblyscript 0.28.20 (and its binaryen) as package-lock.json pins them
#
# Runtime "stub": a bump allocator without GC that never frees. A fresh instance
# serves each call, so nothing ever needs freeing: it is the smallest and
# fastest fit (incremental would add a GC, ~8 KB, and collections mid-call).
# Default flags otherwise, so the module imports env.abort (aeordb.py provides
# it). Adding --use abort= drops that import (a failed bounds check then traps
# without a message): such a module imports only aeordb.* and also runs on
# servers without env.abort (AeorDB; aeordb.py before it provided env.abort).
# -O3z: asc optimizes for speed and size with binaryen itself; wasm-opt -Oz
# on top gains well under 1%, so it is not used.
set -eu
cd "$(dirname "$0")"
[ -x node_modules/.bin/asc ] || npm ci --no-audit --no-fund
for m in echo notes; do
  node_modules/.bin/asc "$m.ts" --runtime stub -O3z -o "$m.wasm"
  echo "$m.wasm: $(wc -c < "$m.wasm") bytes"
done
