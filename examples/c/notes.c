/* notes: a JSON API over the plugin's database (see ../README.md).
 * add: {"text": "..."} -> 201 the stored note; list: newest first; else 404.
 * Two concurrent adds may pick the same seq (kept simple on purpose). */
#define AEORDB_IMPLEMENTATION
#include "aeordb.h"

static aeordb_response add(const aeordb_request *req) {
    char *text = aeordb_json_string(aeordb_json_field((const char *)req->body, "text"));
    if (!text) {
        aeordb_log("info", "notes: add rejected");
        return aeordb_json(400, "{\"error\":\"body must be a JSON object with a string 'text'\"}");
    }
    long long seq = 0;
    char *max = aeordb_aggregate("{\"path\":\"/notes\",\"aggregate\":{\"max\":[\"seq\"]}}");
    aeordb_json_int(aeordb_json_field(aeordb_json_field(max, "max"), "seq"), &seq);
    aeordb_buf note = {0}, path = {0}, line = {0};
    aeordb_buf_raw(&note, "{\"seq\":"); aeordb_buf_int(&note, ++seq);
    aeordb_buf_raw(&note, ",\"text\":"); aeordb_buf_str(&note, text); aeordb_buf_raw(&note, "}");
    aeordb_buf_raw(&path, "/notes/"); aeordb_buf_int_pad(&path, seq, 8); aeordb_buf_raw(&path, ".json");
    if (aeordb_write_file(path.data, note.data, note.len, "application/json") < 0)
        return aeordb_json(500, "{\"error\":\"could not write the note\"}");
    aeordb_buf_raw(&line, "notes: add seq="); aeordb_buf_int(&line, seq);
    aeordb_log("info", line.data);
    return aeordb_json(201, note.data);
}

static aeordb_response list(void) {
    char *found = aeordb_query("{\"path\":\"/notes\",\"order_by\":[{\"field\":\"seq\",\"direction\":\"desc\"}],\"limit\":100}");
    const char *cursor = found ? aeordb_json_field(found, "items") : "[]";
    aeordb_buf out = {0}, line = {0};
    aeordb_file file;
    long long n = 0, seq = 0;
    aeordb_buf_raw(&out, "{\"notes\":[");
    for (char *item; (item = aeordb_json_next(&cursor));) {
        char *path = aeordb_json_string(aeordb_json_field(item, "path"));
        if (!path || aeordb_read_file(path, &file) < 0) continue;
        char *doc = aeordb_strdup((const char *)file.data), *text = aeordb_json_string(aeordb_json_field(doc, "text"));
        aeordb_json_int(aeordb_json_field(doc, "seq"), &seq);
        aeordb_buf_raw(&out, n++ ? ",{\"seq\":" : "{\"seq\":"); aeordb_buf_int(&out, seq);
        aeordb_buf_raw(&out, ",\"text\":"); aeordb_buf_str(&out, text ? text : ""); aeordb_buf_raw(&out, "}");
    }
    aeordb_buf_raw(&out, "]}");
    aeordb_buf_raw(&line, "notes: list "); aeordb_buf_int(&line, n);
    aeordb_log("info", line.data);
    return aeordb_json(200, out.data);
}

aeordb_response aeordb_handle(const aeordb_request *req) {
    const char *f = aeordb_function(req);
    aeordb_response res;
    if (aeordb_streq(f, "add")) res = add(req);
    else if (aeordb_streq(f, "list")) res = list();
    else {
        aeordb_log("info", aeordb_concat("notes: unknown ", f, NULL));
        aeordb_buf err = {0};
        aeordb_buf_raw(&err, "{\"error\":"); aeordb_buf_str(&err, aeordb_concat("unknown function '", f, "'", NULL));
        aeordb_buf_raw(&err, "}");
        res = aeordb_json(404, err.data);
    }
    aeordb_header(&res, "x-plugin-language", "c");
    return res;
}
