/* aeordb.h: the aeordb plugin kit for C (wasm32; wasi-libc or no libc at all).
 * Copy this one header next to your plugin; ../README.md is the ABI it hides.
 *
 *     #define AEORDB_IMPLEMENTATION      // in exactly one .c file
 *     #include "aeordb.h"
 *     aeordb_response aeordb_handle(const aeordb_request *req) {
 *         return aeordb_text(200, "hello");
 *     }
 *
 * Build (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32):
 *     clang --target=wasm32-wasi -mexec-model=reactor -Oz -s -o plugin.wasm plugin.c
 *   (Debian's clang finds wasi-libc in /usr/include/wasm32-wasi and /usr/lib/wasm32-wasi;
 *    elsewhere add --sysroot=/path/to/wasi-sysroot.)
 * or with Zig's bundled clang and wasi-libc (pip install ziglang):
 *     python -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -Oz -s -o plugin.wasm plugin.c
 * or with no libc (no stdio), which runs on AeorDB and every aeordb.py:
 *     clang --target=wasm32 -nostdlib -Wl,--no-entry -Oz -s -o plugin.wasm plugin.c
 * A WASI build (stdio) needs a server that provides WASI (aeordb.py does; AeorDB not).
 *
 * The kit exports `alloc` (malloc with wasi-libc, else a bump allocator;
 * a fresh instance serves every call, so nothing is freed) and `handle`
 * (the AeorDB envelope, spoken by AeorDB and aeordb.py alike), which decodes
 * the request and calls your
 * aeordb_handle().
 *
 * Opt-in raw entry point, ONLY aeordb.py has it (AeorDB does not):
 * `#define AEORDB_RAW` before the include and write
 * `aeordb_buf aeordb_handle_raw(const uint8_t *body, size_t len)` instead of
 * aeordb_handle(): the body arrives as raw bytes, the metadata comes from
 * aeordb_context(), the answer is the raw body; call aeordb_set_response()
 * to choose status, content type and headers (default 200
 * application/octet-stream).
 *
 * Memory: every pointer the kit hands out lives until the call ends. Host
 * answers are raw JSON text (NUL-terminated); aeordb_json_field(),
 * aeordb_json_string(), aeordb_json_int() and aeordb_json_next() read it.
 * File bytes travel base64-encoded: the kit does it.
 */
#ifndef AEORDB_H
#define AEORDB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- request and response ---- */
typedef struct aeordb_request {
    const uint8_t *body;      /* the HTTP body's bytes, followed by a NUL */
    size_t body_len;
    const char *metadata;     /* raw JSON object, NUL-terminated */
} aeordb_request;

/* A metadata value, decoded; "" when absent. */
const char *aeordb_meta(const aeordb_request *req, const char *key);
/* The function called: metadata `function_name`, else `name`. */
const char *aeordb_function(const aeordb_request *req);
/* The request's content type ("" when none). */
const char *aeordb_content_type(const aeordb_request *req);

#define AEORDB_MAX_HEADERS 16
typedef struct aeordb_response {
    int status;
    const char *content_type;
    const void *body;
    size_t body_len;
    const char *header_names[AEORDB_MAX_HEADERS];
    const char *header_values[AEORDB_MAX_HEADERS];
    int header_count;
} aeordb_response;

aeordb_response aeordb_bytes(int status, const char *content_type, const void *body, size_t len);
aeordb_response aeordb_text(int status, const char *text);   /* text/plain; charset=utf-8 */
aeordb_response aeordb_json(int status, const char *json);   /* application/json */
/* Only x-*, cache-control, etag, last-modified, content-disposition,
 * content-language, content-encoding and vary are forwarded. */
void aeordb_header(aeordb_response *res, const char *name, const char *value);

/* You write this one (or aeordb_handle_raw with AEORDB_RAW). */
aeordb_response aeordb_handle(const aeordb_request *req);

/* ---- memory and a growable buffer (always NUL-terminated) ---- */
void *aeordb_alloc(size_t size);   /* 8-aligned, NUL after the block, never freed */
char *aeordb_strdup(const char *s);
int aeordb_streq(const char *a, const char *b);   /* 1 when equal (no libc needed) */

typedef struct aeordb_buf {
    char *data;
    size_t len, cap;
} aeordb_buf;
void aeordb_buf_mem(aeordb_buf *b, const void *p, size_t n);
void aeordb_buf_raw(aeordb_buf *b, const char *s);         /* append as is */
void aeordb_buf_str(aeordb_buf *b, const char *s);         /* append as a JSON string */
void aeordb_buf_int(aeordb_buf *b, long long v);
void aeordb_buf_int_pad(aeordb_buf *b, long long v, int width);  /* zero-padded */
/* A NUL-terminated string built from parts, e.g. aeordb_concat("a", s, NULL). */
char *aeordb_concat(const char *first, ...);

/* ---- a small JSON reader (raw JSON text in, NUL-terminated copies out) ---- */
char *aeordb_json_field(const char *obj, const char *key);  /* raw value, NULL if absent */
char *aeordb_json_string(const char *raw);                  /* decoded, NULL if not a string */
int aeordb_json_int(const char *raw, long long *out);       /* 1 if a number (integer part) */
/* Iterate an array: const char *cur = raw; char *item; while ((item = aeordb_json_next(&cur))) */
char *aeordb_json_next(const char **cursor);

/* ---- host functions (import module "aeordb") ----
 * On failure they return -1 / NULL and aeordb_last_error() says why. */
typedef struct aeordb_file {
    uint8_t *data;
    size_t len;
    const char *content_type;
} aeordb_file;
const char *aeordb_last_error(void);
int aeordb_read_file(const char *path, aeordb_file *out);
/* content_type NULL or "": the server guesses. */
int aeordb_write_file(const char *path, const void *data, size_t len, const char *content_type);
int aeordb_delete_file(const char *path);
char *aeordb_file_metadata(const char *path);    /* {"path","size","content_type","created_at","updated_at","etag"} */
char *aeordb_list_directory(const char *path);   /* {"entries":[{"name","type","size"}]} */
/* mode "lines"/"chars"/"bytes"; start/end < 0: omitted. */
char *aeordb_extract_file(const char *path, const char *mode, long long start, long long end);
char *aeordb_query(const char *query_json);      /* {"items":[{"path",...}],"has_more",...} */
char *aeordb_aggregate(const char *query_json);  /* {"count","sum","avg","min","max","groups",...} */
char *aeordb_context(void);                      /* metadata + "db", "remaining_ms" (aeordb.py only) */
void aeordb_log(const char *level, const char *message);   /* debug, info, warn, error */

#ifdef AEORDB_RAW
/* aeordb.py only. The raw answer's bytes: data/len of the buffer. */
aeordb_buf aeordb_handle_raw(const uint8_t *body, size_t len);
/* headers: name, value, name, value, ..., NULL (or NULL for none). */
int aeordb_set_response(int status, const char *content_type, const char *const *headers);
#endif

#ifdef __cplusplus
}
#endif

/* ======================================================================== */
#ifdef AEORDB_IMPLEMENTATION
#include <stdarg.h>

#define AEORDB__IMPORT(name) __attribute__((import_module("aeordb"), import_name(name)))
AEORDB__IMPORT("aeordb_read_file") long long aeordb__read_file(const char *p, size_t n);
AEORDB__IMPORT("aeordb_write_file") long long aeordb__write_file(const char *p, size_t n);
AEORDB__IMPORT("aeordb_delete_file") long long aeordb__delete_file(const char *p, size_t n);
AEORDB__IMPORT("aeordb_file_metadata") long long aeordb__file_metadata(const char *p, size_t n);
AEORDB__IMPORT("aeordb_list_directory") long long aeordb__list_directory(const char *p, size_t n);
AEORDB__IMPORT("aeordb_extract_file") long long aeordb__extract_file(const char *p, size_t n);
AEORDB__IMPORT("aeordb_query") long long aeordb__query(const char *p, size_t n);
AEORDB__IMPORT("aeordb_aggregate") long long aeordb__aggregate(const char *p, size_t n);
AEORDB__IMPORT("aeordb_context") long long aeordb__context(const char *p, size_t n);
AEORDB__IMPORT("log_message") void aeordb__log(const char *l, size_t ln, const char *m, size_t mn);

static size_t aeordb__strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static int aeordb__streq(const char *a, size_t an, const char *b) {
    size_t i = 0;
    for (; i < an; i++) if (a[i] != b[i]) return 0;
    return b[an] == 0;
}

#ifndef __wasi__
/* No libc: the compiler may still call these. */
__attribute__((weak)) void *memcpy(void *d, const void *s, size_t n) {
    unsigned char *o = (unsigned char *)d; const unsigned char *i = (const unsigned char *)s;
    while (n--) *o++ = *i++;
    return d;
}
__attribute__((weak)) void *memset(void *d, int c, size_t n) {
    unsigned char *o = (unsigned char *)d;
    while (n--) *o++ = (unsigned char)c;
    return d;
}
#else
#include <string.h>
#endif

/* ---- memory ----
 * Without libc: a bump allocator over memory.grow (fresh pages are zeroed).
 * With wasi-libc: malloc, because wasi-libc's malloc claims all memory above
 * __heap_base when first used and would collide with a separate bump
 * allocator. Either way nothing is freed (a fresh instance serves each call)
 * and every block is followed by a NUL. */
#ifdef __wasi__
#include <stdlib.h>
void *aeordb_alloc(size_t size) {
    char *p = (char *)malloc(size + 1);
    if (!p) __builtin_trap();
    p[size] = 0;
    return p;
}
#else
static uintptr_t aeordb__next, aeordb__end;

void *aeordb_alloc(size_t size) {
    size_t n = (size + 8) & ~(size_t)7;   /* +1: every block ends with a NUL */
    if (aeordb__end - aeordb__next < n) {
        size_t pages = (n >> 16) + 1;
        size_t old = __builtin_wasm_memory_grow(0, pages);
        if (old == (size_t)-1) __builtin_trap();
        if (old << 16 != aeordb__end) aeordb__next = old << 16;
        aeordb__end = (old + pages) << 16;
    }
    void *p = (void *)aeordb__next;
    aeordb__next += n;
    return p;
}
#endif

__attribute__((export_name("alloc"))) void *aeordb__alloc_export(size_t size) { return aeordb_alloc(size); }

char *aeordb_strdup(const char *s) {
    size_t n = aeordb__strlen(s);
    char *p = (char *)aeordb_alloc(n);
    memcpy(p, s, n);
    return p;
}

int aeordb_streq(const char *a, const char *b) { return aeordb__streq(a, aeordb__strlen(a), b); }

/* ---- buffer ---- */
static void aeordb__reserve(aeordb_buf *b, size_t extra) {
    if (b->cap - b->len > extra) return;
    size_t want = b->cap * 2;
    if (want < b->len + extra + 1) want = b->len + extra + 1;
    if (want < 64) want = 64;
    char *p = (char *)aeordb_alloc(want);
    if (b->len) memcpy(p, b->data, b->len);
    b->data = p;
    b->cap = want;
}
void aeordb_buf_mem(aeordb_buf *b, const void *p, size_t n) {
    aeordb__reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}
void aeordb_buf_raw(aeordb_buf *b, const char *s) { aeordb_buf_mem(b, s, aeordb__strlen(s)); }
static void aeordb__byte(aeordb_buf *b, char c) { aeordb_buf_mem(b, &c, 1); }
void aeordb_buf_int_pad(aeordb_buf *b, long long v, int width) {
    char tmp[24];
    int i = sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { tmp[--i] = (char)('0' + u % 10); u /= 10; } while (u || (int)sizeof tmp - i < width);
    if (v < 0) aeordb__byte(b, '-');
    aeordb_buf_mem(b, tmp + i, sizeof tmp - i);
}
void aeordb_buf_int(aeordb_buf *b, long long v) { aeordb_buf_int_pad(b, v, 1); }
void aeordb_buf_str(aeordb_buf *b, const char *s) {
    static const char hex[] = "0123456789abcdef";
    aeordb__byte(b, '"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"') aeordb_buf_raw(b, "\\\"");
        else if (c == '\\') aeordb_buf_raw(b, "\\\\");
        else if (c == '\n') aeordb_buf_raw(b, "\\n");
        else if (c == '\r') aeordb_buf_raw(b, "\\r");
        else if (c == '\t') aeordb_buf_raw(b, "\\t");
        else if (c < 0x20) {
            char e[7] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15], 0};
            aeordb_buf_raw(b, e);
        } else aeordb__byte(b, (char)c);
    }
    aeordb__byte(b, '"');
}
char *aeordb_concat(const char *first, ...) {
    aeordb_buf b = {0};
    va_list ap;
    va_start(ap, first);
    aeordb_buf_raw(&b, "");
    for (const char *s = first; s; s = va_arg(ap, const char *)) aeordb_buf_raw(&b, s);
    va_end(ap);
    return b.data;
}

/* ---- JSON reader ---- */
static const char *aeordb__ws(const char *s) {
    while (*s == ' ' || *s == '\n' || *s == '\r' || *s == '\t') s++;
    return s;
}
static const char *aeordb__skip_string(const char *s) {   /* s at the opening quote */
    for (s++; *s; s++) {
        if (*s == '\\') { if (!*++s) return NULL; }
        else if (*s == '"') return s + 1;
    }
    return NULL;
}
static const char *aeordb__skip(const char *s) {   /* the end of the value at s */
    s = aeordb__ws(s);
    if (*s == '"') return aeordb__skip_string(s);
    if (*s == '{' || *s == '[') {
        int depth = 0;
        while (*s) {
            if (*s == '"') { if (!(s = aeordb__skip_string(s))) return NULL; continue; }
            if (*s == '{' || *s == '[') depth++;
            else if ((*s == '}' || *s == ']') && --depth == 0) return s + 1;
            s++;
        }
        return NULL;
    }
    const char *start = s;
    while (*s && *s != ',' && *s != '}' && *s != ']' && *s != ' ' && *s != '\n' && *s != '\r' && *s != '\t') s++;
    return s == start ? NULL : s;
}
static char *aeordb__copy(const char *s, size_t n) {
    char *p = (char *)aeordb_alloc(n);
    memcpy(p, s, n);
    return p;
}
static const char *aeordb__field(const char *obj, const char *key, const char **end) {
    if (!obj) return NULL;
    const char *s = aeordb__ws(obj);
    if (*s++ != '{') return NULL;
    for (;;) {
        s = aeordb__ws(s);
        if (*s != '"') return NULL;
        const char *k = s + 1, *kend = aeordb__skip_string(s);
        if (!kend) return NULL;
        s = aeordb__ws(kend);
        if (*s++ != ':') return NULL;
        const char *v = aeordb__ws(s), *vend = aeordb__skip(v);
        if (!vend) return NULL;
        if (aeordb__streq(k, (size_t)(kend - 1 - k), key)) { *end = vend; return v; }
        s = aeordb__ws(vend);
        if (*s == ',') s++;
    }
}
char *aeordb_json_field(const char *obj, const char *key) {
    const char *end, *v = aeordb__field(obj, key, &end);
    return v ? aeordb__copy(v, (size_t)(end - v)) : NULL;
}
static int aeordb__hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}
char *aeordb_json_string(const char *raw) {
    if (!raw) return NULL;
    raw = aeordb__ws(raw);
    const char *end = raw[0] == '"' ? aeordb__skip_string(raw) : NULL;
    if (!end) return NULL;
    char *out = (char *)aeordb_alloc((size_t)(end - raw)), *o = out;
    for (const char *s = raw + 1; s < end - 1; s++) {
        if (*s != '\\') { *o++ = *s; continue; }
        unsigned cp, lo;
        switch (*++s) {
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'u':
            if (!aeordb__hex4(s + 1, &cp)) return NULL;
            s += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && s[1] == '\\' && s[2] == 'u' && aeordb__hex4(s + 3, &lo)
                && lo >= 0xdc00 && lo < 0xe000) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                s += 6;
            }
            if (cp < 0x80) *o++ = (char)cp;
            else if (cp < 0x800) { *o++ = (char)(0xc0 | cp >> 6); *o++ = (char)(0x80 | (cp & 63)); }
            else if (cp < 0x10000) {
                *o++ = (char)(0xe0 | cp >> 12); *o++ = (char)(0x80 | (cp >> 6 & 63)); *o++ = (char)(0x80 | (cp & 63));
            } else {
                *o++ = (char)(0xf0 | cp >> 18); *o++ = (char)(0x80 | (cp >> 12 & 63));
                *o++ = (char)(0x80 | (cp >> 6 & 63)); *o++ = (char)(0x80 | (cp & 63));
            }
            break;
        default: *o++ = *s;
        }
    }
    *o = 0;
    return out;
}
int aeordb_json_int(const char *raw, long long *out) {
    if (!raw) return 0;
    raw = aeordb__ws(raw);
    int neg = *raw == '-';
    if (neg) raw++;
    if (*raw < '0' || *raw > '9') return 0;
    unsigned long long v = 0;
    while (*raw >= '0' && *raw <= '9') v = v * 10 + (unsigned long long)(*raw++ - '0');
    *out = neg ? -(long long)v : (long long)v;
    return 1;
}
char *aeordb_json_next(const char **cursor) {
    const char *s = aeordb__ws(*cursor);
    if (*s == '[') s = aeordb__ws(s + 1);
    else if (*s == ',') s = aeordb__ws(s + 1);
    if (!*s || *s == ']') { *cursor = s; return NULL; }
    const char *end = aeordb__skip(s);
    if (!end) { *cursor = ""; return NULL; }
    *cursor = end;
    return aeordb__copy(s, (size_t)(end - s));
}

/* ---- base64 ---- */
static const char aeordb__b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static void aeordb__b64_encode(aeordb_buf *b, const uint8_t *d, size_t n) {
    aeordb__reserve(b, (n + 2) / 3 * 4);
    char *o = b->data + b->len;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (i + 1 < n ? (uint32_t)d[i + 1] << 8 : 0) | (i + 2 < n ? d[i + 2] : 0);
        *o++ = aeordb__b64[v >> 18];
        *o++ = aeordb__b64[v >> 12 & 63];
        *o++ = i + 1 < n ? aeordb__b64[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? aeordb__b64[v & 63] : '=';
    }
    b->len = (size_t)(o - b->data);
    *o = 0;
}
static size_t aeordb__b64_decode(const char *s, uint8_t *out) {
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (; *s; s++) {
        int c = *s, d;
        if (c >= 'A' && c <= 'Z') d = c - 'A';
        else if (c >= 'a' && c <= 'z') d = c - 'a' + 26;
        else if (c >= '0' && c <= '9') d = c - '0' + 52;
        else if (c == '+' || c == '-') d = 62;
        else if (c == '/' || c == '_') d = 63;
        else continue;
        acc = acc << 6 | (uint32_t)d;
        if ((bits += 6) >= 8) { bits -= 8; out[n++] = (uint8_t)(acc >> bits); }
    }
    return n;
}

/* ---- request, response, envelope ---- */
const char *aeordb_meta(const aeordb_request *req, const char *key) {
    char *v = aeordb_json_string(aeordb_json_field(req->metadata, key));
    return v ? v : "";
}
const char *aeordb_function(const aeordb_request *req) {
    const char *f = aeordb_meta(req, "function_name");
    return *f ? f : aeordb_meta(req, "name");
}
const char *aeordb_content_type(const aeordb_request *req) { return aeordb_meta(req, "content_type"); }

aeordb_response aeordb_bytes(int status, const char *content_type, const void *body, size_t len) {
    aeordb_response r;
    memset(&r, 0, sizeof r);
    r.status = status;
    r.content_type = content_type;
    r.body = body;
    r.body_len = len;
    return r;
}
aeordb_response aeordb_text(int status, const char *text) {
    return aeordb_bytes(status, "text/plain; charset=utf-8", text, aeordb__strlen(text));
}
aeordb_response aeordb_json(int status, const char *json) {
    return aeordb_bytes(status, "application/json", json, aeordb__strlen(json));
}
void aeordb_header(aeordb_response *res, const char *name, const char *value) {
    if (res->header_count < AEORDB_MAX_HEADERS) {
        res->header_names[res->header_count] = name;
        res->header_values[res->header_count++] = value;
    }
}

static long long aeordb__pack(const void *p, size_t n) {
    return (long long)((uint64_t)(uintptr_t)p << 32 | (uint64_t)n);
}

#ifndef AEORDB_RAW
/* The byte array is decoded in place: it only shrinks. */
static aeordb_request aeordb__parse(char *buf, size_t len) {
    aeordb_request req = {(const uint8_t *)"", 0, "{}"};
    char *s = buf, *end = buf + len;
    if (len == 0) return req;
    buf[len] = 0;   /* alloc leaves a NUL after every block */
    s = (char *)aeordb__ws(s);
    if (*s++ != '{') return req;
    while (s < end) {
        s = (char *)aeordb__ws(s);
        if (*s != '"') break;
        char *k = s + 1, *kend = (char *)aeordb__skip_string(s);
        if (!kend) break;
        s = (char *)aeordb__ws(kend);
        if (*s++ != ':') break;
        s = (char *)aeordb__ws(s);
        if (aeordb__streq(k, (size_t)(kend - 1 - k), "arguments") && *s == '[') {
            uint8_t *w = (uint8_t *)s;
            req.body = w;
            for (s++; s < end && *s != ']';) {
                if (*s < '0' || *s > '9') { s++; continue; }
                unsigned v = 0;
                while (*s >= '0' && *s <= '9') v = v * 10 + (unsigned)(*s++ - '0');
                *w++ = (uint8_t)v;
            }
            req.body_len = (size_t)(w - req.body);
            *w = 0;   /* w is behind s: a text body is also a C string */
            s++;
        } else {
            char *vend = (char *)aeordb__skip(s);
            if (!vend) break;
            if (aeordb__streq(k, (size_t)(kend - 1 - k), "metadata")) req.metadata = aeordb__copy(s, (size_t)(vend - s));
            s = vend;
        }
        s = (char *)aeordb__ws(s);
        if (*s++ != ',') break;
    }
    return req;
}

static aeordb_buf aeordb__envelope(const aeordb_response *r) {
    aeordb_buf b = {0};
    aeordb__reserve(&b, 256 + r->body_len * 4);
    aeordb_buf_raw(&b, "{\"status_code\":");
    aeordb_buf_int(&b, r->status);
    aeordb_buf_raw(&b, ",\"content_type\":");
    aeordb_buf_str(&b, r->content_type ? r->content_type : "application/octet-stream");
    aeordb_buf_raw(&b, ",\"headers\":{");
    for (int i = 0; i < r->header_count; i++) {
        if (i) aeordb_buf_raw(&b, ",");
        aeordb_buf_str(&b, r->header_names[i]);
        aeordb_buf_raw(&b, ":");
        aeordb_buf_str(&b, r->header_values[i]);
    }
    aeordb_buf_raw(&b, "},\"body\":[");
    aeordb__reserve(&b, r->body_len * 4 + 3);
    char *o = b.data + b.len;
    const uint8_t *body = (const uint8_t *)r->body;
    for (size_t i = 0; i < r->body_len; i++) {
        unsigned c = body[i];
        if (c >= 100) *o++ = (char)('0' + c / 100);
        if (c >= 10) *o++ = (char)('0' + c / 10 % 10);
        *o++ = (char)('0' + c % 10);
        *o++ = ',';
    }
    if (r->body_len) o--;
    b.len = (size_t)(o - b.data);
    aeordb_buf_raw(&b, "]}");
    return b;
}

__attribute__((export_name("handle"))) long long aeordb__handle(char *ptr, size_t len) {
    aeordb_request req = aeordb__parse(ptr, len);
    aeordb_response res = aeordb_handle(&req);
    aeordb_buf out = aeordb__envelope(&res);
    return aeordb__pack(out.data, out.len);
}
#else
AEORDB__IMPORT("aeordb_set_response") long long aeordb__set_response(const char *p, size_t n);
int aeordb_set_response(int status, const char *content_type, const char *const *headers) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, "{\"status_code\":");
    aeordb_buf_int(&b, status);
    aeordb_buf_raw(&b, ",\"content_type\":");
    aeordb_buf_str(&b, content_type);
    aeordb_buf_raw(&b, ",\"headers\":{");
    for (int i = 0; headers && headers[i] && headers[i + 1]; i += 2) {
        if (i) aeordb_buf_raw(&b, ",");
        aeordb_buf_str(&b, headers[i]);
        aeordb_buf_raw(&b, ":");
        aeordb_buf_str(&b, headers[i + 1]);
    }
    aeordb_buf_raw(&b, "}}");
    long long r = aeordb__set_response(b.data, b.len);
    return r ? 0 : -1;
}
__attribute__((export_name("handle_raw"))) long long aeordb__handle_raw(const uint8_t *ptr, size_t len) {
    aeordb_buf out = aeordb_handle_raw(len ? ptr : (const uint8_t *)"", len);
    return aeordb__pack(out.data, out.len);
}
#endif

/* ---- host functions ---- */
static const char *aeordb__last_error = "";
const char *aeordb_last_error(void) { return aeordb__last_error; }

static char *aeordb__call(long long (*f)(const char *, size_t), const aeordb_buf *args) {
    uint64_t r = (uint64_t)f(args->data, args->len);
    char *ans = (char *)(uintptr_t)(r >> 32);
    if (!ans) { aeordb__last_error = "host function failed"; return NULL; }
    /* answers are placed with alloc, which ends every block with a NUL */
    char *err = aeordb_json_field(ans, "error");
    if (err) {
        char *msg = aeordb_json_string(err);
        aeordb__last_error = msg ? msg : err;
        return NULL;
    }
    return ans;
}
static aeordb_buf aeordb__path_args(const char *path) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, "{\"path\":");
    aeordb_buf_str(&b, path);
    aeordb_buf_raw(&b, "}");
    return b;
}
int aeordb_read_file(const char *path, aeordb_file *out) {
    aeordb_buf args = aeordb__path_args(path);
    char *ans = aeordb__call(aeordb__read_file, &args);
    if (!ans) return -1;
    const char *end, *data = aeordb__field(ans, "data", &end);
    char *text = data ? aeordb_json_string(data) : NULL;
    out->data = (uint8_t *)aeordb_alloc(text ? aeordb__strlen(text) / 4 * 3 + 3 : 1);
    out->len = text ? aeordb__b64_decode(text, out->data) : 0;
    char *ct = aeordb_json_string(aeordb_json_field(ans, "content_type"));
    out->content_type = ct ? ct : "";
    return 0;
}
int aeordb_write_file(const char *path, const void *data, size_t len, const char *content_type) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, "{\"path\":");
    aeordb_buf_str(&b, path);
    if (content_type && *content_type) {
        aeordb_buf_raw(&b, ",\"content_type\":");
        aeordb_buf_str(&b, content_type);
    }
    aeordb_buf_raw(&b, ",\"data\":\"");
    aeordb__b64_encode(&b, (const uint8_t *)data, len);
    aeordb_buf_raw(&b, "\"}");
    return aeordb__call(aeordb__write_file, &b) ? 0 : -1;
}
int aeordb_delete_file(const char *path) {
    aeordb_buf args = aeordb__path_args(path);
    return aeordb__call(aeordb__delete_file, &args) ? 0 : -1;
}
char *aeordb_file_metadata(const char *path) {
    aeordb_buf args = aeordb__path_args(path);
    return aeordb__call(aeordb__file_metadata, &args);
}
char *aeordb_list_directory(const char *path) {
    aeordb_buf args = aeordb__path_args(path);
    return aeordb__call(aeordb__list_directory, &args);
}
char *aeordb_extract_file(const char *path, const char *mode, long long start, long long end) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, "{\"path\":");
    aeordb_buf_str(&b, path);
    aeordb_buf_raw(&b, ",\"mode\":");
    aeordb_buf_str(&b, mode);
    if (start >= 0) { aeordb_buf_raw(&b, ",\"start\":"); aeordb_buf_int(&b, start); }
    if (end >= 0) { aeordb_buf_raw(&b, ",\"end\":"); aeordb_buf_int(&b, end); }
    aeordb_buf_raw(&b, "}");
    return aeordb__call(aeordb__extract_file, &b);
}
char *aeordb_query(const char *query_json) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, query_json);
    return aeordb__call(aeordb__query, &b);
}
char *aeordb_aggregate(const char *query_json) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, query_json);
    return aeordb__call(aeordb__aggregate, &b);
}
char *aeordb_context(void) {
    aeordb_buf b = {0};
    aeordb_buf_raw(&b, "{}");
    return aeordb__call(aeordb__context, &b);
}
void aeordb_log(const char *level, const char *message) {
    aeordb__log(level, aeordb__strlen(level), message, aeordb__strlen(message));
}
#endif /* AEORDB_IMPLEMENTATION */
#endif /* AEORDB_H */
