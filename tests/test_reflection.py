"""Reflection (data_collection/reflection.py): reply cleaning, the on-disk cache, retries and counts,
the chat backend against real local servers (serve_hf over the tiny model; a scripted endpoint for
valid replies, rate limits and outages), and the self backend through the in-process tiny model."""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from data_collection.reflection import (
    PLACEHOLDER, ChatModel, Reflection, ReflectionRequest, Reflector, add_reflection_args, clean_reflection,
    cost_usd, reflection_messages, reflector_from_args,
)
from eval_agent.llm import BackendUnavailable
from eval_agent.runner import add_model_args

GT = "take mug 1 from countertop 2"


def request(key: str = "r0", action: str = GT, observation: str = "Nothing happens.") -> ReflectionRequest:
    history = [
        {"role": "user", "content": "Interact with a household to solve a task. Reply with Thought and Action."},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": "You are in the middle of a room.\nYour task is to: heat some mug."},
        {"role": "assistant", "content": "Thought: A mug may be on a countertop.\nAction: go to countertop 2"},
        {"role": "user", "content": "Observation: On the countertop 2, you see a mug 1."},
        {"role": "assistant", "content": "Thought: I should look elsewhere.\nAction: go to cabinet 1"},
        {"role": "user", "content": f"Observation: {observation}"},
    ]
    return ReflectionRequest(key=key, history=history, expert_action=action)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--task_family", "--task", default="alfworld")
    add_model_args(p)
    add_reflection_args(p)
    return p.parse_args(argv)


@pytest.fixture
def chat_env(monkeypatch):
    """Point the chat backend at `url` with a recognisable key (it must never show up in errors)."""
    def point(url: str, key: str | None = "sk-test-SECRET") -> None:
        monkeypatch.delenv("REFLECT_API_KEY", raising=False)
        monkeypatch.delenv("REFLECT_BASE_URL", raising=False)
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        if key is None:
            monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        else:
            monkeypatch.setenv("OPENAI_API_KEY", key)
    return point


# --- reply cleaning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, text, replaced", [
    (f"Thought: The mug is on countertop 2.\nAction: {GT}", "Thought: The mug is on countertop 2.", False),
    ("Gpt: Thought: The mug is on countertop 2.\nAction: go to cabinet 1", "Thought: The mug is on countertop 2.",
     True),
    ("Assistant: Thought: Back to the mug.\nAction: take mug 1", "Thought: Back to the mug.", True),
    # a preamble is dropped; a missing action is added
    ("Sure, here it is:\n\nThought: Back to the mug.", "Thought: Back to the mug.", False),
    ("Thought: Cabinet 1 was a detour.\nThe mug is\n  on countertop 2.\nAction: " + GT,
     "Thought: Cabinet 1 was a detour. The mug is on countertop 2.", False),
    (f"Thought: First the mug.\nAction: {GT}\nObservation: You pick up the mug 1.\nThought: Now heat it.\n"
     "Action: go to microwave 1", "Thought: First the mug.", False),  # several actions: the first step only
    ("**Thought:** The mug is there. Action: go to countertop 2", "Thought: The mug is there.", True),
    ("Thought: Back to the mug.\nHuman: Observation: x", "Thought: Back to the mug.", False),
    ("Thought: Back to the mug.\n\nThis thought notes the detour.", "Thought: Back to the mug.", False),
    (f"Thought: Back to\nthe mug.\n\nAction: {GT}\n\nThis thought notes the detour.", "Thought: Back to the mug.",
     False),
])
def test_clean_valid_replies(reply, text, replaced):
    cleaned = clean_reflection(reply, GT)
    assert cleaned.error is None
    assert cleaned.text == f"{text}\nAction: {GT}"
    assert cleaned.action_replaced is replaced


@pytest.mark.parametrize("reply, error", [
    ("", "empty reply"),
    (None, "empty reply"),
    ("  \n", "empty reply"),
    (f"Action: {GT}", "no 'Thought:'"),
    ("I would go back to the countertop.", "no 'Thought:'"),
    (f"Thought:\nAction: {GT}", "empty thought"),
    (f"Thought: {PLACEHOLDER}\nAction: {GT}", "empty thought"),
])
def test_clean_invalid_replies(reply, error):
    cleaned = clean_reflection(reply, GT)
    assert cleaned.text is None and error in cleaned.error


def test_clean_truncated_reply_needs_its_action():
    assert clean_reflection("Thought: The mug is on", GT, truncated=True).text is None
    want = f"Thought: The mug.\nAction: {GT}"
    assert clean_reflection("Thought: The mug.\n\nThis thought is cut", GT, truncated=True).text == want
    assert clean_reflection(f"Thought: The mug.\nAction: {GT}\nObs", GT, truncated=True).text == want


def test_messages_carry_history_mistake_and_ground_truth():
    req = request()
    msgs = reflection_messages(req)
    assert msgs[:-1] == req.history[:-1]
    last = msgs[-1]["content"]
    assert last.startswith("Observation: Nothing happens.\n\n") and "not optimal" in last and f": {GT}\n" in last
    assert last.rstrip().endswith(f"Action: {GT}")
    assert req.history[-1]["content"] == "Observation: Nothing happens."  # the request is not modified


@pytest.mark.parametrize("change, error", [
    (lambda r: setattr(r, "expert_action", ""), "expert_action"),
    (lambda r: setattr(r, "expert_action", "go to a\nAction: b"), "expert_action"),
    (lambda r: r.history.pop(), "end with"),
    (lambda r: r.history.pop(1), "turn 1"),
])
def test_bad_requests_name_the_key(change, error):
    req = request("bad-key")
    change(req)
    with pytest.raises(ValueError, match=f"'bad-key'.*{error}"):
        reflection_messages(req)


def test_cost_table():
    assert cost_usd("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.5)
    assert cost_usd("gpt-4o-mini", 2_000_000, 0) == pytest.approx(0.3)
    assert cost_usd("my-local-model", 10, 10) is None


# --- a scripted chat endpoint: valid replies, rate limits, outages ------------------------------------

class ScriptedChat:
    """A stdlib OpenAI-compatible chat server. `script` is a list of HTTP statuses answered to the first
    POSTs in turn; then it replies `Gpt: Thought: ...` about the request's last observation (valid after
    cleaning, with a wrong action that must be replaced)."""

    def __init__(self, script: list[int] | None = None, fail_when: str | None = None):
        self.script, self.fail_when, self.posts, self.requests = list(script or []), fail_when, 0, []
        lock, fake = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = req["messages"][-1]["content"]
                with lock:
                    fake.posts += 1
                    fake.requests.append(req)
                    status = fake.script.pop(0) if fake.script else 200
                if fake.fail_when and fake.fail_when in last:
                    status = 503
                if status != 200:
                    return self._send(status, {"error": {"message": "scripted", "type": "x", "code": status}},
                                      [("Retry-After", "0")] if status == 429 else ())
                observation = last.split("\n", 1)[0]
                content = f"Gpt: Thought: After '{observation}' I go back.\nAction: go to cabinet 1"
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(*args, **kwargs) -> ScriptedChat:
        servers.append(ScriptedChat(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def chat_reflector(tmp_path: Path, *argv: str) -> Reflector:
    reflector = reflector_from_args(parse(["--reflect_backend", "chat", *argv]), tmp_path / "cache.jsonl")
    reflector.model.client.retry = replace(reflector.model.client.retry, backoff_s=0.001)
    return reflector


def test_chat_valid_replies_cleaned_tokens_and_cost(tmp_path, scripted, chat_env):
    server = scripted()
    chat_env(server.url)
    reflector = chat_reflector(tmp_path, "--reflect_concurrency", "3")
    reqs = [request(f"r{i}", observation=f"obs {i}") for i in range(5)]
    out = reflector.reflect(reqs)
    assert [r.key for r in out] == [f"r{i}" for i in range(5)]  # request order, whatever the arrival order
    for i, r in enumerate(out):
        assert r == Reflection(key=f"r{i}", text=f"Thought: After 'Observation: obs {i}' I go back.\nAction: {GT}",
                               ok=True, backend="chat", model="gpt-4o", cached=False, attempts=1, error=None,
                               prompt_tokens=100, completion_tokens=20)
    sent = server.requests[0]
    assert sent["model"] == "gpt-4o" and sent["temperature"] == 1.0 and sent["max_tokens"] == 256
    assert len(sent["messages"]) == len(reqs[0].history)
    s = reflector.summary()
    counts = ("requests", "ok", "invalid", "calls", "cache_hits", "actions_replaced")
    assert [s[c] for c in counts] == [5, 5, 0, 5, 0, 5]
    assert (s["prompt_tokens"], s["completion_tokens"]) == (500, 100)
    assert s["cost_usd"] == pytest.approx((500 * 2.5 + 100 * 10) / 1e6)


def test_cache_hit_miss_and_invalidation(tmp_path, scripted, chat_env):
    server = scripted()
    chat_env(server.url)
    reqs = [request("a", observation="obs a"), request("b", observation="obs b")]
    first = chat_reflector(tmp_path).reflect(reqs)
    assert server.posts == 2

    again = chat_reflector(tmp_path)  # a rerun (new process): everything from the cache, nothing asked
    hits = again.reflect(reqs)
    assert server.posts == 2
    assert [r.text for r in hits] == [r.text for r in first] and all(r.cached for r in hits)
    assert all((r.prompt_tokens, r.completion_tokens) == (100, 20) for r in hits)  # what they cost when asked
    s = again.summary()
    assert (s["calls"], s["cache_hits"], s["prompt_tokens"], s["cost_usd"]) == (0, 2, 0, 0.0)

    # a changed prompt misses for that request only
    changed = again.reflect([reqs[0], request("b", action="take mug 2 from countertop 2", observation="obs b")])
    assert server.posts == 3 and [r.cached for r in changed] == [True, False]
    assert changed[1].text.endswith("Action: take mug 2 from countertop 2")
    # another model or other generation settings miss for all
    for argv in (["--reflect_model", "gpt-4o-mini"], ["--reflect_temperature", "0"], ["--reflect_max_tokens", "64"],
                 ["--reflect_seed", "1"]):
        before = server.posts
        assert not any(r.cached for r in chat_reflector(tmp_path, *argv).reflect(reqs))
        assert server.posts == before + 2, argv
    assert server.requests[-1]["seed"] == 1


def test_cache_resumes_after_a_kill_and_a_torn_line(tmp_path, scripted, chat_env):
    broken = scripted(fail_when="obs b")  # the endpoint dies on b: the stage stops, a's reply is kept
    chat_env(broken.url)
    reqs = [request("a", observation="obs a"), request("b", observation="obs b")]
    with pytest.raises(BackendUnavailable, match="HTTP 503: scripted"):
        chat_reflector(tmp_path, "--reflect_http_retries", "1", "--reflect_concurrency", "1").reflect(reqs)
    cache = tmp_path / "cache.jsonl"
    assert len(cache.read_text().splitlines()) == 1
    with cache.open("a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write
    healthy = scripted()
    chat_env(healthy.url)
    out = chat_reflector(tmp_path).reflect(reqs)
    assert [r.ok for r in out] == [True, True] and [r.cached for r in out] == [True, False]
    assert healthy.posts == 1
    assert all(json.loads(line)["key"] for line in cache.read_text().splitlines())


def test_rate_limits_and_server_errors_back_off_then_succeed(tmp_path, scripted, chat_env):
    server = scripted(script=[429, 500, 502])
    chat_env(server.url)
    reflector = chat_reflector(tmp_path, "--reflect_http_retries", "3")
    [r] = reflector.reflect([request()])
    assert r.ok and r.attempts == 1 and server.posts == 4
    assert reflector.summary()["calls"] == 1


def test_refused_request_is_counted_not_cached(tmp_path, scripted, chat_env):
    server = scripted(script=[400, 400])
    chat_env(server.url)
    reflector = chat_reflector(tmp_path, "--reflect_retries", "1")
    [r] = reflector.reflect([request()])
    assert not r.ok and r.attempts == 2 and "refused (400)" in r.error
    assert reflector.summary()["refused"] == 2 and len(reflector.cache) == 0
    [r] = chat_reflector(tmp_path).reflect([request()])  # asked again next time
    assert r.ok and not r.cached


def test_unreachable_endpoint_fails_fast_without_the_key(tmp_path, chat_env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chat_env(f"http://127.0.0.1:{port}/v1")
    reflector = chat_reflector(tmp_path, "--reflect_timeout", "2")
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        reflector.reflect([request()])
    assert time.monotonic() - t0 < 5
    assert f"127.0.0.1:{port}" in str(err.value) and "SECRET" not in str(err.value)


def test_rejected_key_is_a_clear_error_without_the_key(tmp_path, scripted, chat_env):
    server = scripted(script=[401])
    chat_env(server.url)
    reflector = chat_reflector(tmp_path)  # the probe (GET) passes on this server; the POST gets the 401
    with pytest.raises(BackendUnavailable, match="rejected the key") as err:
        reflector.reflect([request()])
    assert "SECRET" not in str(err.value)


def test_backend_choice(tmp_path, monkeypatch, chat_env):
    for name in ("REFLECT_API_KEY", "REFLECT_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SystemExit, match="self reflection needs --model"):
        reflector_from_args(parse([]), tmp_path / "c.jsonl")
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        reflector_from_args(parse(["--reflect_backend", "chat"]), tmp_path / "c.jsonl")
    chat_env("http://127.0.0.1:9/v1")  # nothing is contacted before the first reflect
    auto = reflector_from_args(parse(["--reflect_cache", str(tmp_path / "mine.jsonl")]), tmp_path / "c.jsonl")
    assert isinstance(auto.model, ChatModel) and auto.model.model == "gpt-4o"
    assert auto.summary()["cache"] == str(tmp_path / "mine.jsonl")


# --- real servers and models: serve_hf's chat route, the self backend ---------------------------------

def test_serve_hf_chat_route_renders_with_the_chat_format(hf_server, tiny_model_dir):
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=hf_server, api_key="EMPTY", max_retries=0, timeout=60)
    messages = reflection_messages(request())
    chat = client.chat.completions.create(model=str(tiny_model_dir), messages=messages, max_tokens=5, temperature=0)
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    plain = client.completions.create(model=str(tiny_model_dir), prompt=prompt, max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens > 0
    assert chat.usage.completion_tokens == plain.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=str(tiny_model_dir), messages=[], max_tokens=1)


def test_chat_backend_real_server_invalid_replies_retried_then_counted(tmp_path, hf_server, tiny_model_dir, chat_env):
    """One-token replies can never hold a thought: every attempt is invalid, deterministically."""
    chat_env(hf_server, key=None)
    argv = ["--reflect_model", str(tiny_model_dir), "--reflect_max_tokens", "1", "--reflect_retries", "2"]
    reflector = chat_reflector(tmp_path, *argv)
    out = reflector.reflect([request("a"), request("b", observation="obs b")])
    for r in out:
        assert (r.ok, r.text, r.attempts, r.cached, r.completion_tokens) == (False, None, 3, False, 3)
        assert r.error and r.prompt_tokens > 0
    s = reflector.summary()
    assert (s["requests"], s["invalid"], s["retries"], s["calls"], s["completion_tokens"]) == (2, 2, 4, 6, 6)
    assert s["cost_usd"] is None  # no price for a local model
    again = chat_reflector(tmp_path, *argv)  # the invalid attempts are cached too: a rerun asks nothing
    rerun = again.reflect([request("a"), request("b", observation="obs b")])
    assert [r.error for r in rerun] == [r.error for r in out] and all(r.cached for r in rerun)
    assert (again.summary()["calls"], again.summary()["cache_hits"]) == (0, 6)


def test_self_backend_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = ["--model", str(tiny_model_dir), "--reflect_max_tokens", "1", "--reflect_retries", "1",
            "--reflect_concurrency", "2"]
    reflector = reflector_from_args(parse(argv), tmp_path / "cache.jsonl")  # auto: no key -> the policy itself
    assert reflector.model.name == "self" and reflector.model.model == str(tiny_model_dir)
    prompt = reflector.model.prompt_text(reflection_messages(request()))
    assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("<|im_start|>assistant")  # its chat format
    reqs = [request(f"r{i}", observation=f"obs {i}") for i in range(3)]
    out = reflector.reflect(reqs)
    assert [(r.key, r.ok, r.attempts, r.backend, r.completion_tokens) for r in out] == \
        [(f"r{i}", False, 2, "self", 2) for i in range(3)]
    assert all(r.prompt_tokens > 0 for r in out)
    assert reflector.summary()["calls"] == 6 and reflector.summary()["cost_usd"] is None
    rerun = reflector_from_args(parse(argv), tmp_path / "cache.jsonl")
    assert all(r.cached for r in rerun.reflect(reqs)) and rerun.summary()["calls"] == 0


def test_weights_fingerprint_changes_with_the_weights(tmp_path):
    from eval_agent.guard import weights_fingerprint

    assert weights_fingerprint("gpt-4o") is None  # a served name, no folder
    (tmp_path / "model.safetensors").write_bytes(b"12")
    before = weights_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"1234")  # retrained into the same folder
    assert before and weights_fingerprint(str(tmp_path)) != before
