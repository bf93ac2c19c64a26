"""The simulated GPU replica of scripts/bench_scale.py: its cost model reproduces the figures it cites, its prefix
cache hits what vLLM's would, and it answers an episode's prompt with that episode's next expert step."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_scale import BlockCache, CostModel, Replica  # noqa: E402


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
