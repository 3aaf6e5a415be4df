//! aeordb.rs: the aeordb plugin kit for Rust (no dependencies; Rust 1.63+).
//! Copy this one file next to your plugin's crate root and declare it as
//! `mod aeordb;` (the macros expect that name). ../README.md is the ABI it hides.
//!
//! ```ignore
//! mod aeordb;
//! aeordb::serve!(handle);
//! fn handle(req: aeordb::Request) -> aeordb::Response {
//!     aeordb::Response::text(200, "hello")
//! }
//! ```
//!
//! Build (wasm32-wasi, so std and eprintln! work; rustup calls it wasm32-wasip1):
//!   rustc --edition 2021 --crate-type cdylib --target wasm32-wasi -C opt-level=s \
//!         -C strip=symbols -C linker=wasm-ld-14 plugin.rs -o plugin.wasm
//! A WASI build needs a server that provides WASI (aeordb.py does; AeorDB not).
//! The kit itself needs no WASI: built with `--target wasm32-unknown-unknown`
//! (same command; Debian's libstd-rust-dev-wasm32 has that std too) a plugin
//! imports only "aeordb" and runs on AeorDB as well; eprintln! then prints nothing.
//!
//! `serve!` exports `alloc` (std's allocator, never freed: a fresh instance
//! serves every call) and `handle` (the AeorDB envelope, spoken by
//! AeorDB and aeordb.py alike).
//!
//! Opt-in raw entry point, ONLY aeordb.py has it (AeorDB does not):
//! `aeordb::serve_raw!(handle_raw)` with `fn handle_raw(body: &[u8]) -> Vec<u8>`
//! instead of `serve!`: the body arrives as raw bytes, the metadata comes from
//! `context()`, the answer is the raw body; call `set_response` to choose
//! status, content type and headers (default 200 application/octet-stream).
//!
//! Host answers are parsed into `Value` (a tiny JSON type: `get`, `as_str`,
//! `as_i64`, `as_array`, `Display` writes compact JSON). File bytes travel
//! base64-encoded: the kit does it.
#![allow(dead_code)]

use std::fmt;

// ---- entry points ---------------------------------------------------------

/// Exports `alloc` and `handle`, which decodes the envelope and calls `$f(Request) -> Response`.
#[macro_export]
macro_rules! aeordb_serve {
    ($f:path) => { const _: () = {
        #[export_name = "alloc"]
        pub extern "C" fn __aeordb_alloc(size: usize) -> *mut u8 {
            $crate::aeordb::alloc_bytes(size)
        }
        #[export_name = "handle"]
        pub extern "C" fn __aeordb_handle(ptr: *mut u8, len: usize) -> i64 {
            $crate::aeordb::handle_envelope(ptr, len, $f)
        }
    }; };
}
#[allow(unused_imports)]
pub(crate) use aeordb_serve as serve;

/// aeordb.py only: exports `alloc` and `handle_raw`, calling `$f(&[u8]) -> Vec<u8>`.
#[macro_export]
macro_rules! aeordb_serve_raw {
    ($f:path) => { const _: () = {
        #[export_name = "alloc"]
        pub extern "C" fn __aeordb_alloc(size: usize) -> *mut u8 {
            $crate::aeordb::alloc_bytes(size)
        }
        #[export_name = "handle_raw"]
        pub extern "C" fn __aeordb_handle_raw(ptr: *mut u8, len: usize) -> i64 {
            let out: Vec<u8> = $f($crate::aeordb::guest_slice(ptr, len));
            $crate::aeordb::leak(out)
        }
    }; };
}
#[allow(unused_imports)]
pub(crate) use aeordb_serve_raw as serve_raw;

// ---- memory -----------------------------------------------------------------

/// Memory for what the host places (the request, host answers), never freed:
/// a fresh instance serves every call. It comes from std's allocator: on
/// wasm32-wasi that is wasi-libc's malloc, which claims all memory above
/// `__heap_base` when first used, so a separate memory.grow bump allocator
/// would collide with it.
#[doc(hidden)]
pub fn alloc_bytes(size: usize) -> *mut u8 {
    let layout = std::alloc::Layout::from_size_align(size + 1, 8).expect("alloc size");
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    p
}

#[doc(hidden)]
pub fn guest_slice(ptr: *mut u8, len: usize) -> &'static mut [u8] {
    if ptr.is_null() || len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}

#[doc(hidden)]
pub fn leak(out: Vec<u8>) -> i64 {
    let out = out.leak();
    (((out.as_ptr() as u64) << 32) | out.len() as u64) as i64
}

// ---- request and response -----------------------------------------------------

pub struct Request {
    /// The HTTP body's bytes.
    pub body: &'static [u8],
    /// The metadata (strings to strings).
    pub metadata: Value,
}

impl Request {
    /// A metadata value, "" when absent.
    pub fn meta(&self, key: &str) -> &str {
        self.metadata.get(key).as_str().unwrap_or("")
    }
    /// The function called: `function_name`, else `name`.
    pub fn function(&self) -> &str {
        match self.meta("function_name") {
            "" => self.meta("name"),
            f => f,
        }
    }
    pub fn content_type(&self) -> &str {
        self.meta("content_type")
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: String,
    /// Only x-*, cache-control, etag, last-modified, content-disposition,
    /// content-language, content-encoding and vary are forwarded.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn bytes(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response { status, content_type: content_type.to_string(), headers: Vec::new(), body: body.into() }
    }
    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Response::bytes(status, "text/plain; charset=utf-8", text.into())
    }
    /// `body`: a `Value`, or JSON text.
    pub fn json(status: u16, body: impl fmt::Display) -> Response {
        Response::bytes(status, "application/json", body.to_string())
    }
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// Decodes the envelope; the byte array is decoded in place (it only shrinks).
#[doc(hidden)]
pub fn handle_envelope(ptr: *mut u8, len: usize, f: fn(Request) -> Response) -> i64 {
    let buf = guest_slice(ptr, len);
    let (mut body_at, mut body_len) = (0, 0);
    let mut metadata = Value::Null;
    let mut i = ws(buf, 0);
    if i < buf.len() && buf[i] == b'{' {
        i += 1;
        loop {
            i = ws(buf, i);
            if i >= buf.len() || buf[i] != b'"' {
                break;
            }
            let kend = match skip_string(buf, i) { Some(e) => e, None => break };
            let key = (i + 1, kend - 1);
            i = ws(buf, kend);
            if i >= buf.len() || buf[i] != b':' {
                break;
            }
            i = ws(buf, i + 1);
            if &buf[key.0..key.1] == b"arguments" && i < buf.len() && buf[i] == b'[' {
                let mut w = i;
                body_at = i;
                i += 1;
                while i < buf.len() && buf[i] != b']' {
                    if !buf[i].is_ascii_digit() {
                        i += 1;
                        continue;
                    }
                    let mut v: u32 = 0;
                    while i < buf.len() && buf[i].is_ascii_digit() {
                        v = v * 10 + (buf[i] - b'0') as u32;
                        i += 1;
                    }
                    buf[w] = v as u8;
                    w += 1;
                }
                body_len = w - body_at;
                i += 1;
            } else {
                let end = match skip_value(buf, i) { Some(e) => e, None => break };
                if &buf[key.0..key.1] == b"metadata" {
                    metadata = Value::parse_bytes(&buf[i..end]).unwrap_or(Value::Null);
                }
                i = end;
            }
            i = ws(buf, i);
            if i < buf.len() && buf[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
    }
    let body: &'static [u8] = if body_len == 0 { &[] } else { &guest_slice(ptr, len)[body_at..body_at + body_len] };
    let res = f(Request { body, metadata });
    leak(envelope(&res))
}

fn envelope(res: &Response) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + res.content_type.len() + res.body.len() * 4);
    out.extend_from_slice(b"{\"status_code\":");
    out.extend_from_slice(res.status.to_string().as_bytes());
    out.extend_from_slice(b",\"content_type\":");
    write_str(&mut out, &res.content_type);
    out.extend_from_slice(b",\"headers\":{");
    for (k, (name, value)) in res.headers.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        write_str(&mut out, name);
        out.push(b':');
        write_str(&mut out, value);
    }
    out.extend_from_slice(b"},\"body\":[");
    for &c in &res.body {
        if c >= 100 {
            out.push(b'0' + c / 100);
        }
        if c >= 10 {
            out.push(b'0' + c / 10 % 10);
        }
        out.push(b'0' + c % 10);
        out.push(b',');
    }
    if !res.body.is_empty() {
        out.pop();
    }
    out.extend_from_slice(b"]}");
    out
}

// ---- a tiny JSON value ------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Value>),
    Obj(Vec<(String, Value)>),
}

static NULL: Value = Value::Null;

impl Value {
    /// Parses JSON text; None when it is not valid JSON.
    pub fn parse(text: &str) -> Option<Value> {
        Value::parse_bytes(text.as_bytes())
    }
    pub fn parse_bytes(text: &[u8]) -> Option<Value> {
        let mut p = Parser { s: text, i: 0, depth: 0 };
        let v = p.value()?;
        if ws(text, p.i) == text.len() { Some(v) } else { None }
    }
    /// An object from pairs (keys keep their order).
    pub fn object<const N: usize>(pairs: [(&str, Value); N]) -> Value {
        Value::Obj(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
    /// The value of `key` in an object; `Null` when absent or not an object.
    pub fn get(&self, key: &str) -> &Value {
        match self {
            Value::Obj(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap_or(&NULL),
            _ => &NULL,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self { Value::Str(s) => Some(s), _ => None }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self { Value::Num(n) => Some(*n), _ => None }
    }
    pub fn as_i64(&self) -> Option<i64> {
        self.as_f64().map(|n| n as i64)
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self { Value::Bool(b) => Some(*b), _ => None }
    }
    /// The items of an array; empty when not an array.
    pub fn as_array(&self) -> &[Value] {
        match self { Value::Arr(a) => a, _ => &[] }
    }
    pub fn is_null(&self) -> bool {
        *self == Value::Null
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value { Value::Str(s.to_string()) }
}
impl From<String> for Value {
    fn from(s: String) -> Value { Value::Str(s) }
}
impl From<i64> for Value {
    fn from(n: i64) -> Value { Value::Num(n as f64) }
}
impl From<f64> for Value {
    fn from(n: f64) -> Value { Value::Num(n) }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value { Value::Bool(b) }
}
impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Value { Value::Arr(a) }
}

/// Compact JSON; strings escaped, non-ASCII kept as UTF-8.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{}", b),
            Value::Num(n) if n.is_finite() && n.fract() == 0.0 && n.abs() < 9.0e15 => write!(f, "{}", *n as i64),
            Value::Num(n) if n.is_finite() => write!(f, "{}", n),
            Value::Num(_) => f.write_str("null"),
            Value::Str(s) => f.write_str(&quote(s)),
            Value::Arr(a) => {
                f.write_str("[")?;
                for (k, v) in a.iter().enumerate() {
                    if k > 0 { f.write_str(",")?; }
                    write!(f, "{}", v)?;
                }
                f.write_str("]")
            }
            Value::Obj(pairs) => {
                f.write_str("{")?;
                for (k, (key, v)) in pairs.iter().enumerate() {
                    if k > 0 { f.write_str(",")?; }
                    write!(f, "{}:{}", quote(key), v)?;
                }
                f.write_str("}")
            }
        }
    }
}

/// `s` as a JSON string literal.
pub fn quote(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    String::from_utf8(out).unwrap_or_default()
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &c in s.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 15) as usize]);
            }
            _ => out.push(c),
        }
    }
    out.push(b'"');
}

fn ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && matches!(s[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}
fn skip_string(s: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}
fn skip_value(s: &[u8], i: usize) -> Option<usize> {
    let mut i = ws(s, i);
    match *s.get(i)? {
        b'"' => skip_string(s, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            while i < s.len() {
                match s[i] {
                    b'"' => {
                        i = skip_string(s, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            while i < s.len() && !matches!(s[i], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                i += 1;
            }
            Some(i)
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Option<u8> {
        self.i = ws(self.s, self.i);
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn literal(&mut self, word: &[u8], v: Value) -> Option<Value> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Some(v)
        } else {
            None
        }
    }
    fn value(&mut self) -> Option<Value> {
        self.depth += 1;
        if self.depth > 128 {
            return None;
        }
        let v = match self.peek()? {
            b'{' => {
                self.i += 1;
                let mut pairs = Vec::new();
                if !self.eat(b'}') {
                    loop {
                        if self.peek()? != b'"' {
                            return None;
                        }
                        let k = self.string()?;
                        if !self.eat(b':') {
                            return None;
                        }
                        pairs.push((k, self.value()?));
                        if self.eat(b'}') {
                            break;
                        }
                        if !self.eat(b',') {
                            return None;
                        }
                    }
                }
                Value::Obj(pairs)
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.value()?);
                        if self.eat(b']') {
                            break;
                        }
                        if !self.eat(b',') {
                            return None;
                        }
                    }
                }
                Value::Arr(items)
            }
            b'"' => Value::Str(self.string()?),
            b't' => self.literal(b"true", Value::Bool(true))?,
            b'f' => self.literal(b"false", Value::Bool(false))?,
            b'n' => self.literal(b"null", Value::Null)?,
            _ => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                Value::Num(text.parse().ok()?)
            }
        };
        self.depth -= 1;
        Some(v)
    }
    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        self.i += 4;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    }
    fn string(&mut self) -> Option<String> {
        self.i += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xd800..0xdc00).contains(&cp) && self.s[self.i..].starts_with(b"\\u") {
                                self.i += 2;
                                let lo = self.hex4()?;
                                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff);
                            }
                            char::from_u32(cp).unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                }
                _ => out.push(c),
            }
        }
    }
}

// ---- base64 -------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity((data.len() + 2) / 3 * 4);
    for chunk in data.chunks(3) {
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        out.push(B64[(v >> 18) as usize] as char);
        out.push(B64[(v >> 12 & 63) as usize] as char);
        out.push(if chunk.len() > 1 { B64[(v >> 6 & 63) as usize] as char } else { '=' });
        out.push(if chunk.len() > 2 { B64[(v & 63) as usize] as char } else { '=' });
    }
    out
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        acc = acc << 6 | d as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---- host functions ---------------------------------------------------------------------

#[link(wasm_import_module = "aeordb")]
extern "C" {
    fn aeordb_read_file(ptr: *const u8, len: usize) -> i64;
    fn aeordb_write_file(ptr: *const u8, len: usize) -> i64;
    fn aeordb_delete_file(ptr: *const u8, len: usize) -> i64;
    fn aeordb_file_metadata(ptr: *const u8, len: usize) -> i64;
    fn aeordb_list_directory(ptr: *const u8, len: usize) -> i64;
    fn aeordb_extract_file(ptr: *const u8, len: usize) -> i64;
    fn aeordb_query(ptr: *const u8, len: usize) -> i64;
    fn aeordb_aggregate(ptr: *const u8, len: usize) -> i64;
    fn aeordb_context(ptr: *const u8, len: usize) -> i64;
    fn aeordb_set_response(ptr: *const u8, len: usize) -> i64;
    fn log_message(level: *const u8, level_len: usize, msg: *const u8, msg_len: usize);
}

/// Calls a host function; Err carries its `{"error": ...}` message.
fn call(f: unsafe extern "C" fn(*const u8, usize) -> i64, args: &str) -> Result<Value, String> {
    let r = unsafe { f(args.as_ptr(), args.len()) } as u64;
    let answer = guest_slice((r >> 32) as usize as *mut u8, (r & 0xffff_ffff) as usize);
    let v = Value::parse_bytes(answer).ok_or_else(|| "host function failed".to_string())?;
    match v.get("error").as_str() {
        Some(e) => Err(e.to_string()),
        None => Ok(v),
    }
}
fn path_args(path: &str) -> String {
    format!("{{\"path\":{}}}", quote(path))
}

pub struct File {
    pub data: Vec<u8>,
    pub content_type: String,
}

pub fn read_file(path: &str) -> Result<File, String> {
    let v = call(aeordb_read_file, &path_args(path))?;
    Ok(File {
        data: base64_decode(v.get("data").as_str().unwrap_or("")),
        content_type: v.get("content_type").as_str().unwrap_or("").to_string(),
    })
}
/// `content_type` "": the server guesses.
pub fn write_file(path: &str, data: &[u8], content_type: &str) -> Result<(), String> {
    let ct = if content_type.is_empty() { String::new() } else { format!(",\"content_type\":{}", quote(content_type)) };
    let args = format!("{{\"path\":{}{},\"data\":\"{}\"}}", quote(path), ct, base64_encode(data));
    call(aeordb_write_file, &args).map(|_| ())
}
pub fn delete_file(path: &str) -> Result<(), String> {
    call(aeordb_delete_file, &path_args(path)).map(|_| ())
}
/// `{"path","size","content_type","created_at","updated_at","etag"}`
pub fn file_metadata(path: &str) -> Result<Value, String> {
    call(aeordb_file_metadata, &path_args(path))
}
/// `{"entries":[{"name","type","size"}]}`
pub fn list_directory(path: &str) -> Result<Value, String> {
    call(aeordb_list_directory, &path_args(path))
}
/// mode: "lines", "chars" or "bytes".
pub fn extract_file(path: &str, mode: &str, start: Option<i64>, end: Option<i64>) -> Result<Value, String> {
    let mut args = format!("{{\"path\":{},\"mode\":{}", quote(path), quote(mode));
    if let Some(s) = start {
        args += &format!(",\"start\":{}", s);
    }
    if let Some(e) = end {
        args += &format!(",\"end\":{}", e);
    }
    args.push('}');
    call(aeordb_extract_file, &args)
}
/// `query`: `{"path","where","order_by","limit","offset","include_total"}` (JSON text or a Value);
/// answers `{"items":[{"path",...}],"has_more",...}`.
pub fn query(query: impl fmt::Display) -> Result<Value, String> {
    call(aeordb_query, &query.to_string())
}
/// A query with `"aggregate": {...}`; answers `{"count","sum","avg","min","max","groups",...}`.
pub fn aggregate(query: impl fmt::Display) -> Result<Value, String> {
    call(aeordb_aggregate, &query.to_string())
}
/// The request metadata plus "db" and "remaining_ms" (aeordb.py only).
pub fn context() -> Result<Value, String> {
    call(aeordb_context, "{}")
}
/// level: "debug", "info", "warn" or "error".
pub fn log(level: &str, message: &str) {
    unsafe { log_message(level.as_ptr(), level.len(), message.as_ptr(), message.len()) }
}
/// Raw entry point only (aeordb.py only): status, content type and headers of the raw answer.
pub fn set_response(status: u16, content_type: &str, headers: &[(&str, &str)]) -> Result<(), String> {
    let hs: Vec<String> = headers.iter().map(|(k, v)| format!("{}:{}", quote(k), quote(v))).collect();
    let args = format!("{{\"status_code\":{},\"content_type\":{},\"headers\":{{{}}}}}", status, quote(content_type), hs.join(","));
    call(aeordb_set_response, &args).map(|_| ())
}
