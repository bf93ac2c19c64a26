"""Episode-runner semantics on a tiny deterministic environment (a test double of the Env
protocol; the real engines are exercised in their own test files)."""
from eval_agent.llm import Completion
from eval_agent.runner import INVALID_OBSERVATION, ExpertPolicy, run_episodes
from helpers import CounterEnv, ScriptedPolicy, counter_task as task


def run(tasks, policy, **kw):
    done = {}
    stats = run_episodes(tasks, policy, CounterEnv, lambda ep: done.__setitem__(ep.task.key, ep.traj), progress=False, **kw)
    return done, stats


def test_expert_policy_solves_and_batches():
    done, stats = run([task(f"t{i}", goal=i + 1) for i in range(5)], ExpertPolicy(), concurrency=5)
    assert all(t.success and t.termination == "success" for t in done.values())
    assert [len(done[f"t{i}"].steps) for i in range(5)] == [1, 2, 3, 4, 5]
    assert stats.generate_calls == 5  # one call per round, not per episode
    assert stats.episodes == 5 and stats.env_steps == 15


def test_invalid_reply_costs_a_step_and_max_steps_ends():
    policy = ScriptedPolicy({"a": ["Thought: hmm", "Thought: x\nAction: count 1", "Action: count 9"]})
    done, _ = run([task("a", goal=5)], policy, max_steps=3)
    traj = done["a"]
    assert traj.steps[0].action is None and traj.steps[0].observation == INVALID_OBSERVATION
    assert traj.steps[1].observation == "You said 1."
    assert traj.steps[2].observation == "Nothing happens."
    assert traj.termination == "max_steps" and not traj.success


def test_done_wins_over_step_limit():
    done, _ = run([task("a", goal=2)], ScriptedPolicy({"a": ["Action: count 1", "Action: count 2"]}), max_steps=2)
    assert done["a"].termination == "success" and done["a"].success


def test_env_error_and_overflow_end_only_their_episode():
    policy = ScriptedPolicy(
        {
            "boom": ["Action: explode"],
            "long": [Completion(text="", finish_reason="context_overflow")],
            "ok": ["Action: count 1", "Action: count 2"],
        }
    )
    done, _ = run([task("boom"), task("long"), task("ok")], policy, concurrency=3)
    assert done["boom"].termination == "env_error" and "engine crashed" in done["boom"].meta["error"]
    assert done["long"].termination == "context_overflow"
    assert done["ok"].success


def test_prefix_replay_counts_against_budget():
    policy = ScriptedPolicy({"a": ["Action: count 3"]})
    done, _ = run([(task("a", goal=3), ["Action: count 1", "Action: count 2"])], policy, max_steps=40)
    assert done["a"].success and len(done["a"].steps) == 3
    done, _ = run([(task("b", goal=9), ["Action: count 1", "Action: count 2"])], ScriptedPolicy({"b": ["x"]}), max_steps=3)
    assert done["b"].termination == "max_steps" and len(done["b"].steps) == 3


def test_steps_after_prefix_ends_prefixes_of_any_length_alike():
    counts = [f"Action: count {i}" for i in range(1, 9)]
    policy = ScriptedPolicy({f"t{n}": counts[n:] for n in (0, 2, 5)})
    done, stats = run([(task(f"t{n}", goal=9), counts[:n]) for n in (0, 2, 5)], policy, max_steps=6,
                      steps_after_prefix=1, concurrency=3)
    assert {k: len(t.steps) for k, t in done.items()} == {"t0": 1, "t2": 3, "t5": 6}
    assert all(t.termination == "max_steps" for t in done.values()) and stats.generate_calls == 1
    done, _ = run([(task("won", goal=3), counts[:2])], ScriptedPolicy({"won": counts[2:]}), steps_after_prefix=1)
    assert done["won"].termination == "success"  # done wins over the step limit


def test_concurrency_bounds_live_episodes():
    policy = ScriptedPolicy({f"t{i}": ["Action: count 1", "Action: count 2"] for i in range(5)})
    done, _ = run([task(f"t{i}") for i in range(5)], policy, concurrency=2)
    assert len(done) == 5 and max(policy.calls) == 2


def test_batched_greedy_replies_equal_one_at_a_time(tiny_model_dir):
    """The real hf backend through the runner: 4 episodes advanced together (prefix cache on, so later
    rounds reuse earlier ones' states) reply exactly as one episode at a time running whole prompts."""
    from eval_agent.llm import GenerationConfig
    from eval_agent.runner import ModelPolicy

    def replies(concurrency, **options):
        policy = ModelPolicy.build("alfworld", str(tiny_model_dir), GenerationConfig(max_new_tokens=8), **options)
        done, stats = run([task(f"t{i}", goal=i + 3) for i in range(4)], policy, concurrency=concurrency, max_steps=3)
        return {k: [s.text for s in t.steps] for k, t in done.items()}, stats, policy.backend

    alone, _, _ = replies(1, batch_size=1, prefix_cache_gb=0)
    together, stats, backend = replies(4)
    assert together == alone and stats.generate_calls == 3
    assert backend.prompt_tokens_run < backend.prompt_tokens / 2  # the instruction and example ran once
