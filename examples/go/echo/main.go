// echo: answers the request body unchanged, with the request's content type.
// Build: see ../build.sh.
package main

import (
	"fmt"
	"os"

	"aeordb"
)

//go:wasmexport handle
func handle(ptr, size int32) int64 { return aeordb.Serve(ptr, size, echo) }

func echo(req *aeordb.Request) *aeordb.Response {
	fmt.Fprintln(os.Stderr, "echo:", len(req.Body), "bytes")
	contentType := req.ContentType()
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	return aeordb.Bytes(200, contentType, req.Body).Header("x-plugin-language", "go")
}

func main() {} // required by Go; a reactor module never runs it
