//! echo: answers the request body unchanged, with the request's content type
//! (see ../README.md). Build: ./build.sh
mod aeordb;
aeordb::serve!(handle);

fn handle(req: aeordb::Request) -> aeordb::Response {
    eprintln!("echo: {} bytes", req.body.len());
    let content_type = match req.content_type() {
        "" => "application/octet-stream",
        t => t,
    };
    aeordb::Response::bytes(200, content_type, req.body).header("x-plugin-language", "rust")
}
