//! echo: answers the request body unchanged, with the request's content type
//! (see ../README.md). Build: ./build.sh
const aeordb = @import("aeordb.zig");

comptime {
    aeordb.serve(handle);
}

fn handle(req: aeordb.Request) aeordb.Response {
    const ct = req.contentType();
    var res = aeordb.Response.bytes(200, if (ct.len > 0) ct else "application/octet-stream", req.body);
    res.header("x-plugin-language", "zig");
    return res;
}
