// notes: a small JSON API over the plugin's database.
//
//	add  {"text": "..."} -> 201 {"seq": n, "text": "..."}, stored at /notes/<seq, 8 digits>.json
//	list                 -> 200 {"notes": [...]}, newest first
//
// seq is 1 + the current maximum: two adds at the same time may race for the
// same seq (kept simple on purpose).
package main

import (
	"encoding/json"
	"fmt"

	"aeordb"
)

type note struct {
	Seq  int64  `json:"seq"`
	Text string `json:"text"`
}

//go:wasmexport handle
func handle(ptr, size int32) int64 { return aeordb.Serve(ptr, size, notes) }

func notes(req *aeordb.Request) *aeordb.Response {
	status, answer, line := route(req)
	aeordb.Log("info", line)
	return aeordb.JSON(status, answer).Header("x-plugin-language", "go")
}

func route(req *aeordb.Request) (int, any, string) {
	switch fn := req.Function(); fn {
	case "add":
		var in struct {
			Text *string `json:"text"`
		}
		if req.JSON(&in) != nil || in.Text == nil {
			return 400, fail("body must be a JSON object with a string 'text'"), "notes: add bad body"
		}
		agg, err := aeordb.Aggregate(aeordb.Q{"path": "/notes", "aggregate": aeordb.Q{"max": []string{"seq"}}})
		if err != nil {
			return 500, fail(err.Error()), "notes: add failed: " + err.Error()
		}
		n := note{Seq: 1, Text: *in.Text}
		if max := agg.Max["seq"]; max != nil {
			n.Seq = int64(*max) + 1
		}
		if err := aeordb.WriteFile(fmt.Sprintf("/notes/%08d.json", n.Seq), aeordb.EncodeJSON(n), "application/json"); err != nil {
			return 500, fail(err.Error()), "notes: add failed: " + err.Error()
		}
		return 201, n, fmt.Sprintf("notes: add seq=%d", n.Seq)
	case "list":
		found, err := aeordb.Query(aeordb.Q{"path": "/notes", "limit": 100,
			"order_by": []aeordb.Q{{"field": "seq", "direction": "desc"}}})
		if err != nil {
			return 500, fail(err.Error()), "notes: list failed: " + err.Error()
		}
		list := []note{}
		for _, item := range found.Items {
			var n note
			if f, err := aeordb.ReadFile(item.Path); err == nil && json.Unmarshal(f.Data, &n) == nil {
				list = append(list, n)
			}
		}
		return 200, map[string][]note{"notes": list}, fmt.Sprintf("notes: list %d", len(list))
	default:
		return 404, fail(fmt.Sprintf("unknown function '%s'", fn)), "notes: unknown " + fn
	}
}

func fail(message string) map[string]string { return map[string]string{"error": message} }

func main() {} // required by Go; a reactor module never runs it
