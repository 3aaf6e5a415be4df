// notes: a small JSON API over the plugin's database.
//   add  {"text": "..."} -> 201 {"seq": n, "text": "..."}, stored at /notes/<seq, 8 digits>.json
//   list                 -> 200 {"notes": [...]}, newest first
// seq is 1 + the current maximum: two adds at the same time may race for the
// same seq (kept simple on purpose).
import {
  Request, Response, serve, log, aggregate, writeFile, query, readFile, lastError,
  jsonString, jsonIsObject, jsonGetString, jsonGetNumber, utf8,
} from "./aeordb";
export { alloc } from "./aeordb";

export function handle(ptr: i32, len: i32): i64 {
  return serve(ptr, len, notes);
}

function notes(req: Request): Response {
  const fn = req.functionName();
  let status = 200, body = "", line = "";
  if (fn == "add") {
    const input = req.text();
    const text = jsonIsObject(input) ? jsonGetString(input, "text") : null;
    if (text == null) {
      status = 400; body = fail("body must be a JSON object with a string 'text'"); line = "notes: add bad body";
    } else {
      const agg = aggregate('{"path":"/notes","aggregate":{"max":["seq"]}}');
      const max = agg != null ? jsonGetNumber(agg, "max.seq") : NaN;
      const seq: i64 = isNaN(max) ? 1 : <i64>max + 1;
      const note = '{"seq":' + seq.toString() + ',"text":' + jsonString(text) + "}";
      const saved = agg != null &&
        writeFile("/notes/" + seq.toString().padStart(8, "0") + ".json", utf8(note), "application/json");
      if (saved) {
        status = 201; body = note; line = "notes: add seq=" + seq.toString();
      } else {
        status = 500; body = fail(lastError()); line = "notes: add failed: " + lastError();
      }
    }
  } else if (fn == "list") {
    const found = query('{"path":"/notes","order_by":[{"field":"seq","direction":"desc"}],"limit":100}');
    if (found == null) {
      status = 500; body = fail(lastError()); line = "notes: list failed: " + lastError();
    } else {
      const items = new Array<string>();
      for (let i = 0; i < found.items.length; i++) {
        const file = readFile(found.items[i].path);
        if (file == null) continue;
        const note = file.text(), text = jsonGetString(note, "text");
        if (text != null) items.push('{"seq":' + (<i64>jsonGetNumber(note, "seq")).toString() + ',"text":' + jsonString(text) + "}");
      }
      body = '{"notes":[' + items.join(",") + "]}"; line = "notes: list " + items.length.toString();
    }
  } else {
    status = 404; body = fail("unknown function '" + fn + "'"); line = "notes: unknown " + fn;
  }
  log("info", line);
  return Response.json(status, body).header("x-plugin-language", "assemblyscript");
}

function fail(message: string): string {
  return '{"error":' + jsonString(message) + "}";
}
