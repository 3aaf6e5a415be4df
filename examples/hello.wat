;; hello.wat: a small aeordb plugin, hand-written in WebAssembly text.
;; It logs one line through the host and answers a PluginResponse envelope.
;; hello.wasm beside it is this file compiled:
;;   python -c "import wasmtime,sys; sys.stdout.buffer.write(wasmtime.wat2wasm(open('examples/hello.wat').read()))" > examples/hello.wasm
(module
  (import "aeordb" "log_message" (func $log (param i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "info")
  (data (i32.const 16) "hello plugin invoked")
  (data (i32.const 64)
    "{\"status_code\":200,\"content_type\":\"application/json\",\"headers\":{\"x-plugin\":\"hello\"},\"body\":\"{\\\"hello\\\":\\\"world\\\"}\"}")
  ;; The server places the request with alloc: hand out memory after our data,
  ;; growing it as needed, so a request never overwrites the answer.
  (global $next (mut i32) (i32.const 1024))
  (func (export "alloc") (param $size i32) (result i32)
    (local $start i32)
    (local.set $start (global.get $next))
    (global.set $next (i32.add (local.get $start) (local.get $size)))
    (block $fits
      (loop $grow
        (br_if $fits (i32.le_u (global.get $next) (i32.mul (memory.size) (i32.const 65536))))
        (br_if $fits (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $grow)))
    (local.get $start))
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (call $log (i32.const 0) (i32.const 4) (i32.const 16) (i32.const 20))
    (i64.or (i64.shl (i64.const 64) (i64.const 32)) (i64.const 115))))
