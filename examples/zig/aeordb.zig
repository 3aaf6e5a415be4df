//! aeordb.zig: the aeordb plugin kit for Zig (wasm32-freestanding, no libc).
//! Copy this one file next to your plugin; see ../README.md for the ABI it hides.
//!
//!     const aeordb = @import("aeordb.zig");
//!     comptime { aeordb.serve(handle); }
//!     fn handle(req: aeordb.Request) aeordb.Response {
//!         return aeordb.Response.text(200, "hello");
//!     }
//!
//! Build (pip install ziglang==0.17.1):
//!        python -m ziglang build-exe plugin.zig -target wasm32-freestanding
//!        -O ReleaseSmall -fno-entry -rdynamic -fstrip
//!
//! The kit exports `memory`, `alloc` (a bump allocator: a fresh instance
//! serves every call, so nothing is ever freed) and `handle` (the AeorDB
//! envelope, spoken by AeorDB and aeordb.py alike).
//!
//! Opt-in raw entry point, ONLY aeordb.py has it (AeorDB does not): write
//! `comptime { aeordb.serveRaw(handleRaw); }` with
//! `fn handleRaw(body: []const u8) []const u8` instead of `serve`; the
//! body arrives as raw bytes, read the metadata with `context()`, and call
//! `setResponse(status, content_type, headers)` before returning (default
//! 200 application/octet-stream).
//!
//! Host answers are JSON text; `field`, `string`, `int` and `items` below
//! pull values out of it. File bytes travel base64-encoded: the kit does it.
const std = @import("std");

// ---- memory: a bump allocator over memory.grow ---------------------------

var heap_next: usize = 0;
var heap_end: usize = 0;

/// `size` fresh bytes that live until the call ends (traps when out of memory).
pub fn allocBytes(size: usize) []u8 {
    const n = (size + 7) & ~@as(usize, 7);
    if (heap_end - heap_next < n) {
        const pages = (n >> 16) + 1;
        const old = @wasmMemoryGrow(0, pages);
        if (old < 0) @trap();
        const start = @as(usize, @intCast(old)) << 16;
        if (start != heap_end) heap_next = start;
        heap_end = start + (pages << 16);
    }
    const at = heap_next;
    heap_next += n;
    const p: [*]u8 = @ptrFromInt(at);
    return p[0..size];
}

fn allocExport(size: usize) callconv(.c) usize {
    return @intFromPtr(allocBytes(size).ptr);
}

fn pack(s: []const u8) i64 {
    return @bitCast((@as(u64, @intFromPtr(s.ptr)) << 32) | s.len);
}

fn unpack(r: i64) []u8 {
    const v: u64 = @bitCast(r);
    const at: usize = @intCast(v >> 32);
    if (at == 0) return &.{};
    const p: [*]u8 = @ptrFromInt(at);
    return p[0..@as(usize, @intCast(v & 0xffff_ffff))];
}

fn guestSlice(ptr: usize, len: usize) []u8 {
    if (ptr == 0) return &.{};
    const p: [*]u8 = @ptrFromInt(ptr);
    return p[0..len];
}

pub fn eql(a: []const u8, b: []const u8) bool {
    return std.mem.eql(u8, a, b);
}

// ---- a growable byte buffer that writes JSON ------------------------------

pub const Buf = struct {
    ptr: [*]u8 = undefined,
    len: usize = 0,
    cap: usize = 0,

    pub fn slice(self: *const Buf) []u8 {
        return self.ptr[0..self.len];
    }
    pub fn reserve(self: *Buf, extra: usize) void {
        if (self.cap - self.len >= extra) return;
        const want = @max(self.cap * 2, self.len + extra, 64);
        const mem = allocBytes(want);
        if (self.len > 0) @memcpy(mem[0..self.len], self.ptr[0..self.len]);
        self.ptr = mem.ptr;
        self.cap = want;
    }
    pub fn raw(self: *Buf, s: []const u8) void {
        self.reserve(s.len);
        @memcpy(self.ptr[self.len..][0..s.len], s);
        self.len += s.len;
    }
    pub fn byte(self: *Buf, c: u8) void {
        self.reserve(1);
        self.ptr[self.len] = c;
        self.len += 1;
    }
    /// A decimal integer, zero-padded to `width` digits.
    pub fn intPad(self: *Buf, v: i64, width: usize) void {
        var tmp: [24]u8 = undefined;
        var i: usize = tmp.len;
        var u: u64 = @abs(v);
        while (true) {
            i -= 1;
            tmp[i] = @intCast('0' + u % 10);
            u /= 10;
            if (u == 0 and tmp.len - i >= width) break;
        }
        if (v < 0) self.byte('-');
        self.raw(tmp[i..]);
    }
    pub fn int(self: *Buf, v: i64) void {
        self.intPad(v, 1);
    }
    /// A JSON string: quotes, backslashes and control characters escaped, UTF-8 kept.
    pub fn str(self: *Buf, s: []const u8) void {
        self.byte('"');
        for (s) |c| {
            switch (c) {
                '"' => self.raw("\\\""),
                '\\' => self.raw("\\\\"),
                '\n' => self.raw("\\n"),
                '\r' => self.raw("\\r"),
                '\t' => self.raw("\\t"),
                0...8, 11, 12, 14...0x1f => {
                    self.raw("\\u00");
                    self.byte("0123456789abcdef"[c >> 4]);
                    self.byte("0123456789abcdef"[c & 15]);
                },
                else => self.byte(c),
            }
        }
        self.byte('"');
    }
};

/// The concatenation of `parts` (e.g. a log line).
pub fn concat(parts: []const []const u8) []u8 {
    var b = Buf{};
    for (parts) |p| b.raw(p);
    return b.slice();
}

// ---- a small JSON reader over raw text ------------------------------------

fn isWs(c: u8) bool {
    return c == ' ' or c == '\n' or c == '\r' or c == '\t';
}
fn skipWs(s: []const u8, from: usize) usize {
    var i = from;
    while (i < s.len and isWs(s[i])) i += 1;
    return i;
}
fn skipString(s: []const u8, from: usize) ?usize {
    var i = from + 1;
    while (i < s.len) : (i += 1) {
        if (s[i] == '\\') {
            i += 1;
        } else if (s[i] == '"') return i + 1;
    }
    return null;
}
/// The end of the JSON value starting at (or after whitespace from) `from`.
fn skipValue(s: []const u8, from: usize) ?usize {
    var i = skipWs(s, from);
    if (i >= s.len) return null;
    switch (s[i]) {
        '"' => return skipString(s, i),
        '{', '[' => {
            var depth: usize = 0;
            while (i < s.len) {
                const c = s[i];
                if (c == '"') {
                    i = skipString(s, i) orelse return null;
                    continue;
                }
                if (c == '{' or c == '[') depth += 1;
                if (c == '}' or c == ']') {
                    depth -= 1;
                    if (depth == 0) return i + 1;
                }
                i += 1;
            }
            return null;
        },
        else => {
            while (i < s.len and !isWs(s[i]) and s[i] != ',' and s[i] != '}' and s[i] != ']') i += 1;
            return i;
        },
    }
}

/// The raw JSON text of `key`'s value in the object `obj`, or null.
pub fn field(obj: []const u8, key: []const u8) ?[]const u8 {
    var i = skipWs(obj, 0);
    if (i >= obj.len or obj[i] != '{') return null;
    i += 1;
    while (true) {
        i = skipWs(obj, i);
        if (i >= obj.len or obj[i] != '"') return null;
        const key_at = i + 1;
        const kend = skipString(obj, i) orelse return null;
        i = skipWs(obj, kend);
        if (i >= obj.len or obj[i] != ':') return null;
        const vs = skipWs(obj, i + 1);
        const ve = skipValue(obj, vs) orelse return null;
        if (eql(obj[key_at .. kend - 1], key)) return obj[vs..ve];
        i = skipWs(obj, ve);
        if (i < obj.len and obj[i] == ',') i += 1;
    }
}

/// The decoded JSON string `raw` (with its quotes), or null when it is not a string.
pub fn string(raw: []const u8) ?[]const u8 {
    if (raw.len < 2 or raw[0] != '"' or raw[raw.len - 1] != '"') return null;
    const s = raw[1 .. raw.len - 1];
    if (std.mem.indexOfScalar(u8, s, '\\') == null) return s;
    var b = Buf{};
    b.reserve(s.len);
    var i: usize = 0;
    while (i < s.len) : (i += 1) {
        if (s[i] != '\\' or i + 1 >= s.len) {
            b.byte(s[i]);
            continue;
        }
        i += 1;
        switch (s[i]) {
            'n' => b.byte('\n'),
            'r' => b.byte('\r'),
            't' => b.byte('\t'),
            'b' => b.byte(8),
            'f' => b.byte(12),
            'u' => {
                var cp: u21 = hex4(s, i + 1) orelse return null;
                i += 4;
                if (cp >= 0xd800 and cp < 0xdc00 and i + 6 < s.len and s[i + 1] == '\\' and s[i + 2] == 'u') {
                    if (hex4(s, i + 3)) |lo| if (lo >= 0xdc00 and lo < 0xe000) {
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        i += 6;
                    };
                }
                var enc: [4]u8 = undefined;
                const n = std.unicode.utf8Encode(cp, &enc) catch 0;
                b.raw(enc[0..n]);
            },
            else => |c| b.byte(c),
        }
    }
    return b.slice();
}
fn hex4(s: []const u8, at: usize) ?u21 {
    if (at + 4 > s.len) return null;
    var v: u21 = 0;
    for (s[at .. at + 4]) |c| {
        const d: u21 = switch (c) {
            '0'...'9' => c - '0',
            'a'...'f' => c - 'a' + 10,
            'A'...'F' => c - 'A' + 10,
            else => return null,
        };
        v = v * 16 + d;
    }
    return v;
}

/// The integer part of the JSON number `raw`, or null (null, strings, ...).
pub fn int(raw: []const u8) ?i64 {
    var i: usize = 0;
    const neg = raw.len > 0 and raw[0] == '-';
    if (neg) i = 1;
    if (i >= raw.len or raw[i] < '0' or raw[i] > '9') return null;
    var v: i64 = 0;
    while (i < raw.len and raw[i] >= '0' and raw[i] <= '9') : (i += 1) v = v *% 10 +% (raw[i] - '0');
    return if (neg) -v else v;
}

/// Iterates the raw values of the JSON array `raw` (empty when it is not one).
pub const Items = struct {
    s: []const u8,
    i: usize,
    pub fn next(self: *Items) ?[]const u8 {
        self.i = skipWs(self.s, self.i);
        if (self.i >= self.s.len or self.s[self.i] == ']') return null;
        const start = self.i;
        const end = skipValue(self.s, start) orelse return null;
        self.i = skipWs(self.s, end);
        if (self.i < self.s.len and self.s[self.i] == ',') self.i += 1;
        return self.s[start..end];
    }
};
pub fn items(raw: []const u8) Items {
    const i = skipWs(raw, 0);
    if (i >= raw.len or raw[i] != '[') return .{ .s = "", .i = 0 };
    return .{ .s = raw, .i = i + 1 };
}

// ---- base64 ----------------------------------------------------------------

const b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64Encode(b: *Buf, data: []const u8) void {
    b.reserve((data.len + 2) / 3 * 4);
    var i: usize = 0;
    while (i < data.len) : (i += 3) {
        const n = @min(3, data.len - i);
        var v: u32 = @as(u32, data[i]) << 16;
        if (n > 1) v |= @as(u32, data[i + 1]) << 8;
        if (n > 2) v |= data[i + 2];
        b.byte(b64[v >> 18]);
        b.byte(b64[(v >> 12) & 63]);
        b.byte(if (n > 1) b64[(v >> 6) & 63] else '=');
        b.byte(if (n > 2) b64[v & 63] else '=');
    }
}

pub fn base64Decode(text: []const u8) []u8 {
    const out = allocBytes(text.len / 4 * 3 + 3);
    var n: usize = 0;
    var acc: u32 = 0;
    var bits: u5 = 0;
    for (text) |c| {
        const d: u32 = switch (c) {
            'A'...'Z' => c - 'A',
            'a'...'z' => c - 'a' + 26,
            '0'...'9' => c - '0' + 52,
            '+', '-' => 62,
            '/', '_' => 63,
            else => continue,
        };
        acc = (acc << 6) | d;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n] = @truncate(acc >> bits);
            n += 1;
        }
    }
    return out[0..n];
}

// ---- the request and the response -----------------------------------------

pub const Request = struct {
    /// The HTTP body's bytes.
    body: []const u8,
    /// The raw JSON object of the metadata (strings to strings).
    metadata: []const u8,

    /// A metadata value, "" when absent.
    pub fn meta(self: Request, key: []const u8) []const u8 {
        const raw = field(self.metadata, key) orelse return "";
        return string(raw) orelse "";
    }
    /// The function called: `function_name`, else `name`.
    pub fn function(self: Request) []const u8 {
        const f = self.meta("function_name");
        return if (f.len > 0) f else self.meta("name");
    }
    pub fn contentType(self: Request) []const u8 {
        return self.meta("content_type");
    }
};

pub const Header = struct { name: []const u8, value: []const u8 };

pub const Response = struct {
    status: u16 = 200,
    content_type: []const u8 = "application/octet-stream",
    body: []const u8 = "",
    headers: [16]Header = undefined,
    n_headers: usize = 0,

    pub fn bytes(status: u16, content_type: []const u8, body: []const u8) Response {
        return .{ .status = status, .content_type = content_type, .body = body };
    }
    pub fn text(status: u16, body: []const u8) Response {
        return bytes(status, "text/plain; charset=utf-8", body);
    }
    /// `body` is JSON text (build it with Buf).
    pub fn json(status: u16, body: []const u8) Response {
        return bytes(status, "application/json", body);
    }
    /// Only x-*, cache-control, etag, last-modified, content-disposition,
    /// content-language, content-encoding and vary are forwarded.
    pub fn header(self: *Response, name: []const u8, value: []const u8) void {
        if (self.n_headers < self.headers.len) {
            self.headers[self.n_headers] = .{ .name = name, .value = value };
            self.n_headers += 1;
        }
    }
};

/// Decodes the envelope; the byte array is decoded in place (it only shrinks).
fn parseEnvelope(buf: []u8) Request {
    var req = Request{ .body = "", .metadata = "{}" };
    var i = skipWs(buf, 0);
    if (i >= buf.len or buf[i] != '{') return req;
    i += 1;
    while (true) {
        i = skipWs(buf, i);
        if (i >= buf.len or buf[i] != '"') break;
        const kend = skipString(buf, i) orelse break;
        const key = buf[i + 1 .. kend - 1];
        i = skipWs(buf, kend);
        if (i >= buf.len or buf[i] != ':') break;
        i = skipWs(buf, i + 1);
        if (eql(key, "arguments") and i < buf.len and buf[i] == '[') {
            const start = i;
            var w = i;
            i += 1;
            while (i < buf.len and buf[i] != ']') {
                var c = buf[i];
                if (c < '0' or c > '9') {
                    i += 1;
                    continue;
                }
                var v: u32 = 0;
                while (c >= '0' and c <= '9') {
                    v = v * 10 + (c - '0');
                    i += 1;
                    c = if (i < buf.len) buf[i] else 0;
                }
                buf[w] = @truncate(v);
                w += 1;
            }
            req.body = buf[start..w];
            i += 1;
        } else {
            const end = skipValue(buf, i) orelse break;
            if (eql(key, "metadata")) req.metadata = buf[i..end];
            i = end;
        }
        i = skipWs(buf, i);
        if (i < buf.len and buf[i] == ',') i += 1 else break;
    }
    return req;
}

fn envelope(res: *const Response) []const u8 {
    var b = Buf{};
    b.reserve(256 + res.content_type.len + res.body.len * 4);
    b.raw("{\"status_code\":");
    b.int(res.status);
    b.raw(",\"content_type\":");
    b.str(res.content_type);
    b.raw(",\"headers\":{");
    for (res.headers[0..res.n_headers], 0..) |h, k| {
        if (k > 0) b.byte(',');
        b.str(h.name);
        b.byte(':');
        b.str(h.value);
    }
    b.raw("},\"body\":[");
    b.reserve(res.body.len * 4 + 2);
    var p = b.ptr + b.len;
    for (res.body) |c| {
        if (c >= 100) {
            p[0] = '0' + c / 100;
            p += 1;
        }
        if (c >= 10) {
            p[0] = '0' + (c / 10) % 10;
            p += 1;
        }
        p[0] = '0' + c % 10;
        p[1] = ',';
        p += 2;
    }
    b.len = @intFromPtr(p) - @intFromPtr(b.ptr);
    if (res.body.len > 0) b.len -= 1; // the last comma
    b.raw("]}");
    return b.slice();
}

/// Exports `alloc` and `handle` (the envelope entry point) calling `handler`.
pub fn serve(comptime handler: fn (Request) Response) void {
    const S = struct {
        fn handle(ptr: usize, len: usize) callconv(.c) i64 {
            const res = handler(parseEnvelope(guestSlice(ptr, len)));
            return pack(envelope(&res));
        }
    };
    @export(&allocExport, .{ .name = "alloc" });
    @export(&S.handle, .{ .name = "handle" });
}

/// aeordb.py only: exports `alloc` and `handle_raw`, which gets the body's
/// raw bytes and answers raw bytes (see setResponse).
pub fn serveRaw(comptime handler: fn ([]const u8) []const u8) void {
    const S = struct {
        fn handle_raw(ptr: usize, len: usize) callconv(.c) i64 {
            return pack(handler(guestSlice(ptr, len)));
        }
    };
    @export(&allocExport, .{ .name = "alloc" });
    @export(&S.handle_raw, .{ .name = "handle_raw" });
}

// ---- host functions ---------------------------------------------------------

extern "aeordb" fn aeordb_read_file(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_write_file(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_delete_file(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_file_metadata(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_list_directory(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_extract_file(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_query(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_aggregate(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_context(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn aeordb_set_response(ptr: [*]const u8, len: usize) i64;
extern "aeordb" fn log_message(lp: [*]const u8, ll: usize, mp: [*]const u8, ml: usize) void;

pub const Error = error{HostError};
/// Why the last host function failed (its `{"error": ...}` message).
pub var last_error: []const u8 = "";

fn call(comptime f: anytype, args: []const u8) Error![]const u8 {
    const ans = unpack(f(args.ptr, args.len));
    if (field(ans, "error")) |e| {
        last_error = string(e) orelse e;
        return error.HostError;
    }
    return ans;
}
fn pathArgs(path: []const u8) []const u8 {
    var b = Buf{};
    b.raw("{\"path\":");
    b.str(path);
    b.byte('}');
    return b.slice();
}

pub const File = struct { data: []const u8, content_type: []const u8 };

pub fn readFile(path: []const u8) Error!File {
    const ans = try call(aeordb_read_file, pathArgs(path));
    return .{
        .data = base64Decode(string(field(ans, "data") orelse "\"\"") orelse ""),
        .content_type = string(field(ans, "content_type") orelse "\"\"") orelse "",
    };
}
/// `content_type` "" lets the server guess.
pub fn writeFile(path: []const u8, data: []const u8, content_type: []const u8) Error!void {
    var b = Buf{};
    b.raw("{\"path\":");
    b.str(path);
    if (content_type.len > 0) {
        b.raw(",\"content_type\":");
        b.str(content_type);
    }
    b.raw(",\"data\":\"");
    base64Encode(&b, data);
    b.raw("\"}");
    _ = try call(aeordb_write_file, b.slice());
}
pub fn deleteFile(path: []const u8) Error!void {
    _ = try call(aeordb_delete_file, pathArgs(path));
}
/// `{"path","size","content_type","created_at","updated_at","etag"}`
pub fn fileMetadata(path: []const u8) Error![]const u8 {
    return call(aeordb_file_metadata, pathArgs(path));
}
/// `{"entries":[{"name","type","size"}]}`
pub fn listDirectory(path: []const u8) Error![]const u8 {
    return call(aeordb_list_directory, pathArgs(path));
}
/// mode: "lines", "chars" or "bytes"; null start/end: the whole file.
pub fn extractFile(path: []const u8, mode: []const u8, start: ?i64, end: ?i64) Error![]const u8 {
    var b = Buf{};
    b.raw("{\"path\":");
    b.str(path);
    b.raw(",\"mode\":");
    b.str(mode);
    if (start) |s| {
        b.raw(",\"start\":");
        b.int(s);
    }
    if (end) |e| {
        b.raw(",\"end\":");
        b.int(e);
    }
    b.byte('}');
    return call(aeordb_extract_file, b.slice());
}
/// `query_json`: `{"path","where","order_by","limit","offset","include_total"}`; answers `{"items":[...],...}`.
pub fn query(query_json: []const u8) Error![]const u8 {
    return call(aeordb_query, query_json);
}
/// A query with `"aggregate": {...}`; answers `{"count","sum","avg","min","max","groups",...}`.
pub fn aggregate(query_json: []const u8) Error![]const u8 {
    return call(aeordb_aggregate, query_json);
}
/// The request metadata plus "db" and "remaining_ms" (aeordb.py only).
pub fn context() Error![]const u8 {
    return call(aeordb_context, "{}");
}
/// level: "debug", "info", "warn" or "error".
pub fn log(level: []const u8, message: []const u8) void {
    log_message(level.ptr, level.len, message.ptr, message.len);
}
/// Raw entry point only (aeordb.py only): the status, content type and headers of the raw answer.
pub fn setResponse(status: u16, content_type: []const u8, headers: []const Header) Error!void {
    var b = Buf{};
    b.raw("{\"status_code\":");
    b.int(status);
    b.raw(",\"content_type\":");
    b.str(content_type);
    b.raw(",\"headers\":{");
    for (headers, 0..) |h, k| {
        if (k > 0) b.byte(',');
        b.str(h.name);
        b.byte(':');
        b.str(h.value);
    }
    b.raw("}}");
    _ = unpack(aeordb_set_response(b.ptr, b.len));
}
