// echo: answers the request body unchanged, with the request's content type.
// Build: see build.sh.
import { Request, Response, serve } from "./aeordb";
export { alloc } from "./aeordb";

export function handle(ptr: i32, len: i32): i64 {
  return serve(ptr, len, echo);
}

function echo(req: Request): Response {
  const contentType = req.contentType();
  return Response.bytes(200, contentType.length > 0 ? contentType : "application/octet-stream", req.body)
    .header("x-plugin-language", "assemblyscript");
}
