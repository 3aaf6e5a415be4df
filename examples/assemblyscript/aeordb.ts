// aeordb.ts: the AssemblyScript kit for aeordb.py plugins. It hides the plugin
// ABI (see examples/README.md): a Request, a Response builder, one typed
// function per host function, base64 and a few JSON helpers (AssemblyScript has
// no JSON library: JSON travels as text, read with jsonGetString/jsonGetNumber/...).
//
// Use: copy this file next to your plugin and write, in your entry file:
//
//   import { Request, Response, serve } from "./aeordb";
//   export { alloc } from "./aeordb";
//   export function handle(ptr: i32, len: i32): i64 { return serve(ptr, len, myHandler); }
//
// Build: npx asc plugin.ts --runtime stub -O3z --noAssert -o plugin.wasm
// The stub runtime is a bump allocator that never frees and has no GC: a fresh
// instance serves each call, so that is all a plugin needs, and the smallest.
// The module imports env.abort (the server provides it; a failed assertion or
// an out-of-range access fails the call with its message).
//
// Raw entry point (aeordb.py only, AeorDB does not have it): export handle_raw
// INSTEAD of handle to get the body's bytes as they are, without the JSON
// envelope (for large bodies):
//
//   export function handle_raw(ptr: i32, len: i32): i64 { return serveRaw(ptr, len, myHandler); }
//
// The default, and what runs on both servers, is the envelope (serve).

// ---------------------------------------------------------------------------
// Memory: the server places the request and every host answer at alloc(n).

export function alloc(size: i32): i32 {
  // An ArrayBuffer, so that serveRaw can wrap the body in place, without a copy.
  return <i32>changetype<usize>(new ArrayBuffer(size > 0 ? size : 0));
}

function pack(ptr: usize, len: i32): i64 {
  return <i64>((<u64>(<u32>ptr) << 32) | <u64>(<u32>len));
}

/** s encoded as UTF-8. */
export function utf8(s: string): Uint8Array {
  return Uint8Array.wrap(String.UTF8.encode(s));
}

// ---------------------------------------------------------------------------
// Request and Response

export class Request {
  constructor(public body: Uint8Array, public metadata: Map<string, string>) {}

  /** The metadata value, or "" when absent. */
  meta(name: string): string {
    return this.metadata.has(name) ? this.metadata.get(name) : "";
  }
  /** The invoked function: metadata function_name, else name. */
  functionName(): string {
    const f = this.meta("function_name");
    return f.length > 0 ? f : this.meta("name");
  }
  /** The request's content type ("" when the server did not say). */
  contentType(): string { return this.meta("content_type"); }
  /** The body decoded as UTF-8. */
  text(): string {
    return String.UTF8.decodeUnsafe(this.body.dataStart, <usize>this.body.length);
  }
}

/** A plugin's answer. Only headers named x-*, cache-control, etag,
 *  last-modified, content-disposition, content-language, content-encoding and
 *  vary reach the client. */
export class Response {
  headers: Map<string, string> = new Map<string, string>();
  constructor(public status: i32, public contentType: string, public body: Uint8Array) {}

  static bytes(status: i32, contentType: string, body: Uint8Array): Response {
    return new Response(status, contentType, body);
  }
  static text(status: i32, text: string): Response {
    return new Response(status, "text/plain; charset=utf-8", utf8(text));
  }
  /** json is JSON text (build it with jsonString for strings). */
  static json(status: i32, json: string): Response {
    return new Response(status, "application/json", utf8(json));
  }
  /** Sets a header; returns this, for chaining. */
  header(name: string, value: string): Response {
    this.headers.set(name, value);
    return this;
  }

  headersJson(): string {
    const names = this.headers.keys();
    names.sort();
    let out = "{";
    for (let i = 0; i < names.length; i++) {
      if (i > 0) out += ",";
      out += jsonString(names[i]) + ":" + jsonString(this.headers.get(names[i]));
    }
    return out + "}";
  }

  /** The PluginResponse envelope, written straight into one exact-size buffer. */
  envelope(): Uint8Array {
    const ct = this.contentType.length > 0 ? this.contentType : "application/octet-stream";
    const head = utf8('{"status_code":' + this.status.toString() + ',"content_type":' + jsonString(ct) +
      ',"headers":' + this.headersJson() + ',"body":[');
    const body = this.body;
    const n = body.length;
    let size = head.length + 2 + (n > 0 ? n - 1 : 0);
    for (let i = 0; i < n; i++) {
      const b = unchecked(body[i]);
      size += b < 10 ? 1 : b < 100 ? 2 : 3;
    }
    const out = new Uint8Array(size);
    memory.copy(out.dataStart, head.dataStart, <usize>head.length);
    let p = out.dataStart + <usize>head.length;
    for (let i = 0; i < n; i++) {
      const b = <u32>unchecked(body[i]);
      if (i > 0) { store<u8>(p, 44); p++; }
      if (b >= 100) { store<u8>(p, 48 + b / 100); p++; }
      if (b >= 10) { store<u8>(p, 48 + (b / 10) % 10); p++; }
      store<u8>(p, 48 + b % 10); p++;
    }
    store<u8>(p, 93); store<u8>(p + 1, 125); // ]}
    return out;
  }
}

/** The default (envelope) entry point: call it from your exported handle. */
export function serve(ptr: i32, len: i32, handler: (req: Request) => Response): i64 {
  const req = parseEnvelope(<usize>ptr, len);
  const resp = req != null ? handler(req) :
    Response.json(400, '{"error":"bad request envelope"}');
  const out = resp.envelope();
  return pack(out.dataStart, out.length);
}

/** The aeordb.py-only raw entry point: call it from an exported handle_raw
 *  (and export no handle). Metadata comes from aeordb_context; status, content
 *  type and headers go back through aeordb_set_response. */
export function serveRaw(ptr: i32, len: i32, handler: (req: Request) => Response): i64 {
  const meta = new Map<string, string>();
  const ctx = context();
  if (ctx != null) readStringMap(ctx, meta);
  const body = Uint8Array.wrap(changetype<ArrayBuffer>(<usize>ptr), 0, len); // placed by alloc
  const resp = handler(new Request(body, meta));
  const head = utf8('{"status_code":' + resp.status.toString() + ',"content_type":' +
    jsonString(resp.contentType) + ',"headers":' + resp.headersJson() + "}");
  hostSetResponse(<i32>head.dataStart, head.length);
  return pack(resp.body.dataStart, resp.body.length);
}

// {"arguments":[bytes...],"metadata":{...}}: a hand-written scanner, as a
// 1 MiB body is a 4 MiB array of numbers.
function parseEnvelope(base: usize, len: i32): Request | null {
  let body = new Uint8Array(0);
  const meta = new Map<string, string>();
  let i = skipWS(base, len, 0, false);
  if (i >= len || at(base, i, false) != 123) return null; // {
  i = skipWS(base, len, i + 1, false);
  while (i < len && at(base, i, false) != 125) {
    const keyEnd = skipValue(base, len, i, false);
    if (keyEnd < 0 || at(base, i, false) != 34) return null;
    const key = String.UTF8.decodeUnsafe(base + <usize>i + 1, <usize>(keyEnd - i - 2));
    i = skipWS(base, len, keyEnd, false);
    if (i >= len || at(base, i, false) != 58) return null; // :
    i = skipWS(base, len, i + 1, false);
    const end = skipValue(base, len, i, false);
    if (end < 0) return null;
    if (key == "arguments") {
      const parsed = parseByteArray(base + <usize>i, end - i);
      if (parsed == null) return null;
      body = parsed;
    } else if (key == "metadata") {
      readStringMap(String.UTF8.decodeUnsafe(base + <usize>i, <usize>(end - i)), meta);
    }
    i = skipWS(base, len, end, false);
    if (i < len && at(base, i, false) == 44) i = skipWS(base, len, i + 1, false);
  }
  return new Request(body, meta);
}

function parseByteArray(p: usize, len: i32): Uint8Array | null {
  if (len < 2 || load<u8>(p) != 91) return null;
  let count = 0, digits = 0;
  for (let i = 1; i < len - 1; i++) {
    const c = load<u8>(p + <usize>i);
    if (c == 44) count++;
    else if (c >= 48 && c <= 57) digits++;
  }
  const out = new Uint8Array(digits > 0 ? count + 1 : 0);
  let k = 0, v: u32 = 0, n = 0;
  for (let i = 1; i < len; i++) {
    const c = <u32>load<u8>(p + <usize>i);
    if (c >= 48 && c <= 57) {
      v = v * 10 + c - 48;
      n++;
    } else if (c == 44 || c == 93) {
      if (n == 0 || n > 3 || v > 255 || k >= out.length) {
        if (c == 93 && k == 0 && n == 0) break; // []
        return null;
      }
      unchecked(out[k++] = <u8>v);
      v = 0; n = 0;
    } else if (!isWS(c)) {
      return null;
    }
  }
  return k == out.length ? out : null;
}

function readStringMap(json: string, into: Map<string, string>): void {
  const entries = jsonEntries(json);
  for (let i = 0; i + 1 < entries.length; i += 2) {
    const raw = entries[i + 1];
    if (raw.startsWith('"')) {
      const s = jsonDecodeString(raw);
      if (s != null) into.set(entries[i], s);
    } else if (raw != "null") {
      into.set(entries[i], raw);
    }
  }
}

// ---------------------------------------------------------------------------
// Host functions (import module "aeordb"). A failure answers null (or false)
// and lastError() says why.

// @ts-ignore: decorator
@external("aeordb", "aeordb_read_file") declare function hostReadFile(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_write_file") declare function hostWriteFile(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_delete_file") declare function hostDeleteFile(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_file_metadata") declare function hostFileMetadata(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_list_directory") declare function hostListDirectory(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_extract_file") declare function hostExtractFile(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_query") declare function hostQuery(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_aggregate") declare function hostAggregate(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_context") declare function hostContext(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "aeordb_set_response") declare function hostSetResponse(ptr: i32, len: i32): i64;
// @ts-ignore: decorator
@external("aeordb", "log_message") declare function hostLog(lp: i32, ll: i32, mp: i32, ml: i32): void;

let lastErrorMessage = "";

/** Why the last host function answered null or false. */
export function lastError(): string { return lastErrorMessage; }

function answerText(answer: i64): string | null {
  const text = String.UTF8.decodeUnsafe(<usize>(<u64>answer >>> 32), <usize>(<u32>answer));
  const error = jsonGetString(text, "error");
  if (error != null) {
    lastErrorMessage = error;
    return null;
  }
  return text;
}

function callHost(fn: (ptr: i32, len: i32) => i64, args: string): string | null {
  const a = utf8(args);
  return answerText(fn(<i32>a.dataStart, a.length));
}

export class File {
  constructor(public data: Uint8Array, public contentType: string, public size: i64) {}
  text(): string { return String.UTF8.decodeUnsafe(this.data.dataStart, <usize>this.data.length); }
}

/** Reads the file at an absolute path ("/notes/1.json"). */
export function readFile(path: string): File | null {
  const ans = callHost(hostReadFile, '{"path":' + jsonString(path) + "}");
  if (ans == null) return null;
  const i = jsonFind(ans, "data");
  if (i < 0) { lastErrorMessage = "aeordb_read_file: no data"; return null; }
  const end = skipValue(changetype<usize>(ans), ans.length, i, true);
  const data = base64DecodeRange(ans, i + 1, end - 1);
  const ct = jsonGetString(ans, "content_type");
  return new File(data, ct != null ? ct : "", <i64>jsonGetNumber(ans, "size"));
}

/** Creates or replaces a file; contentType may be "". */
export function writeFile(path: string, data: Uint8Array, contentType: string = ""): bool {
  const head = utf8('{"path":' + jsonString(path) +
    (contentType.length > 0 ? ',"content_type":' + jsonString(contentType) : "") + ',"data":"');
  const b64len = ((data.length + 2) / 3) * 4;
  const args = new Uint8Array(head.length + b64len + 2);
  memory.copy(args.dataStart, head.dataStart, <usize>head.length);
  base64EncodeInto(data, args.dataStart + <usize>head.length);
  args[args.length - 2] = 34; // "
  args[args.length - 1] = 125; // }
  return answerText(hostWriteFile(<i32>args.dataStart, args.length)) != null;
}

/** Deletes a file. */
export function deleteFile(path: string): bool {
  return callHost(hostDeleteFile, '{"path":' + jsonString(path) + "}") != null;
}

export class FileInfo {
  constructor(public path: string, public size: i64, public contentType: string,
              public createdAt: i64, public updatedAt: i64, public etag: string) {}
}

/** Describes a file (times in ms since the epoch). */
export function fileMetadata(path: string): FileInfo | null {
  const a = callHost(hostFileMetadata, '{"path":' + jsonString(path) + "}");
  if (a == null) return null;
  return new FileInfo(orEmpty(jsonGetString(a, "path")), <i64>jsonGetNumber(a, "size"),
    orEmpty(jsonGetString(a, "content_type")), <i64>jsonGetNumber(a, "created_at"),
    <i64>jsonGetNumber(a, "updated_at"), orEmpty(jsonGetString(a, "etag")));
}

export class Entry {
  constructor(public name: string, public type: string, public size: i64) {}
}

/** Lists a directory; type is "file" or "directory". */
export function listDirectory(path: string): Entry[] | null {
  const a = callHost(hostListDirectory, '{"path":' + jsonString(path) + "}");
  if (a == null) return null;
  const out = new Array<Entry>();
  const items = jsonItems(orEmpty(jsonGet(a, "entries")));
  for (let i = 0; i < items.length; i++) {
    const e = items[i];
    out.push(new Entry(orEmpty(jsonGetString(e, "name")), orEmpty(jsonGetString(e, "type")),
      <i64>jsonGetNumber(e, "size")));
  }
  return out;
}

/** Part of a file as text: mode "lines" (1-based, inclusive), "chars" or
 *  "bytes" (0-based, end-exclusive); -1 / 0 leave start, end, maxBytes out.
 *  Answers the JSON text {"text", "content_type", "source_size", "mode",
 *  "start", "end", "pointer", "truncated"}: jsonGetString(a, "text"). */
export function extractFile(path: string, mode: string, start: i64 = -1, end: i64 = -1,
                            maxBytes: i64 = 0): string | null {
  let args = '{"path":' + jsonString(path) + ',"mode":' + jsonString(mode);
  if (start >= 0) args += ',"start":' + start.toString();
  if (end >= 0) args += ',"end":' + end.toString();
  if (maxBytes > 0) args += ',"max_bytes":' + maxBytes.toString();
  return callHost(hostExtractFile, args + "}");
}

export class QueryItem {
  constructor(public path: string, public score: f64, public totalSize: i64, public contentType: string,
              public createdAt: i64, public updatedAt: i64) {}
}

export class QueryResult {
  constructor(public items: QueryItem[], public hasMore: bool, public total: i64, public json: string) {}
}

/** Runs a query given as JSON text: {"path", "where", "order_by", "limit",
 *  "offset", "include_total"}. total is -1 unless include_total. */
export function query(queryJson: string): QueryResult | null {
  const a = callHost(hostQuery, queryJson);
  if (a == null) return null;
  const raw = jsonItems(orEmpty(jsonGet(a, "items")));
  const items = new Array<QueryItem>();
  for (let i = 0; i < raw.length; i++) {
    const t = raw[i];
    items.push(new QueryItem(orEmpty(jsonGetString(t, "path")), jsonGetNumber(t, "score"),
      <i64>jsonGetNumber(t, "total_size"), orEmpty(jsonGetString(t, "content_type")),
      <i64>jsonGetNumber(t, "created_at"), <i64>jsonGetNumber(t, "updated_at")));
  }
  const total = jsonGetNumber(a, "total");
  return new QueryResult(items, jsonGetBool(a, "has_more"), isNaN(total) ? -1 : <i64>total, a);
}

/** Runs a query with "aggregate"; answers the JSON text, e.g.
 *  jsonGetNumber(a, "max.seq") (NaN where null). */
export function aggregate(queryJson: string): string | null {
  return callHost(hostAggregate, queryJson);
}

/** The invocation's metadata plus "db" and "remaining_ms" (aeordb.py only), as JSON text. */
export function context(): string | null {
  return callHost(hostContext, "{}");
}

/** One line in the server log; level is debug, info, warn or error. */
export function log(level: string, message: string): void {
  const l = utf8(level), m = utf8(message);
  hostLog(<i32>l.dataStart, l.length, <i32>m.dataStart, m.length);
}

function orEmpty(s: string | null): string { return s != null ? s : ""; }

// ---------------------------------------------------------------------------
// base64 (standard, padded)

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

function base64EncodeInto(data: Uint8Array, out: usize): void {
  const n = data.length;
  const table = changetype<usize>(B64);
  let i = 0;
  for (; i + 2 < n; i += 3) {
    const v = (<u32>data[i] << 16) | (<u32>data[i + 1] << 8) | <u32>data[i + 2];
    store<u8>(out, load<u16>(table + ((v >> 18) << 1)));
    store<u8>(out + 1, load<u16>(table + (((v >> 12) & 63) << 1)));
    store<u8>(out + 2, load<u16>(table + (((v >> 6) & 63) << 1)));
    store<u8>(out + 3, load<u16>(table + ((v & 63) << 1)));
    out += 4;
  }
  if (i < n) {
    const two = i + 1 < n;
    const v = (<u32>data[i] << 16) | (two ? <u32>data[i + 1] << 8 : 0);
    store<u8>(out, load<u16>(table + ((v >> 18) << 1)));
    store<u8>(out + 1, load<u16>(table + (((v >> 12) & 63) << 1)));
    store<u8>(out + 2, two ? <u8>load<u16>(table + (((v >> 6) & 63) << 1)) : 61);
    store<u8>(out + 3, 61);
  }
}

/** Standard padded base64 of data. */
export function base64Encode(data: Uint8Array): string {
  const out = new Uint8Array(((data.length + 2) / 3) * 4);
  base64EncodeInto(data, out.dataStart);
  return String.UTF8.decodeUnsafe(out.dataStart, <usize>out.length);
}

function b64value(c: i32): i32 {
  if (c >= 65 && c <= 90) return c - 65;
  if (c >= 97 && c <= 122) return c - 71;
  if (c >= 48 && c <= 57) return c + 4;
  if (c == 43) return 62;
  if (c == 47) return 63;
  return -1;
}

function base64DecodeRange(s: string, start: i32, end: i32): Uint8Array {
  let sextets = 0;
  for (let i = start; i < end; i++) if (b64value(s.charCodeAt(i)) >= 0) sextets++;
  const out = new Uint8Array((sextets * 6) >> 3);
  let acc: u32 = 0, bits = 0, k = 0;
  for (let i = start; i < end; i++) {
    const v = b64value(s.charCodeAt(i));
    if (v < 0) continue; // padding, whitespace, escaped slashes
    acc = (acc << 6) | <u32>v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      unchecked(out[k++] = <u8>(acc >> bits));
    }
  }
  return out;
}

/** Decodes standard base64. */
export function base64Decode(s: string): Uint8Array { return base64DecodeRange(s, 0, s.length); }

// ---------------------------------------------------------------------------
// JSON helpers over JSON text. Paths are dotted keys: jsonGetNumber(a, "max.seq").

/** s as a JSON string literal (quotes, backslashes and control characters
 *  escaped; non-ASCII kept). */
export function jsonString(s: string): string {
  let out = '"';
  let from = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 32 && c != 34 && c != 92) continue;
    out += s.substring(from, i);
    from = i + 1;
    if (c == 34) out += '\\"';
    else if (c == 92) out += "\\\\";
    else if (c == 10) out += "\\n";
    else if (c == 13) out += "\\r";
    else if (c == 9) out += "\\t";
    else out += "\\u00" + (c < 16 ? "0" : "1") + "0123456789abcdef".charAt(c & 15);
  }
  return out + s.substring(from) + '"';
}

/** Whether text is exactly one valid JSON value. */
export function jsonValid(text: string): bool {
  const base = changetype<usize>(text), len = text.length;
  const end = validValue(base, len, skipWS(base, len, 0, true), 0);
  return end >= 0 && skipWS(base, len, end, true) == len;
}

/** Whether text is a JSON object. */
export function jsonIsObject(text: string): bool {
  return jsonValid(text) && text.charCodeAt(skipWS(changetype<usize>(text), text.length, 0, true)) == 123;
}

/** The JSON text of the value at path in an object, or null. */
export function jsonGet(text: string, path: string): string | null {
  const i = jsonFind(text, path);
  if (i < 0) return null;
  return text.substring(i, skipValue(changetype<usize>(text), text.length, i, true));
}

/** The string at path, or null (absent, or not a string). */
export function jsonGetString(text: string, path: string): string | null {
  const raw = jsonGet(text, path);
  return raw != null && raw.startsWith('"') ? jsonDecodeString(raw) : null;
}

/** The number at path, or NaN (absent, null or not a number). */
export function jsonGetNumber(text: string, path: string): f64 {
  const raw = jsonGet(text, path);
  if (raw == null || raw.length == 0) return NaN;
  const c = raw.charCodeAt(0);
  return c == 45 || (c >= 48 && c <= 57) ? parseFloat(raw) : NaN;
}

/** The boolean at path (false when absent). */
export function jsonGetBool(text: string, path: string): bool {
  const raw = jsonGet(text, path);
  return raw != null && raw == "true";
}

/** The items of a JSON array, each as JSON text. */
export function jsonItems(array: string): string[] {
  const out = new Array<string>();
  const base = changetype<usize>(array), len = array.length;
  let i = skipWS(base, len, 0, true);
  if (i >= len || array.charCodeAt(i) != 91) return out;
  i = skipWS(base, len, i + 1, true);
  while (i < len && array.charCodeAt(i) != 93) {
    const end = skipValue(base, len, i, true);
    if (end < 0) break;
    out.push(array.substring(i, end));
    i = skipWS(base, len, end, true);
    if (i < len && array.charCodeAt(i) == 44) i = skipWS(base, len, i + 1, true);
  }
  return out;
}

/** The entries of a JSON object: key, value JSON text, key, value, ... */
export function jsonEntries(object: string): string[] {
  const out = new Array<string>();
  const base = changetype<usize>(object), len = object.length;
  let i = skipWS(base, len, 0, true);
  if (i >= len || object.charCodeAt(i) != 123) return out;
  i = skipWS(base, len, i + 1, true);
  while (i < len && object.charCodeAt(i) != 125) {
    const keyEnd = skipValue(base, len, i, true);
    if (keyEnd < 0 || object.charCodeAt(i) != 34) break;
    const key = jsonDecodeString(object.substring(i, keyEnd));
    i = skipWS(base, len, keyEnd, true);
    if (i >= len || object.charCodeAt(i) != 58) break;
    i = skipWS(base, len, i + 1, true);
    const end = skipValue(base, len, i, true);
    if (end < 0 || key == null) break;
    out.push(key);
    out.push(object.substring(i, end));
    i = skipWS(base, len, end, true);
    if (i < len && object.charCodeAt(i) == 44) i = skipWS(base, len, i + 1, true);
  }
  return out;
}

/** Decodes a JSON string literal (with its quotes); null when malformed. */
export function jsonDecodeString(raw: string): string | null {
  const n = raw.length;
  if (n < 2 || raw.charCodeAt(0) != 34 || raw.charCodeAt(n - 1) != 34) return null;
  if (raw.indexOf("\\") < 0) return raw.substring(1, n - 1);
  const parts = new Array<string>();
  let from = 1;
  let i = 1;
  while (i < n - 1) {
    if (raw.charCodeAt(i) != 92) { i++; continue; }
    parts.push(raw.substring(from, i));
    const e = raw.charCodeAt(i + 1);
    if (e == 117) { // \uXXXX: a UTF-16 unit, which is what AssemblyScript strings hold
      let v = 0;
      for (let k = i + 2; k < i + 6; k++) {
        const h = k < n - 1 ? raw.charCodeAt(k) : 0;
        const d = isDigit(h) ? h - 48 : (h | 32) >= 97 && (h | 32) <= 102 ? (h | 32) - 87 : -1;
        if (d < 0) return null;
        v = (v << 4) | d;
      }
      parts.push(String.fromCharCode(v));
      i += 6;
    } else {
      const k = "\"\\/bfnrt".indexOf(String.fromCharCode(e));
      if (k < 0) return null;
      parts.push("\"\\/\b\f\n\r\t".charAt(k));
      i += 2;
    }
    from = i;
  }
  parts.push(raw.substring(from, n - 1));
  return parts.join("");
}

// Index of the value at a dotted path in an object, or -1.
function jsonFind(text: string, path: string): i32 {
  const base = changetype<usize>(text), len = text.length;
  const keys = path.split(".");
  let i = skipWS(base, len, 0, true);
  for (let k = 0; k < keys.length; k++) {
    if (i >= len || text.charCodeAt(i) != 123) return -1;
    i = skipWS(base, len, i + 1, true);
    let found = false;
    while (i < len && text.charCodeAt(i) != 125) {
      const keyEnd = skipValue(base, len, i, true);
      if (keyEnd < 0 || text.charCodeAt(i) != 34) return -1;
      const key = jsonDecodeString(text.substring(i, keyEnd));
      i = skipWS(base, len, keyEnd, true);
      if (i >= len || text.charCodeAt(i) != 58) return -1;
      i = skipWS(base, len, i + 1, true);
      if (key != null && key == keys[k]) { found = true; break; }
      i = skipValue(base, len, i, true);
      if (i < 0) return -1;
      i = skipWS(base, len, i, true);
      if (i < len && text.charCodeAt(i) == 44) i = skipWS(base, len, i + 1, true);
    }
    if (!found) return -1;
  }
  return i;
}

// The scanner reads UTF-8 bytes (wide = false: the request in memory) or
// UTF-16 units (wide = true: a string); JSON's structure is ASCII either way.
// @ts-ignore: decorator
@inline function at(base: usize, i: i32, wide: bool): u32 {
  return wide ? <u32>load<u16>(base + (<usize>i << 1)) : <u32>load<u8>(base + <usize>i);
}

function isWS(c: u32): bool { return c == 32 || c == 10 || c == 13 || c == 9; }

function skipWS(base: usize, len: i32, i: i32, wide: bool): i32 {
  while (i < len && isWS(at(base, i, wide))) i++;
  return i;
}

// Index just past the value starting at i, or -1 (structure only, not a validator).
function skipValue(base: usize, len: i32, i: i32, wide: bool): i32 {
  let depth = 0;
  while (i < len) {
    const c = at(base, i, wide);
    if (c == 34) { // "
      i++;
      while (i < len && at(base, i, wide) != 34) i += at(base, i, wide) == 92 ? 2 : 1;
      if (i >= len) return -1;
      i++;
      if (depth == 0) return i;
      continue;
    }
    if (c == 123 || c == 91) depth++;
    else if (c == 125 || c == 93) {
      if (depth == 0) return i;
      if (--depth == 0) return i + 1;
    } else if (depth == 0 && (c == 44 || c == 58 || isWS(c))) return i;
    i++;
  }
  return depth == 0 ? i : -1;
}

function validValue(base: usize, len: i32, i: i32, depth: i32): i32 {
  if (i >= len || depth > 512) return -1;
  const c = at(base, i, true);
  if (c == 123 || c == 91) {
    const close: u32 = c == 123 ? 125 : 93;
    i = skipWS(base, len, i + 1, true);
    if (i < len && at(base, i, true) == close) return i + 1;
    while (true) {
      if (c == 123) {
        if (i >= len || at(base, i, true) != 34) return -1;
        i = validValue(base, len, i, depth + 1);
        if (i < 0) return -1;
        i = skipWS(base, len, i, true);
        if (i >= len || at(base, i, true) != 58) return -1;
        i = skipWS(base, len, i + 1, true);
      }
      i = validValue(base, len, i, depth + 1);
      if (i < 0) return -1;
      i = skipWS(base, len, i, true);
      if (i >= len) return -1;
      const d = at(base, i, true);
      if (d == close) return i + 1;
      if (d != 44) return -1;
      i = skipWS(base, len, i + 1, true);
    }
  }
  if (c == 34) {
    i++;
    while (i < len) {
      const d = at(base, i, true);
      if (d == 34) return i + 1;
      if (d < 32) return -1;
      if (d == 92) {
        const e = i + 1 < len ? at(base, i + 1, true) : 0;
        if (e == 117) {
          for (let k = i + 2; k < i + 6; k++) {
            const h = k < len ? at(base, k, true) : 0;
            if (!((h >= 48 && h <= 57) || (h >= 65 && h <= 70) || (h >= 97 && h <= 102))) return -1;
          }
          i += 6;
          continue;
        }
        if (e != 34 && e != 92 && e != 47 && e != 98 && e != 102 && e != 110 && e != 114 && e != 116) return -1;
        i += 2;
        continue;
      }
      i++;
    }
    return -1;
  }
  if (matchWord(base, len, i, "true")) return i + 4;
  if (matchWord(base, len, i, "false")) return i + 5;
  if (matchWord(base, len, i, "null")) return i + 4;
  // number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  let j = i;
  if (j < len && at(base, j, true) == 45) j++;
  if (j >= len) return -1;
  if (at(base, j, true) == 48) j++;
  else if (isDigit(at(base, j, true))) while (j < len && isDigit(at(base, j, true))) j++;
  else return -1;
  if (j < len && at(base, j, true) == 46) {
    j++;
    if (j >= len || !isDigit(at(base, j, true))) return -1;
    while (j < len && isDigit(at(base, j, true))) j++;
  }
  if (j < len && (at(base, j, true) | 32) == 101) {
    j++;
    if (j < len && (at(base, j, true) == 43 || at(base, j, true) == 45)) j++;
    if (j >= len || !isDigit(at(base, j, true))) return -1;
    while (j < len && isDigit(at(base, j, true))) j++;
  }
  return j;
}

function isDigit(c: u32): bool { return c >= 48 && c <= 57; }

function matchWord(base: usize, len: i32, i: i32, word: string): bool {
  if (i + word.length > len) return false;
  for (let k = 0; k < word.length; k++) {
    if (at(base, i + k, true) != <u32>word.charCodeAt(k)) return false;
  }
  return true;
}
