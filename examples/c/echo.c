/* echo: answers the request body unchanged, with the request's content type
 * (see ../README.md). Build: ./build.sh */
#include <stdio.h>
#define AEORDB_IMPLEMENTATION
#include "aeordb.h"

aeordb_response aeordb_handle(const aeordb_request *req) {
    const char *type = aeordb_content_type(req);
    fprintf(stderr, "echo: %zu bytes\n", req->body_len);
    aeordb_response res = aeordb_bytes(200, *type ? type : "application/octet-stream", req->body, req->body_len);
    aeordb_header(&res, "x-plugin-language", "c");
    return res;
}
