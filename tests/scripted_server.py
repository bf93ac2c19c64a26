"""A scripted OpenAI-compatible server, run as its own process on loopback (the tests' stand-in for a misbehaving
vLLM replica). Standard library only.

    python tests/scripted_server.py --model fake     # prints "serving fake on http://127.0.0.1:PORT/v1"

- `GET /v1/models` lists the model; `GET /stats` gives the POSTs answered so far.
- `POST /v1/completions` and `/v1/chat/completions` answer a valid reply (`text` for every choice, or the
  chat message's content) unless told otherwise by `POST /control` with a JSON object:
  `script`: raw replies (`{"status", "body", "headers"}`) for the next POSTs, in order;
  `hang`: seconds every POST waits before it is answered (a hung server: longer than the client waits);
  `poison` + `poison_reply`: that raw reply to every POST whose prompt or messages contain `poison`;
  `text`: the valid reply's text; `posts`: the count to start from.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class State:
    def __init__(self, model: str):
        self.model, self.lock = model, threading.Lock()
        self.script: list[dict[str, Any]] = []
        self.poison: str | None = None
        self.poison_reply: dict[str, Any] = {}
        self.text = "Thought: I count.\nAction: count 1"
        self.posts = 0
        self.hang = 0.0


def valid_reply(state: State, path: str, req: dict[str, Any]) -> dict[str, Any]:
    n = int(req.get("n") or 1)
    if path.endswith("/chat/completions"):
        choices = [{"index": k, "message": {"role": "assistant", "content": state.text}, "finish_reason": "stop"}
                   for k in range(n)]
    else:
        choices = [{"index": k, "text": state.text, "finish_reason": "stop"} for k in range(n)]
    return {"status": 200, "body": json.dumps({"id": "x", "object": "text_completion", "model": state.model,
                                               "choices": choices,
                                               "usage": {"prompt_tokens": 3, "completion_tokens": 2 * n}})}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _raw(self, reply: dict[str, Any]) -> None:
        data = reply.get("body", "").encode()
        self.send_response(reply.get("status", 200))
        headers = {"Content-Type": "application/json", **reply.get("headers", {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        state = self.server.state
        if self.path.rstrip("/").endswith("/models"):
            self._raw({"body": json.dumps({"object": "list", "data": [{"id": state.model, "object": "model"}]})})
        elif self.path.rstrip("/") == "/stats":
            self._raw({"body": json.dumps({"posts": state.posts})})
        else:
            self._raw({"status": 404, "body": json.dumps({"error": {"message": "no route"}})})

    def do_POST(self) -> None:
        state = self.server.state
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        path = self.path.rstrip("/")
        if path == "/control":
            with state.lock:
                for k in ("script", "poison", "poison_reply", "text", "posts", "hang"):
                    if k in req:
                        setattr(state, k, req[k])
            return self._raw({"body": "{}"})
        with state.lock:
            state.posts += 1
            scripted = state.script.pop(0) if state.script else None
        if state.hang:
            time.sleep(state.hang)
        said = json.dumps(req.get("prompt", req.get("messages")))
        if state.poison and state.poison in said:
            return self._raw(state.poison_reply)
        self._raw(scripted or valid_reply(state, path, req))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model: str):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = State(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="fake")
    args = p.parse_args()
    server = Server(args.model)
    print(f"serving {args.model} on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
