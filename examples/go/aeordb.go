// Package aeordb is the Go kit for aeordb.py plugins: it hides the plugin ABI
// (see examples/README.md) behind a Request, a Response builder and one typed
// function per host function. Standard library only.
//
// Use: copy this file into a folder aeordb/ of your module, import it, and
// export your entry point from package main:
//
//	//go:wasmexport handle
//	func handle(ptr, size int32) int64 { return aeordb.Serve(ptr, size, myHandler) }
//
//	func main() {} // required by Go; a c-shared (reactor) module never runs it
//
// Build (Go >= 1.24, for //go:wasmexport):
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o plugin.wasm .
//
// The module imports WASI (aeordb.py provides it, sealed; os.Stderr goes to the
// plugin log) and exports _initialize, which the server calls once per fresh
// instance. This kit exports alloc; host functions your code never calls are
// not imported (the linker drops them).
//
// Raw entry point (aeordb.py only, AeorDB does not have it): export handle_raw
// INSTEAD of handle to receive the body's bytes as they are, without the JSON
// envelope, which suits large bodies:
//
//	//go:wasmexport handle_raw
//	func handleRaw(ptr, size int32) int64 { return aeordb.ServeRaw(ptr, size, myHandler) }
//
// The default, and what runs on both servers, is the envelope (Serve).
package aeordb

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
	"unsafe"
)

// ---------------------------------------------------------------------------
// Memory: a fresh instance serves each call, so nothing handed to or by the
// host is ever freed. Go's GC does not move objects; keeping every such buffer
// referenced from here keeps it from being reused while the call runs.

var pinned [][]byte

func pin(b []byte) []byte {
	if len(b) == 0 {
		b = make([]byte, 1)[:0:1]
	}
	pinned = append(pinned, b)
	return b
}

func ptrOf(b []byte) int32 {
	if cap(b) == 0 {
		return 0
	}
	return int32(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}

func packed(b []byte) int64 {
	b = pin(b)
	return int64(ptrOf(b))<<32 | int64(len(b))
}

// guest returns the bytes at (ptr, size) in linear memory, without copying.
func guest(ptr, size int32) []byte {
	if size <= 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(nil), uintptr(uint32(ptr)))), int(size))
}

func unpack(answer int64) []byte {
	return guest(int32(uint64(answer)>>32), int32(uint32(answer)))
}

//go:wasmexport alloc
func alloc(size int32) int32 {
	n := int(size)
	if n < 1 {
		n = 1
	}
	return ptrOf(pin(make([]byte, n)))
}

// ---------------------------------------------------------------------------
// Request

// Request is one invocation: the HTTP body and the metadata strings
// (function_name, name, path, plugin_path, method, query_string,
// content_type, request_id; which ones depends on the server).
type Request struct {
	Body     []byte
	Metadata map[string]string
}

// Function is the invoked function: metadata function_name, else name.
func (r *Request) Function() string {
	if f := r.Metadata["function_name"]; f != "" {
		return f
	}
	return r.Metadata["name"]
}

// ContentType is the request's content type ("" when the server did not say).
func (r *Request) ContentType() string { return r.Metadata["content_type"] }

// Text is the body as a string.
func (r *Request) Text() string { return string(r.Body) }

// JSON decodes the body into v (encoding/json rules).
func (r *Request) JSON(v any) error { return json.Unmarshal(r.Body, v) }

// Handler answers one request.
type Handler func(*Request) *Response

// Serve is the default (envelope) entry point: call it from your exported
// handle. It decodes the request at (ptr, size), runs h and encodes h's answer.
func Serve(ptr, size int32, h Handler) int64 {
	req, err := parseEnvelope(guest(ptr, size))
	var resp *Response
	if err != nil {
		resp = errorJSON(400, "bad request envelope: "+err.Error())
	} else {
		resp = h(req)
	}
	if resp == nil {
		resp = errorJSON(500, "the plugin answered nothing")
	}
	return packed(resp.envelope())
}

// ServeRaw is the aeordb.py-only raw entry point: call it from an exported
// handle_raw (and export no handle). The body arrives as it is; the metadata
// comes from aeordb_context; status, content type and headers go back through
// aeordb_set_response.
func ServeRaw(ptr, size int32, h Handler) int64 {
	req := &Request{Body: guest(ptr, size), Metadata: map[string]string{}}
	if ctx, err := Context(); err == nil {
		for k, v := range ctx {
			if s, ok := v.(string); ok {
				req.Metadata[k] = s
			}
		}
	}
	resp := h(req)
	if resp == nil {
		resp = errorJSON(500, "the plugin answered nothing")
	}
	head := pin(mustJSON(map[string]any{"status_code": resp.Status, "content_type": resp.ContentType,
		"headers": resp.headers()}))
	hostSetResponse(ptrOf(head), int32(len(head)))
	return packed(resp.Body)
}

// parseEnvelope reads {"arguments":[bytes...],"metadata":{...}} with a
// hand-written scanner: a 1 MiB body is a 4 MiB array of numbers.
func parseEnvelope(buf []byte) (*Request, error) {
	req := &Request{Metadata: map[string]string{}}
	i := skipWS(buf, 0)
	if i >= len(buf) || buf[i] != '{' {
		return nil, errors.New("not a JSON object")
	}
	i++
	for {
		i = skipWS(buf, i)
		if i < len(buf) && buf[i] == ',' {
			i = skipWS(buf, i+1)
		}
		if i >= len(buf) {
			return nil, errors.New("unterminated object")
		}
		if buf[i] == '}' {
			return req, nil
		}
		key, end, err := parseString(buf, i)
		if err != nil {
			return nil, err
		}
		i = skipWS(buf, end)
		if i >= len(buf) || buf[i] != ':' {
			return nil, errors.New("missing ':'")
		}
		i = skipWS(buf, i+1)
		switch key {
		case "arguments":
			req.Body, i, err = parseByteArray(buf, i)
		case "metadata":
			i, err = parseMetadata(buf, i, req.Metadata)
		default:
			i, err = skipValue(buf, i)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
	}
}

// parseMetadata reads a JSON object of strings into meta; other values are
// kept as their JSON text.
func parseMetadata(b []byte, i int, meta map[string]string) (int, error) {
	if i >= len(b) || b[i] != '{' {
		return i, errors.New("not an object")
	}
	i = skipWS(b, i+1)
	for i < len(b) && b[i] != '}' {
		key, end, err := parseString(b, i)
		if err != nil {
			return i, err
		}
		i = skipWS(b, end)
		if i >= len(b) || b[i] != ':' {
			return i, errors.New("missing ':'")
		}
		i = skipWS(b, i+1)
		if i < len(b) && b[i] == '"' {
			meta[key], end, err = parseString(b, i)
		} else if end, err = skipValue(b, i); err == nil && string(b[i:end]) != "null" {
			meta[key] = string(b[i:end])
		}
		if err != nil {
			return i, err
		}
		i = skipWS(b, end)
		if i < len(b) && b[i] == ',' {
			i = skipWS(b, i+1)
		}
	}
	if i >= len(b) {
		return i, errors.New("unterminated object")
	}
	return i + 1, nil
}

// parseString decodes the JSON string starting at b[i]; it answers the index past it.
func parseString(b []byte, i int) (string, int, error) {
	if i >= len(b) || b[i] != '"' {
		return "", i, errors.New("expected a string")
	}
	i++
	start := i
	for i < len(b) && b[i] != '"' && b[i] != '\\' {
		i++
	}
	if i < len(b) && b[i] == '"' {
		return string(b[start:i]), i + 1, nil // the usual case: no escapes
	}
	out := append([]byte(nil), b[start:i]...)
	for i < len(b) {
		c := b[i]
		if c == '"' {
			return string(out), i + 1, nil
		}
		if c != '\\' {
			out = append(out, c)
			i++
			continue
		}
		if i+1 >= len(b) {
			break
		}
		i += 2
		switch e := b[i-1]; e {
		case 'n':
			out = append(out, '\n')
		case 't':
			out = append(out, '\t')
		case 'r':
			out = append(out, '\r')
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'u':
			r, n := hex4(b, i)
			i += n
			if utf16.IsSurrogate(r) {
				if r2, n2 := hex4(b, i+2); n == 4 && n2 == 4 && b[i] == '\\' && b[i+1] == 'u' {
					r = utf16.DecodeRune(r, r2)
					i += 6
				}
			}
			out = utf8.AppendRune(out, r)
		default: // " \ /
			out = append(out, e)
		}
	}
	return "", i, errors.New("unterminated string")
}

func hex4(b []byte, i int) (rune, int) {
	if i+4 > len(b) {
		return utf8.RuneError, 0
	}
	v, err := strconv.ParseUint(string(b[i:i+4]), 16, 32)
	if err != nil {
		return utf8.RuneError, 0
	}
	return rune(v), 4
}

func skipWS(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\n' || b[i] == '\r' || b[i] == '\t') {
		i++
	}
	return i
}

func parseByteArray(b []byte, i int) ([]byte, int, error) {
	if i >= len(b) || b[i] != '[' {
		return nil, i, errors.New("not an array")
	}
	end := bytes.IndexByte(b[i:], ']')
	if end < 0 {
		return nil, i, errors.New("unterminated array")
	}
	arr := b[i+1 : i+end]
	out := make([]byte, 0, bytes.Count(arr, []byte{','})+1)
	j := 0
	for {
		for j < len(arr) && (arr[j] == ' ' || arr[j] == '\n' || arr[j] == '\r' || arr[j] == '\t') {
			j++
		}
		if j >= len(arr) {
			if len(out) > 0 {
				return nil, i, errors.New("trailing comma")
			}
			break
		}
		v, digits := 0, 0
		for j < len(arr) && arr[j] >= '0' && arr[j] <= '9' {
			v = v*10 + int(arr[j]-'0')
			j++
			digits++
		}
		if digits == 0 || digits > 3 || v > 255 {
			return nil, i, errors.New("not a byte value")
		}
		out = append(out, byte(v))
		for j < len(arr) && (arr[j] == ' ' || arr[j] == '\n' || arr[j] == '\r' || arr[j] == '\t') {
			j++
		}
		if j >= len(arr) {
			break
		}
		if arr[j] != ',' {
			return nil, i, errors.New("expected ','")
		}
		j++
	}
	return out, i + end + 1, nil
}

// skipValue returns the index just past the JSON value starting at b[i].
func skipValue(b []byte, i int) (int, error) {
	depth := 0
	for i < len(b) {
		c := b[i]
		switch c {
		case '"':
			i++
			for i < len(b) && b[i] != '"' {
				if b[i] == '\\' {
					i++
				}
				i++
			}
			if i >= len(b) {
				return i, errors.New("unterminated string")
			}
			i++
		case '{', '[':
			depth++
			i++
		case '}', ']':
			if depth == 0 {
				return i, nil
			}
			depth--
			i++
		case ',', ' ', '\n', '\r', '\t':
			if depth == 0 {
				return i, nil
			}
			i++
		default:
			i++
		}
		if depth == 0 && (c == '"' || c == '}' || c == ']') {
			return i, nil
		}
	}
	if depth != 0 {
		return i, errors.New("unterminated value")
	}
	return i, nil
}

// ---------------------------------------------------------------------------
// Response

// Response is a plugin's answer. Only headers named x-*, cache-control, etag,
// last-modified, content-disposition, content-language, content-encoding and
// vary reach the client.
type Response struct {
	Status      int
	ContentType string
	Headers     map[string]string
	Body        []byte
}

func errorJSON(status int, message string) *Response {
	return Bytes(status, "application/json", append(appendString([]byte(`{"error":`), message), '}'))
}

// Bytes answers body with the given status and content type.
func Bytes(status int, contentType string, body []byte) *Response {
	return &Response{Status: status, ContentType: contentType, Body: body}
}

// Text answers s as text/plain; charset=utf-8.
func Text(status int, s string) *Response {
	return Bytes(status, "text/plain; charset=utf-8", []byte(s))
}

// JSON answers v encoded compactly as application/json (HTML characters and
// non-ASCII kept as they are). Use a struct to fix the order of the keys.
func JSON(status int, v any) *Response {
	return Bytes(status, "application/json", mustJSON(v))
}

// Header sets a response header and returns the response, for chaining.
func (r *Response) Header(name, value string) *Response {
	if r.Headers == nil {
		r.Headers = map[string]string{}
	}
	r.Headers[name] = value
	return r
}

func (r *Response) headers() map[string]string {
	if r.Headers == nil {
		return map[string]string{}
	}
	return r.Headers
}

// MarshalJSON-like helper: compact JSON without HTML escaping, no newline.
func mustJSON(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		b, _ := json.Marshal(map[string]string{"error": "cannot encode JSON: " + err.Error()})
		return b
	}
	return bytes.TrimRight(buf.Bytes(), "\n")
}

// EncodeJSON is the encoder JSON uses: compact, HTML characters and non-ASCII
// kept as they are.
func EncodeJSON(v any) []byte { return mustJSON(v) }

var decimal [256]string

func init() {
	for i := range decimal {
		decimal[i] = strconv.Itoa(i) + ","
	}
}

func (r *Response) envelope() []byte {
	ct := r.ContentType
	if ct == "" {
		ct = "application/octet-stream"
	}
	out := make([]byte, 0, 4*len(r.Body)+len(ct)+256)
	out = append(out, `{"status_code":`...)
	out = strconv.AppendInt(out, int64(r.Status), 10)
	out = append(out, `,"content_type":`...)
	out = appendString(out, ct)
	out = append(out, `,"headers":{`...)
	names := make([]string, 0, len(r.Headers))
	for k := range r.Headers {
		names = append(names, k)
	}
	sort.Strings(names)
	for n, k := range names {
		if n > 0 {
			out = append(out, ',')
		}
		out = appendString(out, k)
		out = append(out, ':')
		out = appendString(out, r.Headers[k])
	}
	out = append(out, `},"body":[`...)
	for _, c := range r.Body {
		out = append(out, decimal[c]...)
	}
	if len(r.Body) > 0 {
		out = out[:len(out)-1]
	}
	return append(out, "]}"...)
}

func appendString(out []byte, s string) []byte {
	const hex = "0123456789abcdef"
	out = append(out, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			out = append(out, '\\', c)
		case c == '\n':
			out = append(out, '\\', 'n')
		case c == '\r':
			out = append(out, '\\', 'r')
		case c == '\t':
			out = append(out, '\\', 't')
		case c < 0x20:
			out = append(out, '\\', 'u', '0', '0', hex[c>>4], hex[c&15])
		default:
			out = append(out, c)
		}
	}
	return append(out, '"')
}

// ---------------------------------------------------------------------------
// Host functions (import module "aeordb"). Each takes and answers JSON; an
// answer {"error": "..."} becomes a Go error. File bytes travel as base64,
// which encoding/json does for []byte fields.

//go:wasmimport aeordb aeordb_read_file
func hostReadFile(ptr, size int32) int64

//go:wasmimport aeordb aeordb_write_file
func hostWriteFile(ptr, size int32) int64

//go:wasmimport aeordb aeordb_delete_file
func hostDeleteFile(ptr, size int32) int64

//go:wasmimport aeordb aeordb_file_metadata
func hostFileMetadata(ptr, size int32) int64

//go:wasmimport aeordb aeordb_list_directory
func hostListDirectory(ptr, size int32) int64

//go:wasmimport aeordb aeordb_extract_file
func hostExtractFile(ptr, size int32) int64

//go:wasmimport aeordb aeordb_query
func hostQuery(ptr, size int32) int64

//go:wasmimport aeordb aeordb_aggregate
func hostAggregate(ptr, size int32) int64

//go:wasmimport aeordb aeordb_context
func hostContext(ptr, size int32) int64

//go:wasmimport aeordb aeordb_set_response
func hostSetResponse(ptr, size int32) int64

//go:wasmimport aeordb log_message
func hostLog(levelPtr, levelLen, msgPtr, msgLen int32)

// HostError is the {"error": ...} answer of a host function.
type HostError struct {
	Function string
	Message  string
}

func (e *HostError) Error() string { return e.Function + ": " + e.Message }

func call(name string, fn func(int32, int32) int64, args any, out any) error {
	in := pin(mustJSON(args))
	answer := unpack(fn(ptrOf(in), int32(len(in))))
	// An error answer is {"error": "..."}: its first key is "error".
	i := skipWS(answer, 0)
	if i < len(answer) && answer[i] == '{' {
		j := skipWS(answer, i+1)
		if bytes.HasPrefix(answer[j:], []byte(`"error"`)) {
			var e struct {
				Error string `json:"error"`
			}
			if json.Unmarshal(answer, &e) == nil {
				return &HostError{name, e.Error}
			}
		}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(answer, out); err != nil {
		return fmt.Errorf("%s: bad answer: %w", name, err)
	}
	return nil
}

// File is what ReadFile answers.
type File struct {
	Data        []byte `json:"data"`
	ContentType string `json:"content_type"`
	Size        int64  `json:"size"`
}

// ReadFile reads the file at an absolute path (/notes/1.json).
func ReadFile(path string) (*File, error) {
	var f File
	if err := call("aeordb_read_file", hostReadFile, map[string]string{"path": path}, &f); err != nil {
		return nil, err
	}
	return &f, nil
}

// WriteFile creates or replaces a file; contentType may be "".
func WriteFile(path string, data []byte, contentType string) error {
	args := map[string]any{"path": path, "data": data}
	if contentType != "" {
		args["content_type"] = contentType
	}
	return call("aeordb_write_file", hostWriteFile, args, nil)
}

// DeleteFile deletes a file.
func DeleteFile(path string) error {
	return call("aeordb_delete_file", hostDeleteFile, map[string]string{"path": path}, nil)
}

// FileInfo is what FileMetadata answers (times in ms since the epoch).
type FileInfo struct {
	Path        string `json:"path"`
	Size        int64  `json:"size"`
	ContentType string `json:"content_type"`
	CreatedAt   int64  `json:"created_at"`
	UpdatedAt   int64  `json:"updated_at"`
	ETag        string `json:"etag"`
}

// FileMetadata describes a file.
func FileMetadata(path string) (*FileInfo, error) {
	var m FileInfo
	if err := call("aeordb_file_metadata", hostFileMetadata, map[string]string{"path": path}, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// Entry is one entry of a directory; Type is "file" or "directory".
type Entry struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Size int64  `json:"size"`
}

// ListDirectory lists a directory.
func ListDirectory(path string) ([]Entry, error) {
	var out struct {
		Entries []Entry `json:"entries"`
	}
	err := call("aeordb_list_directory", hostListDirectory, map[string]string{"path": path}, &out)
	return out.Entries, err
}

// Extract asks for part of a file as text. Mode is "lines" (1-based,
// inclusive), "chars" or "bytes" (0-based, end-exclusive); zero fields are left out.
type Extract struct {
	Path     string `json:"path"`
	Mode     string `json:"mode"`
	Start    *int64 `json:"start,omitempty"`
	End      *int64 `json:"end,omitempty"`
	MaxBytes int64  `json:"max_bytes,omitempty"`
}

// Extraction is what ExtractFile answers.
type Extraction struct {
	Text        string `json:"text"`
	ContentType string `json:"content_type"`
	SourceSize  int64  `json:"source_size"`
	Mode        string `json:"mode"`
	Start       int64  `json:"start"`
	End         int64  `json:"end"`
	Total       int64  `json:"total"`
	Truncated   bool   `json:"truncated"`
}

// ExtractFile answers part of a file as text.
func ExtractFile(e Extract) (*Extraction, error) {
	var x Extraction
	if err := call("aeordb_extract_file", hostExtractFile, e, &x); err != nil {
		return nil, err
	}
	return &x, nil
}

// Q is shorthand for building queries: Q{"path": "/notes", "where": Q{...}}.
type Q = map[string]any

// QueryItem is one match of a query (a path, not the document).
type QueryItem struct {
	Path        string   `json:"path"`
	Score       float64  `json:"score"`
	TotalSize   int64    `json:"total_size"`
	ContentType string   `json:"content_type"`
	CreatedAt   int64    `json:"created_at"`
	UpdatedAt   int64    `json:"updated_at"`
	MatchedBy   []string `json:"matched_by"`
}

// QueryResult is what Query answers; Total is set with "include_total": true.
type QueryResult struct {
	Items   []QueryItem `json:"items"`
	HasMore bool        `json:"has_more"`
	Total   *int64      `json:"total"`
}

// Query runs a query: {"path", "where", "order_by", "limit", "offset", "include_total"}.
func Query(query any) (*QueryResult, error) {
	var r QueryResult
	if err := call("aeordb_query", hostQuery, query, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// AggregateGroup is one group of an aggregate with group_by.
type AggregateGroup struct {
	Key   map[string]any      `json:"key"`
	Count int64               `json:"count"`
	Sum   map[string]*float64 `json:"sum"`
	Avg   map[string]*float64 `json:"avg"`
	Min   map[string]*float64 `json:"min"`
	Max   map[string]*float64 `json:"max"`
}

// AggregateResult is what Aggregate answers; a nil *float64 is JSON null (no
// document has a number in that field).
type AggregateResult struct {
	Count      *int64              `json:"count"`
	Sum        map[string]*float64 `json:"sum"`
	Avg        map[string]*float64 `json:"avg"`
	Min        map[string]*float64 `json:"min"`
	Max        map[string]*float64 `json:"max"`
	Groups     []AggregateGroup    `json:"groups"`
	TotalCount int64               `json:"total_count"`
	HasMore    bool                `json:"has_more"`
}

// Aggregate runs a query with "aggregate": {"count", "sum", "avg", "min", "max", "group_by"}.
func Aggregate(query any) (*AggregateResult, error) {
	var r AggregateResult
	if err := call("aeordb_aggregate", hostAggregate, query, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Context answers the invocation's metadata plus "db" and "remaining_ms"
// (aeordb.py only).
func Context() (map[string]any, error) {
	var c map[string]any
	err := call("aeordb_context", hostContext, map[string]any{}, &c)
	return c, err
}

// Log writes one line to the server log; level is debug, info, warn or error.
func Log(level, message string) {
	l, m := pin([]byte(level)), pin([]byte(message))
	hostLog(ptrOf(l), int32(len(l)), ptrOf(m), int32(len(m)))
}

// Logf is Log with fmt.Sprintf.
func Logf(level, format string, args ...any) { Log(level, fmt.Sprintf(format, args...)) }
