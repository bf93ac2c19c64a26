"""The simulated GPU replica of scripts/bench_scale.py: its cost model reproduces the figures it cites and carries
them over to another model family and context, its prefix cache hits what vLLM's would, it answers an episode's
prompt with that episode's next expert step; the projection's rollouts end at the step budget or the context."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from dataclasses import replace  # noqa: E402

from bench_scale import (FIT_CONTEXT, FIT_GPU, MODELS, BlockCache, CallProfile, CostModel, Replica,  # noqa: E402
                         rollout_calls)


def test_cost_model_reproduces_the_cited_a100_figures():
    cost = CostModel()
    assert cost.iteration_ms(1, 0) == pytest.approx(13.3, abs=0.05)  # ~75 tokens/s for one sequence
    assert 8 / cost.iteration_ms(8, 0) * 1000 / 75 == pytest.approx(6.6, abs=0.2)  # 6.6x that for 8 sequences
    # a saturated replica: more sequences, more calls/s; prefill of uncached tokens costs time
    assert cost.replica_calls_per_s(25, 50, batch=64) > cost.replica_calls_per_s(25, 50, batch=16)
    assert cost.replica_calls_per_s(25, 500) < cost.replica_calls_per_s(25, 50)


def test_prefix_cache_hits_whole_leading_blocks_and_forgets_the_oldest():
    cache = BlockCache(max_blocks=4, block_chars=4)
    cache.add("aaaabbbbcc")  # two full blocks; the partial one is not cached
    assert cache.hit_blocks("aaaabbbbdddd") == 2 and cache.hit_blocks("aaaaXbbb") == 1 and cache.hit_blocks("bbbb") == 0
    cache.add("eeeeffffgggg")  # 5 blocks > 4: the least recently used ("bbbb": "aaaa" was hit after it) goes
    assert cache.hit_blocks("aaaabbbb") == 1 and cache.hit_blocks("eeeeffffgggg") == 3


def test_replica_answers_the_next_expert_step():
    replica = Replica.__new__(Replica)  # only the reply lookup: no event loop needed
    replica.experts = [("Task: count to two.", ["Action: count 1", "Action: count 2"])]
    replica.turn_marker = "<A>"
    example = "Task: example.<A>Action: x"
    assert replica.reply_for(example + "Task: count to two.<A>") == "Action: count 1"
    assert replica.reply_for(example + "Task: count to two.<A>Action: count 1 Observation: 1<A>") == "Action: count 2"
    assert replica.reply_for(example + "Task: something else.<A>") is None


def test_cost_model_carries_over_to_another_family_and_context():
    fit = CostModel()
    assert CostModel.for_model(MODELS["llama-3-8b"], FIT_CONTEXT, gpu=FIT_GPU).iteration_ms(8, 0) == pytest.approx(
        fit.iteration_ms(8, 0))  # the fit's own model, context and GPU give the fit back
    llama2, llama3 = (CostModel.for_model(MODELS[m], 2700, shared=800) for m in ("llama-2-7b", "llama-3-8b"))
    assert MODELS["llama-2-7b"].kv_bytes_per_token == 4 * MODELS["llama-3-8b"].kv_bytes_per_token == 524288
    assert llama2.kv_ms_per_token == pytest.approx(4 * llama3.kv_ms_per_token)
    assert llama2.max_batch < llama3.max_batch  # its KV cache holds a quarter of the tokens
    assert llama2.replica_calls_per_s(41.5, 60) < llama3.replica_calls_per_s(41.5, 60)
    short, long = (CostModel.for_model(MODELS["llama-2-7b"], c) for c in (1000, 3500))
    assert long.iteration_ms(32, 0) > short.iteration_ms(32, 0)  # every sequence reads its whole context


def test_failed_rollouts_end_at_the_step_budget_or_the_context():
    paper = CallProfile(reply=41.5, step=81.2, prefix=905, shared=772, uncached=60, env_cpu_s=0.2)
    calls = rollout_calls(10.1, paper)
    assert calls["last_step"] == 40 and calls["succeed"] == pytest.approx(4.55) and calls["fail"] == pytest.approx(34.45)
    assert 905 < calls["context_succeed"] < calls["context_fail"] < 4096
    longer = rollout_calls(10.1, replace(paper, step=120))  # 27 steps fill 4,096 tokens: the prompt is cut there
    assert longer["last_step"] == 27 and longer["fail"] == pytest.approx(27 - 1 - 4.55)
