//! notes: a JSON API over the plugin's database (see ../README.md).
//! add: {"text": "..."} -> 201 the stored note; list: newest first; else 404.
//! Two concurrent adds may pick the same seq (kept simple on purpose).
mod aeordb;
use aeordb::{Response, Value};
aeordb::serve!(handle);

fn handle(req: aeordb::Request) -> Response {
    let res = match req.function() {
        "add" => add(req.body),
        "list" => list(),
        other => {
            aeordb::log("info", &format!("notes: unknown {}", other));
            let error = format!("unknown function '{}'", other);
            Response::json(404, Value::object([("error", error.into())]))
        }
    };
    res.header("x-plugin-language", "rust")
}

fn add(body: &[u8]) -> Response {
    let text = match Value::parse_bytes(body).as_ref().and_then(|b| b.get("text").as_str()) {
        Some(text) => text.to_string(),
        None => {
            aeordb::log("info", "notes: add rejected");
            return Response::json(400, r#"{"error":"body must be a JSON object with a string 'text'"}"#);
        }
    };
    let max = aeordb::aggregate(r#"{"path":"/notes","aggregate":{"max":["seq"]}}"#).unwrap_or(Value::Null);
    let seq = max.get("max").get("seq").as_i64().unwrap_or(0) + 1;
    let note = Value::object([("seq", seq.into()), ("text", text.into())]).to_string();
    if let Err(e) = aeordb::write_file(&format!("/notes/{:08}.json", seq), note.as_bytes(), "application/json") {
        return Response::json(500, Value::object([("error", e.into())]));
    }
    aeordb::log("info", &format!("notes: add seq={}", seq));
    Response::json(201, note)
}

fn list() -> Response {
    let query = r#"{"path":"/notes","order_by":[{"field":"seq","direction":"desc"}],"limit":100}"#;
    let found = aeordb::query(query).unwrap_or(Value::Null);
    let notes: Vec<Value> = found.get("items").as_array().iter()
        .filter_map(|item| aeordb::read_file(item.get("path").as_str()?).ok())
        .filter_map(|file| Value::parse_bytes(&file.data))
        .map(|note| Value::object([("seq", note.get("seq").clone()), ("text", note.get("text").clone())]))
        .collect();
    aeordb::log("info", &format!("notes: list {}", notes.len()));
    Response::json(200, Value::object([("notes", notes.into())]))
}
