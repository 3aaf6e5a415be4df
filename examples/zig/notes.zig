//! notes: a JSON API over the plugin's database (see ../README.md).
//! add: {"text": "..."} -> 201 the stored note; list: newest first; else 404.
//! Two concurrent adds may pick the same seq (kept simple on purpose).
const aeordb = @import("aeordb.zig");
const eql = aeordb.eql;

comptime {
    aeordb.serve(handle);
}

fn handle(req: aeordb.Request) aeordb.Response {
    const f = req.function();
    var res = if (eql(f, "add")) add(req.body) else if (eql(f, "list")) list() else blk: {
        aeordb.log("info", aeordb.concat(&.{ "notes: unknown ", f }));
        var b = aeordb.Buf{};
        b.raw("{\"error\":");
        b.str(aeordb.concat(&.{ "unknown function '", f, "'" }));
        b.raw("}");
        break :blk aeordb.Response.json(404, b.slice());
    };
    res.header("x-plugin-language", "zig");
    return res;
}

fn add(body: []const u8) aeordb.Response {
    const text = aeordb.string(aeordb.field(body, "text") orelse "") orelse {
        aeordb.log("info", "notes: add rejected");
        return aeordb.Response.json(400, "{\"error\":\"body must be a JSON object with a string 'text'\"}");
    };
    const max = aeordb.aggregate("{\"path\":\"/notes\",\"aggregate\":{\"max\":[\"seq\"]}}") catch "{}";
    const seq = 1 + (aeordb.int(aeordb.field(aeordb.field(max, "max") orelse "{}", "seq") orelse "") orelse 0);
    var note = aeordb.Buf{};
    note.raw("{\"seq\":");
    note.int(seq);
    note.raw(",\"text\":");
    note.str(text);
    note.raw("}");
    var path = aeordb.Buf{};
    path.raw("/notes/");
    path.intPad(seq, 8);
    path.raw(".json");
    aeordb.writeFile(path.slice(), note.slice(), "application/json") catch
        return aeordb.Response.json(500, "{\"error\":\"could not write the note\"}");
    var line = aeordb.Buf{};
    line.raw("notes: add seq=");
    line.int(seq);
    aeordb.log("info", line.slice());
    return aeordb.Response.json(201, note.slice());
}

fn list() aeordb.Response {
    const found = aeordb.query("{\"path\":\"/notes\",\"order_by\":[{\"field\":\"seq\",\"direction\":\"desc\"}],\"limit\":100}") catch "{}";
    var out = aeordb.Buf{};
    out.raw("{\"notes\":[");
    var n: i64 = 0;
    var it = aeordb.items(aeordb.field(found, "items") orelse "[]");
    while (it.next()) |item| {
        const file = aeordb.readFile(aeordb.string(aeordb.field(item, "path") orelse "") orelse "") catch continue;
        if (n > 0) out.raw(",");
        out.raw("{\"seq\":");
        out.int(aeordb.int(aeordb.field(file.data, "seq") orelse "") orelse 0);
        out.raw(",\"text\":");
        out.str(aeordb.string(aeordb.field(file.data, "text") orelse "") orelse "");
        out.raw("}");
        n += 1;
    }
    out.raw("]}");
    var line = aeordb.Buf{};
    line.raw("notes: list ");
    line.int(n);
    aeordb.log("info", line.slice());
    return aeordb.Response.json(200, out.slice());
}
