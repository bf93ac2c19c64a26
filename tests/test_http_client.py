"""The HTTP client (eval_agent/llm/openai_http.py) against a scripted server process on loopback: malformed 200
answers are named, retried errors; 429 / 5xx are retried with Retry-After honoured; other 4xx are not; sticky
routing and failover over several endpoints; the same policy for completions and chat."""
from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.llm.openai_http import (
    DEAD_AFTER_S, FIRST_ANSWER_S, HTTPClient, OpenAIBackend, Refused, RetryPolicy, chat_choice, completion_choices,
    parse_retry_after, request_timeout,
)

FAST = RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.05)
GREEDY = GenerationConfig(max_new_tokens=4)
VALID = {"status": 200, "body": json.dumps({"choices": [{"index": 0, "text": "fine", "finish_reason": "stop"}]})}
# What a broken server, proxy or load balancer answers with status 200, and how the client names it.
GARBAGE = [
    ({"body": "{}"}, "answered without choices: '{}'"),
    ({"body": "<html><body>502 Bad Gateway</body></html>", "headers": {"Content-Type": "text/html"}},
     "answered '<html><body>502 Bad Gateway</body></html>', not JSON"),
    ({"body": json.dumps({"choices": []})}, "answered without choices"),
    ({"body": json.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]})}, "answered a choice without text"),
    ({"body": "null"}, "answered 'null', not a JSON object"),
]


@pytest.fixture(scope="module")
def server(scripted_server):
    return scripted_server()


@pytest.fixture
def fresh(server):
    server.control(script=[], poison=None, text="Thought: I count.\nAction: count 1", posts=0, hang=0)
    return server


def backend(*urls: str, retry: RetryPolicy = FAST, **kw) -> OpenAIBackend:
    return OpenAIBackend("fake", base_urls=list(urls), retry=retry, **kw)


@pytest.mark.parametrize("garbage, named", GARBAGE, ids=["empty", "html", "no_choices", "no_text", "null"])
def test_garbage_completion_is_retried_then_a_named_failure(fresh, garbage, named):
    fresh.control(script=[garbage, garbage])
    b = backend(fresh.url)
    try:
        assert b.generate(["p"], GREEDY)[0][0].text == "Thought: I count.\nAction: count 1"  # third time lucky
        assert fresh.posts() == 3 and b.client.stats.bad_replies == 2
        fresh.control(script=[garbage] * 3)
        with pytest.raises(BackendUnavailable) as err:
            b.generate(["p"], GREEDY)
    finally:
        b.close()
    message = str(err.value)
    assert message.startswith(f"request failed 3 times; last: endpoint {fresh.url} {named}")
    assert "Traceback" not in message and "serve_hf" not in message  # a server bug, not a missing server


def test_wrong_number_of_choices_is_a_bad_reply():
    body = json.dumps({"choices": [{"index": 0, "text": "a"}]}).encode()
    with pytest.raises(Exception, match="answered 1 choices for 2 asked"):
        completion_choices("http://x/v1", body, 2)
    choices, tokens = completion_choices("http://x/v1", json.dumps(
        {"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a", "finish_reason": "length"}],
         "usage": {"completion_tokens": 7}}).encode(), 2)
    assert choices == [("a", "length"), ("b", "stop")] and tokens == 7


@pytest.mark.parametrize("garbage, named", [
    ({"body": "{}"}, "answered without choices"),
    ({"body": json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]})},
     "answered a choice without message.content"),
    ({"body": json.dumps({"choices": [{"index": 0, "text": "a completion, not a chat reply"}]})},
     "answered a choice without message.content"),
], ids=["empty", "null_content", "completion_shape"])
def test_garbage_chat_reply_is_retried_then_a_named_failure(fresh, garbage, named):
    client = HTTPClient([fresh.url], retry=FAST, what="chat endpoint")
    payload = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    try:
        fresh.control(script=[garbage])
        text, reason, _ = client.run(client.post("/chat/completions", payload, chat_choice))[0]
        assert (text, reason) == ("Thought: I count.\nAction: count 1", "stop") and fresh.posts() == 2
        fresh.control(script=[garbage] * 3)
        with pytest.raises(BackendUnavailable, match=f"request failed 3 times; last: chat endpoint {fresh.url} {named}"):
            client.run(client.post("/chat/completions", payload, chat_choice))
    finally:
        client.close()


def test_server_errors_and_rate_limits_are_retried_client_errors_are_not(fresh):
    b = backend(fresh.url, retry=RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05))
    try:
        fresh.control(script=[{"status": 503, "body": "{}"}, {"status": 500, "body": "oops"},
                              {"status": 429, "body": json.dumps({"error": {"message": "slow down"}})}])
        assert b.generate(["p"], GREEDY)[0][0].text.endswith("count 1") and fresh.posts() == 4
        fresh.control(script=[{"status": 400, "body": json.dumps({"message": "bad parameter"})}])
        with pytest.raises(Refused, match=r"refused the request \(HTTP 400\): bad parameter"):
            b.generate(["p"], GREEDY)
        assert fresh.posts() == 5  # asked once
    finally:
        b.close()


def test_retry_after_is_honoured(fresh):
    b = backend(fresh.url, retry=RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=5.0))
    try:
        fresh.control(script=[{"status": 429, "body": "{}", "headers": {"Retry-After": "2"}}])
        t0 = time.monotonic()
        b.generate(["p"], GREEDY)
        waited = time.monotonic() - t0
        fresh.control(script=[{"status": 429, "body": "{}"}])  # no header: the policy's own short backoff
        t0 = time.monotonic()
        b.generate(["p"], GREEDY)
        quick = time.monotonic() - t0
    finally:
        b.close()
    assert waited >= 2.0 and quick < 1.0  # a margin of a second for a loaded machine


def test_chat_requests_honour_retry_after_too(fresh):
    client = HTTPClient([fresh.url], retry=RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=5.0),
                        what="chat endpoint")
    payload = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    try:
        fresh.control(script=[{"status": 429, "body": "{}", "headers": {"Retry-After": "1"}},
                              {"status": 503, "body": "{}"}])
        t0 = time.monotonic()
        text, _, _ = client.run(client.post("/chat/completions", payload, chat_choice))[0]
        assert time.monotonic() - t0 >= 1.0 and text.endswith("count 1") and fresh.posts() == 3
    finally:
        client.close()


def test_retry_after_formats_and_backoff_cap():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after(None) is None
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(later, now=1_000_000) == pytest.approx(30)
    assert parse_retry_after("soon") is None
    policy = RetryPolicy(retries=9, backoff_s=1.0, max_backoff_s=8.0)
    delays = [policy.delay(k) for k in range(1, 8)]
    assert all(0.5 <= d / min(8.0, 2 ** (k - 1)) <= 1.0 for k, d in enumerate(delays, 1))  # doubles, jittered, capped
    assert policy.delay(1, retry_after=5.0) >= 5.0 and policy.delay(1, retry_after=100.0) == 8.0


def test_sticky_routing_keeps_a_key_on_one_endpoint_and_fails_over(scripted_server):
    a, b = scripted_server(), scripted_server()
    for s in (a, b):
        s.control(script=[], poison=None)
    client = HTTPClient([a.url, b.url], retry=FAST)
    payload = {"model": "fake", "prompt": "p", "n": 1}

    async def where(keys):
        return [(await client.post("/completions", payload, lambda u, body: None, route_key=k))[1] for k in keys]

    keys = [f"record{i}" for i in range(40)]
    try:
        first = client.run(where(keys))
        assert client.run(where(keys)) == first  # every request of a key: the same endpoint
        assert set(first) == {a.url, b.url}  # the keys spread over both
        a.proc.terminate()  # a replica dies: its keys move, the others stay
        a.proc.wait()
        moved = client.run(where(keys))
        assert all(url == b.url for url in moved)
        assert client.stats.failovers >= 1 and client.stats.failed == 0
    finally:
        client.close()


def test_a_sticky_key_spills_to_the_idle_replica_only_past_the_load_bound():
    """LOAD_SLACK: a key stays on its replica while that holds fewer requests than 1.1 x the mean (counting the
    new one), then moves to the least loaded one and stays there."""
    client = HTTPClient(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"])
    home = client._order("k")[0]
    other = 1 - home
    try:
        assert client.endpoints.index(client._pick("k")[0]) == home
        client.endpoints[home].inflight, client.endpoints[other].inflight = 1, 1  # bound ceil(1.1 * 3 / 2) = 2
        assert client.endpoints.index(client._pick("k")[0]) == home
        client.endpoints[home].inflight, client.endpoints[other].inflight = 2, 0  # bound ceil(1.1 * 3 / 2) = 2
        assert client.endpoints.index(client._pick("k")[0]) == other
        client.endpoints[home].inflight = 0
        assert client.endpoints.index(client._pick("k")[0]) == other  # the key keeps its new replica
    finally:
        client.close()


def test_no_endpoint_left_is_a_clear_error_naming_them(fresh):
    client = HTTPClient(["http://127.0.0.1:9/v1"], retry=FAST)
    try:
        with pytest.raises(BackendUnavailable, match=r"request failed 3 times; last: endpoint http://127\.0\.0\.1:9/v1: "
                                                     r"ConnectError.*serve_hf"):
            client.run(client.post("/completions", {}, lambda u, body: None))
    finally:
        client.close()


def test_one_client_serves_several_event_loops(fresh):
    """The asynchronous runner awaits on its own loop, generate() on the client's thread: both work."""
    b = backend(fresh.url)
    try:
        assert b.generate(["p"], GREEDY)[0][0].text.endswith("count 1")

        async def on_this_loop():
            try:
                return (await b.complete("p", GREEDY, route_key="k"))[0].text
            finally:
                await b.aclose()

        assert asyncio.run(on_this_loop()).endswith("count 1")
        assert b.generate(["p"], GREEDY)[0][0].text.endswith("count 1")
    finally:
        b.close()


def test_a_request_waits_as_long_as_its_length_asks():
    assert request_timeout(512) == FIRST_ANSWER_S + 256 == 376  # the default max_new_tokens: 6.3 minutes
    assert request_timeout(40) == 140  # the tiny preset's
    assert request_timeout(40, fixed=3) == 3  # STECA_HTTP_TIMEOUT
    assert request_timeout(512) < 600 and DEAD_AFTER_S <= 300  # a hung endpoint stops a run in minutes


def test_a_busy_endpoint_keeps_a_queued_request_a_silent_one_does_not():
    """A request waits while its endpoint answers other requests; silence for its timeout stalls it."""
    client = HTTPClient(["http://x/v1"], retry=FAST)
    ep = client.endpoints[0]

    async def slow() -> str:
        await asyncio.sleep(1.5)
        return "answer"

    async def busy() -> str:
        async def answering_others() -> None:
            while True:
                ep.last_answer = time.monotonic()
                await asyncio.sleep(0.02)

        others = asyncio.ensure_future(answering_others())
        try:
            return await client._answer(slow(), ep, timeout=0.5)
        finally:
            others.cancel()

    assert asyncio.run(busy()) == "answer"
    with pytest.raises(Exception, match=r"no answer for 0\.\d s \(timeout 0.5 s\)") as stalled:
        asyncio.run(client._answer(slow(), ep, timeout=0.5))
    assert type(stalled.value).__name__ == "_Stalled"


def test_a_hung_endpoint_is_declared_dead_and_left_then_every_request_fails_at_once(scripted_server, caplog):
    hung, fine = scripted_server(), scripted_server()
    hung.control(hang=30)
    fine.control(hang=0)
    client = HTTPClient([hung.url, fine.url], timeout=0.3, dead_after=1.0,
                        retry=RetryPolicy(retries=6, backoff_s=0.01, max_backoff_s=0.05))
    payload = {"model": "fake", "prompt": "p", "n": 1}

    async def send(keys):
        return [(await client.post("/completions", payload, lambda u, body: None, route_key=k))[1] for k in keys]

    try:
        for i in range(100):  # the keys the hung one is first for fail over to the other, until it is dead
            assert client.run(send([f"first{i}"])) == [fine.url]
            if client.endpoints[0].dead:
                break
        assert f"endpoint {hung.url} answered nothing for 1 s: declared dead" in caplog.text
        posts = hung.posts()
        assert client.run(send([f"k{i}" for i in range(20)])) == [fine.url] * 20 and hung.posts() == posts  # left
        fine.control(hang=30)
        before = fine.posts()
        dead = rf"every endpoint is dead \({hung.url}, {fine.url} answered nothing for 1 s, STECA_HTTP_DEAD_AFTER\); "
        with pytest.raises(BackendUnavailable, match=dead + r"last: endpoint .*(no )?answer(ed nothing)? for"):
            client.run(send(["k"]))
        assert fine.posts() - before < 7  # fewer attempts than the retry policy's 7
        with pytest.raises(BackendUnavailable, match="every endpoint is dead"):  # the next one at once
            client.run(send(["k2"]))
    finally:
        client.close()
