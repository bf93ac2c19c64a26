"""LLM backends: HFBackend's batching semantics, serve_hf, and OpenAIBackend against real and fake servers."""
from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.llm.hf import HFBackend, PrefixCache
from eval_agent.llm.openai_http import OpenAIBackend, RetryPolicy, resolve_base_urls

GREEDY = GenerationConfig(max_new_tokens=12)


def texts(results):
    return [[c.text for c in cs] for cs in results]


def summary(results):
    return [[(c.text, c.finish_reason, c.num_tokens) for c in cs] for cs in results]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), batch_size=3)


@pytest.fixture(scope="module")
def tiny_prompts(tiny):
    words = "the agent opens the drawer and finds a key under the old map".split()
    prompts = ["Hi", "Task: put a clean mug in the coffee machine.\nThought:"]
    prompts += [" ".join(words[:k]) for k in (3, 7, 12)]
    prompts.append("\n".join(prompts))
    assert len({len(tiny.tokenizer(p)["input_ids"]) for p in prompts}) == len(prompts)  # all lengths differ
    return prompts


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    backend = HFBackend(str(smollm2_dir))
    questions = ["What is 2+2?", "Name a color.", "Write one sentence about the sea at night."]
    prompts = [backend.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                     add_generation_prompt=True) for q in questions]
    return backend, prompts


@pytest.fixture
def client(hf_server, tiny_model_dir):
    backend = OpenAIBackend(str(tiny_model_dir), base_urls=[hf_server])
    yield backend
    backend.close()


# --- HFBackend ------------------------------------------------------------------------------------

def test_batched_greedy_equals_one_at_a_time_tiny(tiny, tiny_prompts):
    batched = tiny.generate(tiny_prompts, GREEDY)  # batch_size 3: two sub-batches of mixed lengths
    alone = [tiny.generate([p], GREEDY)[0] for p in tiny_prompts]
    assert summary(batched) == summary(alone)
    assert all(len(cs) == 1 and cs[0].num_tokens > 0 for cs in batched)


def test_batched_greedy_equals_one_at_a_time_smollm2(smollm2):
    backend, prompts = smollm2
    config = GenerationConfig(max_new_tokens=8)
    batched = backend.generate(prompts, config)
    assert summary(batched) == summary([backend.generate([p], config)[0] for p in prompts])
    assert "answer" in batched[0][0].text  # the real model answers: the weights are real


def test_stop_strings_cut_the_text(smollm2):
    backend, prompts = smollm2
    free = backend.generate(prompts[2:], GenerationConfig(max_new_tokens=12, stop=()))[0][0].text
    words = free.split(" ")
    assert len(words) >= 4
    stop = " " + words[2]  # occurs after the first two words
    config = GenerationConfig(max_new_tokens=12, stop=("\nnever", stop))
    batched = backend.generate(prompts, config)  # the stopped row is padded while the others go on
    assert summary(batched) == summary([backend.generate([p], config)[0] for p in prompts])
    cut = batched[2][0]
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"
    assert 0 < cut.num_tokens < 12


def test_n_samples_per_prompt(tiny, tiny_prompts):
    sampled = tiny.generate(tiny_prompts[:2], GenerationConfig(max_new_tokens=8, n=3, temperature=1.0, seed=0))
    assert [len(cs) for cs in sampled] == [3, 3]
    assert len({c.text for c in sampled[0]}) > 1  # random tiny model, temperature 1: the samples differ
    again = tiny.generate(tiny_prompts[:2], GenerationConfig(max_new_tokens=8, n=3, temperature=1.0, seed=0))
    assert texts(again) == texts(sampled)  # seeded
    greedy = tiny.generate(tiny_prompts[:1], GenerationConfig(max_new_tokens=8, n=2))
    assert greedy[0][0].text == greedy[0][1].text


def test_prefix_cache_reuses_an_episode_s_states(tiny_model_dir, tiny_prompts):
    """The next prompt of an episode (prompt + reply + more) runs only its new tokens, and gives the
    text a backend without the cache gives."""
    cached, whole = HFBackend(str(tiny_model_dir)), HFBackend(str(tiny_model_dir), prefix_cache_gb=0)
    config = GenerationConfig(max_new_tokens=10, stop=())
    prompt = tiny_prompts[-1]
    for _ in range(3):  # three steps of one conversation
        got = cached.generate([prompt], config)
        assert summary(got) == summary(whole.generate([prompt], config))
        prompt = prompt + got[0][0].text + "\nObservation: nothing happens.\n"
    asked = whole.prompt_tokens
    assert whole.prompt_tokens_run == asked and cached.prompt_tokens == asked
    new_tokens = asked - 3 * _lengths(cached, tiny_prompts[-1:])[0]
    assert cached.prompt_tokens_run < _lengths(cached, tiny_prompts[-1:])[0] + new_tokens  # the steps' common part ran once


def test_identical_prompts_run_once(tiny_model_dir, tiny_prompts):
    """The N rollouts of one record (equal prompts, several episodes) and n samples of a prompt: one run."""
    backend = HFBackend(str(tiny_model_dir), prefix_cache_gb=0)
    prompt = tiny_prompts[-1]
    got = backend.generate([prompt] * 3, GenerationConfig(max_new_tokens=6, n=2, temperature=1.0, seed=0))
    assert [len(cs) for cs in got] == [2, 2, 2]
    assert backend.prompt_tokens_run == _lengths(backend, [prompt])[0] and backend.prompt_tokens == 6 * backend.prompt_tokens_run
    assert len({c.text for cs in got for c in cs}) > 1  # one run, yet six independent samples


def test_shared_prefix_runs_once(tiny_model_dir):
    """Prompts that begin alike (instruction, example): the common part runs once, then each its own rest."""
    backend = HFBackend(str(tiny_model_dir))
    head = " ".join(f"word{i}" for i in range(40))
    prompts = [f"{head} task one", f"{head} the second task", f"{head} a third"]
    got = backend.generate(prompts, GREEDY)
    lengths, shared = _lengths(backend, prompts), _lengths(backend, [head])[0]
    assert backend.prompt_tokens_run < sum(lengths) - shared  # the shared part ran once at most
    whole = HFBackend(str(tiny_model_dir), prefix_cache_gb=0)
    assert summary(got) == summary(whole.generate(prompts, GREEDY))


def test_a_prompt_that_begins_another_of_its_call_reuses_its_states(tiny_model_dir):
    """Step accuracy asks for several steps of one expert trajectory in one call: each earlier step's prompt
    begins the later ones', so after the longest only the last token of each runs."""
    backend = HFBackend(str(tiny_model_dir))
    steps = [f"step{i} went fine." for i in range(30)]
    prompts = [" ".join(steps[:n]) for n in (30, 20, 10)]
    got = backend.generate(prompts, GREEDY)
    assert backend.prompt_tokens_run == _lengths(backend, prompts[:1])[0] + 2
    whole = HFBackend(str(tiny_model_dir), prefix_cache_gb=0)
    assert summary(got) == summary(whole.generate(prompts, GREEDY))


def test_prefix_cache_keeps_longest_and_evicts_oldest():
    import torch

    def seq(*ids):
        return torch.tensor(ids)

    def states(n):
        return torch.full((1, 2, 1, n, 1), float(n))

    cache = PrefixCache(max_tokens=8)
    cache.add(seq(1, 2, 3), states(3))
    cache.add(seq(1, 2, 3, 4), states(4))  # extends the first: replaces it
    assert len(cache.entries) == 1 and cache.tokens == 4
    cache.add(seq(1, 2), states(2))  # covered by a stored one: nothing new
    assert len(cache.entries) == 1
    found, n = cache.longest(seq(1, 2, 3, 9))
    assert n == 3 and found.shape[3] == 4
    cache.add(seq(5, 6, 7), states(3))
    cache.longest(seq(1))  # touch: (1, 2, 3, 4) is now the most recently used
    cache.add(seq(8, 9), states(2))  # 9 tokens > 8: the least recently used, (5, 6, 7), goes
    assert cache.tokens == 6 and cache.longest(seq(5, 6))[1] == 0 and cache.longest(seq(1, 2))[1] == 2
    assert cache.longest(seq(4))[0] is None


def test_sampling_follows_temperature_and_top_p():
    import torch

    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9, 0.5]]).repeat(20000, 1)
    torch.manual_seed(0)
    drawn = torch.bincount(HFBackend._pick(logits, GenerationConfig(temperature=1.0)), minlength=5) / 20000
    assert torch.allclose(drawn, torch.softmax(logits[0], -1), atol=0.01) and drawn[3] == 0
    hot = torch.bincount(HFBackend._pick(logits, GenerationConfig(temperature=2.0)), minlength=5) / 20000
    assert torch.allclose(hot, torch.softmax(logits[0] / 2, -1), atol=0.01)
    # top_p 0.7: the two likeliest (0.58 + 0.21 reach it), renormalised
    nucleus = torch.bincount(HFBackend._pick(logits, GenerationConfig(temperature=1.0, top_p=0.7)), minlength=5) / 20000
    top2 = torch.softmax(logits[0], -1)[[1, 2]]
    assert nucleus[[0, 3, 4]].sum() == 0 and torch.allclose(nucleus[[1, 2]], top2 / top2.sum(), atol=0.01)
    assert HFBackend._pick(logits[:2], GenerationConfig()).tolist() == [2, 2]  # greedy


def _lengths(backend, prompts):
    return [len(backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


@pytest.fixture(scope="module")
def context_prompts(tiny):
    """For a 64-token context: fits with room, fits only with a smaller budget, does not fit."""
    prompts = ["Task: open the drawer.", " ".join(["apple"] * 56), " ".join(["apple"] * 80)]
    short, tight, long = _lengths(tiny, prompts)
    assert short + 16 <= 64 < tight + 16 and tight < 64 <= long
    return prompts


def test_context_overflow_is_per_prompt(tiny_model_dir, tiny, context_prompts):
    small = HFBackend(str(tiny_model_dir), max_context=64)
    config = GenerationConfig(max_new_tokens=16, stop=())
    short, tight, long = small.generate(context_prompts, config)
    assert long[0].finish_reason == "context_overflow" and long[0].text == ""
    assert short[0].text == tiny.generate(context_prompts[:1], config)[0][0].text  # a neighbour costs nothing
    assert short[0].num_tokens == 16
    tight_len = _lengths(tiny, context_prompts[1:2])[0]
    assert tight[0].finish_reason == "length" and tight[0].num_tokens == 64 - tight_len  # budget cut to the context
    assert summary([short, tight]) == summary(small.generate(context_prompts[:2], config))


# --- serve_hf + OpenAIBackend ----------------------------------------------------------------------

def test_http_backend_matches_in_process(client, tiny, tiny_prompts):
    assert summary(client.generate(tiny_prompts, GREEDY)) == summary(tiny.generate(tiny_prompts, GREEDY))
    sampled = client.generate(tiny_prompts[:2], GenerationConfig(max_new_tokens=8, n=3, temperature=1.0, seed=1))
    assert [len(cs) for cs in sampled] == [3, 3]


def test_http_stop_strings_match_in_process(client, tiny, tiny_prompts):
    free = tiny.generate(tiny_prompts[-1:], GenerationConfig(max_new_tokens=16, stop=()))[0][0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    config = GenerationConfig(max_new_tokens=16, stop=(stop,))
    here, there = tiny.generate(tiny_prompts[-1:], config), client.generate(tiny_prompts[-1:], config)
    assert texts(here) == texts(there) == [[free[: free.index(stop)]]]
    assert there[0][0].finish_reason == "stop"


def test_two_endpoints_real_server(hf_server, tiny_model_dir, tiny, tiny_prompts):
    backend = OpenAIBackend(str(tiny_model_dir), base_urls=[hf_server, hf_server])
    try:
        assert summary(backend.generate(tiny_prompts, GREEDY)) == summary(tiny.generate(tiny_prompts, GREEDY))
    finally:
        backend.close()


def test_context_overflow_over_http(serve_hf, tiny_model_dir, context_prompts):
    url = serve_hf(tiny_model_dir, "--max_context", "64")
    config = GenerationConfig(max_new_tokens=16, stop=())
    backend = OpenAIBackend(str(tiny_model_dir), base_urls=[url])
    try:
        got = backend.generate(context_prompts, config)
    finally:
        backend.close()
    want = HFBackend(str(tiny_model_dir), max_context=64).generate(context_prompts, config)
    assert [(cs[0].text, cs[0].finish_reason) for cs in got] == [(cs[0].text, cs[0].finish_reason) for cs in want]
    assert [cs[0].finish_reason for cs in got] == ["length", "length", "context_overflow"]
    # the server refuses as vLLM does, in vLLM's words
    body = {"model": str(tiny_model_dir), "prompt": context_prompts[2], "max_tokens": 16}
    request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "This model's maximum context length is 64 tokens. However, you requested" in refused.value.read().decode()


def test_wrong_model_name_is_a_clear_error(hf_server):
    backend = OpenAIBackend("no-such-model", base_urls=[hf_server])
    try:
        with pytest.raises(BackendUnavailable, match="no-such-model"):
            backend.generate(["hi"], GREEDY)
    finally:
        backend.close()


def test_unreachable_server_fails_fast_naming_it():
    backend = OpenAIBackend("m", base_urls=["http://127.0.0.1:9/v1"], timeout=2)
    t0 = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:9.*serve_hf"):
            backend.generate(["hi"], GREEDY)
    finally:
        backend.close()
    assert time.monotonic() - t0 < 5


def test_base_urls_resolution(tmp_path, monkeypatch):
    f = tmp_path / "endpoints.txt"
    f.write_text("# replicas\nhttp://a:8000/v1  # gpu 0\n\nhttp://b:8000/v1/\n")
    assert resolve_base_urls(f) == ["http://a:8000/v1", "http://b:8000/v1"]
    monkeypatch.setenv("OPENAI_BASE_URL", "http://c/v1,http://d/v1")
    assert resolve_base_urls() == ["http://c/v1", "http://d/v1"]
    assert resolve_base_urls(base_urls=["http://e/v1"]) == ["http://e/v1"]
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(BackendUnavailable, match="OPENAI_BASE_URL"):
        resolve_base_urls()


# --- fake servers: routing, order, retries ---------------------------------------------------------

class FakeServer:
    """A stdlib completions server that echoes `<name>|<prompt>|<k>`; the first `fail` POSTs get `status`."""

    def __init__(self, name: str, fail: int = 0, status: int = 500):
        self.name, self.fail, self.status, self.posts = name, fail, status, 0
        lock, fake = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.posts += 1
                    failing = fake.posts <= fake.fail
                if failing:
                    return self._send(fake.status, {"error": {"message": "boom", "type": "InternalServerError"}})
                time.sleep(random.uniform(0, 0.05))  # answers come back out of order
                n = req.get("n", 1)
                choices = [{"index": k, "text": f"{fake.name}|{req['prompt']}|{k}", "finish_reason": "length"}
                           for k in reversed(range(n))]
                self._send(200, {"id": "x", "object": "text_completion", "created": 0, "model": "fake",
                                 "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 4 * n,
                                                               "total_tokens": 1 + 4 * n}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_two_endpoints_both_used_results_in_prompt_order():
    a, b = FakeServer("a"), FakeServer("b")
    backend = OpenAIBackend("fake", base_urls=[a.url, b.url], max_requests=4)
    try:
        prompts = [f"p{i}" for i in range(12)]
        out = backend.generate(prompts, GenerationConfig(max_new_tokens=4, n=2, temperature=1.0))
        assert [[c.text.split("|", 1)[1] for c in cs] for cs in out] == [[f"{p}|0", f"{p}|1"] for p in prompts]
        assert all(len({c.text.split("|")[0] for c in cs}) == 1 for cs in out)  # n samples: one request, one server
        assert a.posts > 0 and b.posts > 0 and a.posts + b.posts == 12
        assert {cs[0].meta["endpoint"] for cs in out} == {a.url, b.url}
        assert all(c.num_tokens == 4 for cs in out for c in cs)
        assert backend.generate(["again"], GREEDY)[0][0].text.endswith("|again|0")  # the loop survives calls
        # vLLM refuses n > 1 when greedy: one sample is asked for and copied
        copies = [c.text for c in backend.generate(["g"], GenerationConfig(max_new_tokens=4, n=3))[0]]
        assert len(copies) == 3 and len(set(copies)) == 1 and copies[0].endswith("|g|0")
    finally:
        backend.close()
        a.close()
        b.close()


def test_server_error_is_retried():
    flaky = FakeServer("f", fail=1)
    backend = OpenAIBackend("fake", base_urls=[flaky.url], retry=RetryPolicy(retries=2, backoff_s=0.01))
    try:
        assert texts(backend.generate(["x"], GREEDY)) == [["f|x|0"]]
        assert flaky.posts == 2
    finally:
        backend.close()
        flaky.close()


def test_server_error_that_persists_is_unavailable():
    broken = FakeServer("f", fail=10**6)
    backend = OpenAIBackend("fake", base_urls=[broken.url], retry=RetryPolicy(retries=2, backoff_s=0.01))
    try:
        with pytest.raises(BackendUnavailable, match="failed 3 times"):
            backend.generate(["x"], GREEDY)
        assert broken.posts == 3
    finally:
        backend.close()
        broken.close()
