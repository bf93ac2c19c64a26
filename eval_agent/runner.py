"""The episode runner: many episodes advance together. Each round gathers the prompts of all live
episodes into one batched generate call, then steps each environment. A finished episode's slot is
refilled from the queue at once. This suits the in-process backend (and the expert); a policy served
over HTTP runs on the asynchronous runner (eval_agent.async_runner), with these step semantics.

Step semantics follow the original (`envs/alfworld_env.py::step`): a reply without `Action:` is
an invalid step that costs one of the `max_steps` (40) and gets the error observation; the budget
counts replayed prefix steps too; `done` wins over the step limit. An environment error or a
context overflow ends that one episode with its reason; the others carry on.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

from tqdm import tqdm

from eval_agent.chat_format import FORMATS, ChatFormat, resolve_chat_format
from eval_agent.cli import count
from eval_agent.envs.base import Env, Task
from eval_agent.llm import Completion, GenerationConfig, LLMBackend, make_backend
from eval_agent.llm.openai_http import MAX_REQUESTS
from eval_agent.parsing import ACTION_PARSES, FIRST_LINE
from eval_agent.prompts import PromptBuilder
from eval_agent.trajectory import Step, Trajectory, format_reply

# The original's observation for a reply it could not parse (kept verbatim: models were trained on it).
INVALID_OBSERVATION = "Error Input. Your input must contains 'Action: '"
MAX_STEPS = 40
CONCURRENCY = 16  # episodes per round: one batched generate call of the in-process backend


@dataclass
class Episode:
    task: Task
    env: Env | None  # None in the asynchronous runner's main process: the environment lives in a worker
    traj: Trajectory
    prefix: list[str] = field(default_factory=list)  # replies replayed before the policy acts

    @property
    def finished(self) -> bool:
        return self.traj.termination is not None


class Policy(Protocol):
    def act(self, episodes: list[Episode]) -> list[Completion]:
        """One reply per episode, in order."""


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from `parts`, the same on every machine and Python (e.g. the run's seed and a rollout key)."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest(), "big") >> 1


class ModelPolicy:
    """Prompts an LLM backend with the rendered conversation of each episode.

    Over HTTP (`asynchronous`) it also answers one episode at a time for the asynchronous runner: the task's
    `meta["route_key"]` (default: its key) picks the replica, and a `meta["seed"]` makes each request carry
    `derive_seed(seed, step index)`, so sampling repeats on a server that honours per-request seeds.
    """

    def __init__(self, backend: LLMBackend, chat_format: ChatFormat, prompts: PromptBuilder, generation: GenerationConfig,
                 action_parse: str = FIRST_LINE):
        self.backend, self.chat_format, self.prompts, self.generation = backend, chat_format, prompts, generation
        self.action_parse = action_parse  # how the runner reads the action of a reply (eval_agent/parsing.py)

    @classmethod
    def build(cls, task_family: str, model: str, generation: GenerationConfig, backend: str = "hf",
              endpoints: str | None = None, chat_format: str | None = None, tokenizer: str | None = None,
              prompts: PromptBuilder | None = None, action_parse: str = FIRST_LINE,
              **backend_options) -> "ModelPolicy":
        """The policy every stage prompts a model with: the chat format the model folder records
        (else `chat_format`, else the tokenizer's template) and `prompts` (default: the run's, with one example)."""
        fmt = resolve_chat_format(model, chat_format) if Path(model).is_dir() else (chat_format or "template")
        tok = None
        if fmt == "template":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer or model)
        if backend == "openai" and endpoints:
            backend_options["endpoints_file"] = endpoints
        prompts = prompts or PromptBuilder.for_run(task_family)
        return cls(make_backend(backend, model, **backend_options), ChatFormat(fmt, tok), prompts, generation,
                   action_parse)

    @classmethod
    def from_args(cls, args: argparse.Namespace, generation: GenerationConfig) -> "ModelPolicy":
        """`build` from the arguments `add_model_args` defines (plus `--task_family`)."""
        if not args.model:
            raise SystemExit("error: --model is required for a model policy")
        options = {"max_requests": args.max_requests} if args.backend == "openai" else {}
        return cls.build(args.task_family, args.model, generation, backend=args.backend, endpoints=args.endpoints,
                         chat_format=args.chat_format, tokenizer=args.tokenizer, prompts=run_prompt(args),
                         action_parse=args.action_parse, **options)

    def prompt(self, episode: Episode) -> str:
        return self.chat_format.render(self.prompts.messages(episode.traj))

    def act(self, episodes: list[Episode]) -> list[Completion]:
        outs = self.backend.generate([self.prompt(ep) for ep in episodes], self.generation)
        return [o[0] for o in outs]

    @property
    def asynchronous(self) -> bool:
        return hasattr(self.backend, "complete")

    async def check(self) -> None:
        await self.backend.check()

    async def act_one(self, episode: Episode) -> Completion:
        meta, config = episode.task.meta, self.generation
        if meta.get("seed") is not None:
            config = replace(config, seed=derive_seed(meta["seed"], len(episode.traj.steps)))
        outs = await self.backend.complete(self.prompt(episode), config, route_key=meta.get("route_key", episode.task.key))
        return outs[0]

    async def aclose(self) -> None:
        await self.backend.aclose()


class ExpertPolicy:
    """Drives each environment with its built-in expert (alfworld's handcoded expert, the
    VirtualHome ground-truth program): the sanity baseline that must score ~100%."""

    def act(self, episodes: list[Episode]) -> list[Completion]:
        replies = []
        for ep in episodes:
            action = ep.env.expert_action()
            replies.append(Completion(text=format_reply(f"The expert's next step is {action}.", action) if action else ""))
        return replies


@dataclass
class RunStats:
    episodes: int = 0
    env_steps: int = 0
    generate_calls: int = 0  # policy calls: one per round (round runner), one per request (asynchronous runner)
    generated_tokens: int = 0
    seconds: float = 0.0
    failed: int = 0  # episodes whose requests failed (not written; the asynchronous runner)
    env_cpu_s: float = 0.0  # CPU time of the environment workers (the asynchronous runner)

    def rates(self) -> dict[str, float]:
        """Throughput, as the benchmarks report it."""
        s = max(self.seconds, 1e-9)
        return {"episodes_per_s": self.episodes / s, "env_steps_per_s": self.env_steps / s,
                "generated_tokens_per_s": self.generated_tokens / s}


def apply_reply(ep: Episode, reply: str, max_steps: int, action_parse: str = FIRST_LINE) -> None:
    """Execute one reply in the episode's environment and record the step."""
    step = Step.from_reply(reply, observation="", action_parse=action_parse)
    result = None
    if step.action is None:
        step.observation = INVALID_OBSERVATION
    else:
        try:
            result = ep.env.step(step.action)
        except Exception as e:  # one broken episode must not stop the stage
            ep.traj.steps.append(step)
            ep.traj.termination = "env_error"
            ep.traj.meta["error"] = f"{type(e).__name__}: {e}"
            return
        step.observation = result.observation
    ep.traj.steps.append(step)
    if result is not None:
        ep.traj.reward = result.reward
    if result is not None and result.done:
        ep.traj.success = result.success
        ep.traj.termination = "success" if result.success else "done"
    elif len(ep.traj.steps) >= max_steps:
        ep.traj.termination = "max_steps"


def start_episode(task: Task, env: Env, prefix: Iterable[str] = (), max_steps: int = MAX_STEPS,
                  action_parse: str = FIRST_LINE) -> Episode:
    """Reset `env` to `task` and replay `prefix` replies (e.g. expert steps 0..t-1)."""
    ep = Episode(task=task, env=env, traj=Trajectory(task_text="", meta={"key": task.key, **task.meta}), prefix=list(prefix))
    try:
        ep.traj.task_text = env.reset(task)
    except Exception as e:
        ep.traj.termination = "env_error"
        ep.traj.meta["error"] = f"{type(e).__name__}: {e}"
        return ep
    for reply in ep.prefix:
        if ep.finished:
            break
        apply_reply(ep, reply, max_steps, action_parse)
    return ep


def run_episodes(
    tasks: Iterable[tuple[Task, list[str]] | Task],
    policy: Policy,
    make_env: Callable[[], Env],
    on_finish: Callable[[Episode], None],
    max_steps: int = MAX_STEPS,
    concurrency: int = CONCURRENCY,
    total: int | None = None,
    progress: bool = True,
    steps_after_prefix: int | None = None,
) -> RunStats:
    """Run every task (optionally with a prefix of replies to replay) to the end, or to `steps_after_prefix`
    model steps past its prefix (termination `max_steps`: one budget for prefixes of any length).

    `concurrency` episodes are live at once; each round is one `policy.act` call over all of them.
    `on_finish` receives each finished episode (write it out there: that is what makes stages
    resumable). Tasks are taken from `tasks` as slots free up.
    """
    if total is None and hasattr(tasks, "__len__"):
        total = len(tasks)  # type: ignore[arg-type]
    pending = (t if isinstance(t, tuple) else (t, []) for t in tasks)
    more = True
    stats, t0 = RunStats(), time.perf_counter()
    free_envs: list[Env] = []
    live: list[Episode] = []
    bar = tqdm(total=total, disable=not progress, desc="episodes", unit="ep")
    action_parse = getattr(policy, "action_parse", FIRST_LINE)

    def finish(ep: Episode) -> None:
        on_finish(ep)
        free_envs.append(ep.env)
        stats.episodes += 1
        stats.env_steps += max(0, len(ep.traj.steps) - len(ep.prefix))
        bar.update(1)

    try:
        while more or live:
            while more and len(live) < concurrency:
                job = next(pending, None)
                if job is None:
                    more = False
                    break
                task, prefix = job
                ep = start_episode(task, free_envs.pop() if free_envs else make_env(), prefix, max_steps, action_parse)
                if ep.finished:
                    finish(ep)
                else:
                    live.append(ep)
            if not live:
                continue
            replies = policy.act(live)
            stats.generate_calls += 1
            for ep, reply in zip(live, replies):
                stats.generated_tokens += reply.num_tokens
                if reply.finish_reason == "context_overflow":
                    ep.traj.termination = "context_overflow"
                else:
                    apply_reply(ep, reply.text, max_steps, action_parse)
                if (steps_after_prefix is not None and not ep.finished
                        and len(ep.traj.steps) - len(ep.prefix) >= steps_after_prefix):
                    ep.traj.termination = "max_steps"
            still = []
            for ep in live:
                (finish if ep.finished else still.append)(ep)
            live = still
    finally:
        bar.close()
        for env in free_envs + [ep.env for ep in live]:
            env.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The command-line arguments of a model policy, the same in every stage that prompts one."""
    p.add_argument("--model", help="HF model folder (hf backend) or served model name (openai backend)")
    p.add_argument("--tokenizer", help="tokenizer folder when --model is a served name (default: --model)")
    p.add_argument("--backend", choices=("hf", "openai"), default="hf")
    p.add_argument("--endpoints", help="openai backend: file with one base URL per line (else $OPENAI_BASE_URL)")
    p.add_argument("--chat_format", choices=FORMATS,
                   help="default: what the model folder records, else template")
    p.add_argument("--icl_num", type=int, choices=(0, 1), default=1, help="in-context examples in the prompt (the original: 1)")
    p.add_argument("--instruction_from",
                   help="the instruction to prompt with: a published *_inst.txt, or an expert file (its first row's); "
                        "default: the published one beside the data, else the family's own (eval_agent/prompts.py)")
    p.add_argument("--icl_from", help="the in-context example: a published *_icl.json (ETO/STeCa), or an expert file "
                                      "(its first trajectory); default: as --instruction_from")
    p.add_argument("--max_new_tokens", type=count, default=512)
    p.add_argument("--action_parse", choices=ACTION_PARSES, default=FIRST_LINE,
                   help="first_line: the first line after Action: (any case); original: the published code's, every "
                        "line after the first case-sensitive Action:")
    p.add_argument("--max_requests", type=count, default=MAX_REQUESTS,
                   help="openai backend: requests in flight over all endpoints (default sized for 8 replicas)")
    p.add_argument("--env_workers", type=count,
                   help="openai backend: processes stepping the environments (default: the CPU cores)")


def run_prompt(args: argparse.Namespace, icl_num: int | None = None) -> PromptBuilder:
    """The run's prompt from a stage's model arguments (`add_model_args`; eval_agent.prompts.prompt_files
    decides); a file that cannot be read is a one-line error naming it."""
    try:
        return PromptBuilder.for_run(args.task_family, args.icl_num if icl_num is None else icl_num,
                                     args.instruction_from, args.icl_from)
    except (OSError, ValueError) as e:  # also BadRecord: the message names file, row and field
        raise SystemExit(f"error: {e}") from None
