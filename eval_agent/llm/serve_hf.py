"""A small OpenAI-compatible completions server over HFBackend, so the CPU path and the tests run
the same HTTP client code (OpenAIBackend) against a real server process, as a GPU run does with vLLM.

    python -m eval_agent.llm.serve_hf --model models/SmolLM2-135M-Instruct --port 8000

Speaks the part of vLLM's protocol OpenAIBackend uses: `GET /health`, `GET /v1/models`,
`POST /v1/completions` (prompt as text or a list of texts; n, temperature, top_p, max_tokens, stop,
seed), and `POST /v1/chat/completions` for the reflection client (messages rendered with the served
model's chat format, then completed as above). As vLLM does: the served name defaults to --model as
given; prompt + max_tokens over the context is refused with HTTP 400 in vLLM's wording;
`max_tokens: null` means up to the end of the context. Prompts are tokenized without adding special
tokens (HFBackend's rule, which OpenAIBackend asks vLLM for too). One model, so generation is
serialized with a lock; requests are not batched together (throughput comes from vLLM, not from
here). Standard library only.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from eval_agent.chat_format import FORMATS, ChatFormat, resolve_chat_format
from eval_agent.cli import model_folder, run_main
from eval_agent.llm import GenerationConfig
from eval_agent.llm.hf import HFBackend


def _error(status: int, message: str, kind: str = "BadRequestError") -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


def complete(backend: HFBackend, name: str, lock: threading.Lock, req: dict[str, Any]) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one /v1/completions request."""
    if req.get("model") != name:
        return _error(404, f"The model `{req.get('model')}` does not exist.", "NotFoundError")
    prompts = req.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts or not all(isinstance(p, str) for p in prompts):
        return _error(400, "prompt must be a string or a list of strings (token ids are not supported here)")
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    n = int(req.get("n") or 1)
    max_tokens = req.get("max_tokens", 16)  # OpenAI's and vLLM's default
    limit = backend.max_context
    lengths = [len(backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for length in lengths:
        if limit is not None and (length >= limit or length + (max_tokens or 0) > limit):
            return _error(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{max_tokens or 0} output tokens and your prompt contains {length} input tokens, for a "
                               f"total of {length + (max_tokens or 0)} tokens. Please reduce the length of the input "
                               f"prompt or the number of requested output tokens.")
    config = GenerationConfig(
        max_new_tokens=max_tokens if max_tokens is not None else (limit or 16),  # HFBackend caps it per prompt
        temperature=float(req["temperature"]) if req.get("temperature") is not None else 1.0,
        top_p=float(req["top_p"]) if req.get("top_p") is not None else 1.0,
        n=n, stop=tuple(stop), seed=req.get("seed"),
    )
    with lock:
        outs = backend.generate(prompts, config)
    choices = [{"index": i * n + k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
               for i, cs in enumerate(outs) for k, c in enumerate(cs)]
    completion_tokens = sum(c.num_tokens for cs in outs for c in cs)
    return 200, {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": name,
        "choices": choices,
        "usage": {"prompt_tokens": sum(lengths), "completion_tokens": completion_tokens,
                  "total_tokens": sum(lengths) + completion_tokens},
    }


def chat_complete(backend: HFBackend, name: str, lock: threading.Lock, chat_format: str,
                  req: dict[str, Any]) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one /v1/chat/completions request: the messages rendered with the
    model's chat format, completed as /v1/completions does; no max_tokens means up to the end of the context."""
    messages = req.get("messages")
    if not messages or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                and isinstance(m.get("content"), str) for m in messages):
        return _error(400, "messages must be a non-empty list of {role: system|user|assistant, content: string}")
    try:
        prompt = ChatFormat(chat_format, backend.tokenizer).render(
            [{"role": m["role"], "content": m["content"]} for m in messages])
    except ValueError as e:
        return _error(400, f"cannot render the messages: {e}")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    sub = {k: req.get(k) for k in ("model", "n", "temperature", "top_p", "stop", "seed")}
    status, body = complete(backend, name, lock, {**sub, "prompt": prompt, "max_tokens": max_tokens})
    if status != 200:
        return status, body
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"]} for c in body["choices"]]
    return 200, {**body, "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "choices": choices}


class Server(ThreadingHTTPServer):
    daemon_threads = True  # open keep-alive connections do not hold up shutdown

    def __init__(self, address: tuple[str, int], backend: HFBackend, name: str, chat_format: str = "template",
                 log_requests: str | None = None):
        super().__init__(address, Handler)
        self.backend, self.name, self.lock, self.chat_format = backend, name, threading.Lock(), chat_format
        self.log_requests = log_requests  # JSONL of every generation request: what exactly the model was asked


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client expects
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the caller's log

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send(200, {})
        elif path == "/v1/models":
            model = {"id": self.server.name, "object": "model", "created": 0, "owned_by": "serve_hf",
                     "max_model_len": self.server.backend.max_context}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._send(*_error(404, f"no route {path}", "NotFoundError"))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # always read: keep-alive
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send(*_error(404, f"no route {self.path}", "NotFoundError"))
        try:
            req = json.loads(body or b"{}")
        except ValueError as e:
            return self._send(*_error(400, f"invalid JSON: {e}"))
        s = self.server
        if s.log_requests:
            with s.lock, open(s.log_requests, "a", encoding="utf-8") as f:
                f.write(json.dumps({"path": path, **req}, ensure_ascii=False) + "\n")
        try:
            if path == "/v1/completions":
                self._send(*complete(s.backend, s.name, s.lock, req))
            else:
                self._send(*chat_complete(s.backend, s.name, s.lock, s.chat_format, req))
        except Exception as e:  # a bug here is the server's fault: 500, and the traceback on stderr
            traceback.print_exc()
            self._send(*_error(500, f"{type(e).__name__}: {e}", "InternalServerError"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--served-model-name", help="name clients ask for (default: --model as given, like vLLM)")
    p.add_argument("--max_context", "--max-model-len", type=int, help="context window (default: the model's)")
    p.add_argument("--batch_size", type=int, default=16, help="HFBackend sub-batch size (n samples, prompt lists)")
    p.add_argument("--chat_format", choices=FORMATS,
                   help="how /v1/chat/completions renders messages (default: what the model folder records, "
                        "else template)")
    p.add_argument("--log_requests", help="append every generation request (prompt and settings) to this JSONL file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model_folder(args.model)
    backend = HFBackend(args.model, max_context=args.max_context, batch_size=args.batch_size)
    name = args.served_model_name or args.model
    server = Server((args.host, args.port), backend, name, resolve_chat_format(args.model, args.chat_format),
                    log_requests=args.log_requests)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # leaves serve_forever in the main thread

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("serve_hf: stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main)
