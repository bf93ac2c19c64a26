"""One instruction and one in-context example per run: the first prompt of every stage that renders one (SFT,
step records, MC, evaluation, calibration evaluation, step accuracy, the reinforced-training rows, the Slurm
shards), for each family, with and without the published files beside the data, starts with the same instruction
bytes, and where the stage shows an example, the same example (eval_agent.prompts decides, every stage reads it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_agent.chat_format import ChatFormat
from eval_agent.envs import get_task_family
from eval_agent.expert_data import load_expert_data
from eval_agent.llm import GenerationConfig
from eval_agent.prompts import icl_from
from eval_agent.runner import Episode, ModelPolicy
from eval_agent.trajectory import Step, Trajectory
from test_published import VH_GENERATED, official_layout, vh_official_layout

REPO = Path(__file__).resolve().parent.parent
LLAMA2 = ChatFormat("llama-2", None)  # no tokenizer needed: the paper's format, rendered the same in every stage
OURS_ALFWORLD = Trajectory(task_text="You are in the middle of a room.\n\nYour task is to: open drawer.",
                           steps=[Step.expert("The drawer.", "go to drawer 1", "The drawer 1 is closed."),
                                  Step.expert("Open it.", "open drawer 1", "")], success=True, reward=1.0)


def run_layout(tmp_path: Path, family: str, published: bool, monkeypatch) -> tuple[Path, Path]:
    """(the family's data folder as the environment names it, the run's expert file): the published layout
    (instruction, example, SFT rows that carry their own first turn), or our data and none of the files."""
    var = "ALFWORLD_DATA" if family == "alfworld" else "VH_DATA"
    if published:
        root = official_layout(tmp_path) if family == "alfworld" else vh_official_layout(tmp_path, "role")
        monkeypatch.setenv(var, str(root))
        expert = root / ("alfworld_sft.json" if family == "alfworld" else "new_train_conversation.jsonl")
        return root, expert
    monkeypatch.delenv(var, raising=False)
    expert = tmp_path / "expert.jsonl"
    row = ({"key": "train/pick-x/trial_1", **OURS_ALFWORLD.to_dict()} if family == "alfworld"
           else json.loads((VH_GENERATED / "vh_train_trajectories.jsonl").read_text().splitlines()[0]))
    expert.write_text(json.dumps(row) + "\n")
    return get_task_family(family).find_data_root(), expert


def expected_prompt(family: str, root: Path, published: bool) -> tuple[str, Trajectory]:
    """The run's instruction and example as the published files (read whole) or the family's own give them."""
    own = get_task_family(family)
    if not published:
        return own.INSTRUCTION, own.ICL_EXAMPLE
    return (root / f"{family}_inst.txt").read_text(), icl_from(root / f"{family}_icl.json")


def policy_prompt(stage: str, argv: list[str], task_text: str) -> str:
    """The first prompt a model-prompting stage sends: its own command line parsed by its own parser, the policy
    built as the stage builds it, asked for the first step of a task."""
    from eval.calibration import build_parser as calibration
    from eval.evaluate import build_parser as evaluate
    from eval.step_accuracy import build_parser as step_accuracy
    from sampling.generate_steps import build_parser as generate_steps
    from sampling.mc_rollouts import build_parser as mc_rollouts

    parsers = {"steps": generate_steps, "mc": mc_rollouts, "eval": evaluate, "calibration": calibration,
               "step_accuracy": step_accuracy}
    args = parsers[stage]().parse_args(argv)
    policy = ModelPolicy.from_args(args, GenerationConfig())
    return policy.prompt(Episode(task=None, env=None, traj=Trajectory(task_text=task_text)))


def slurm_shard_argv(tmp_path: Path, common: dict[str, str]) -> dict[str, list[str]]:
    """The command lines scripts/slurm/mc_array.sbatch gives its two stages (its servers and the stages replaced
    by stand-ins that record them): it runs from SLURM_SUBMIT_DIR, where a stand-in serve_vllm.sh lies."""
    submit, record = tmp_path / "submit", tmp_path / "argv"
    (submit / "scripts").mkdir(parents=True)
    (submit / "scripts" / "serve_vllm.sh").write_text(
        'while [ "$1" != -- ]; do shift; done; shift\n'
        'mkdir -p "$(dirname "$ENDPOINTS_FILE")" && echo http://127.0.0.1:9/v1 > "$ENDPOINTS_FILE"\n'
        'export ENDPOINTS=$ENDPOINTS_FILE; exec "$@"\n')
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\ncase "$2" in sampling.*) printf "%s\\n" "$@" > "{record}.$2"; exit 0 ;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, **common, "PYTHON": str(python), "PYTHONPATH": str(REPO), "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1", "KIND": "explore"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "mc_array.sbatch")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return {name: Path(f"{record}.sampling.{name}").read_text().splitlines()[2:] for name in ("generate_steps", "mc_rollouts")}


@pytest.mark.parametrize("published", [False, True], ids=["ours", "published"])
@pytest.mark.parametrize("family", ["alfworld", "virtualhome"])
def test_every_stage_prompts_with_the_run_instruction(tmp_path, monkeypatch, tiny_model_dir, family, published):
    from data_collection import datasets
    from data_collection.build import instructions, parse_args as collection_args
    from sft.train import build_parser as sft_parser, training_messages

    root, expert_file = run_layout(tmp_path, family, published, monkeypatch)
    instruction, example = expected_prompt(family, root, published)
    (expert,) = load_expert_data(expert_file)[:1]
    head = f"<s>[INST] {instruction} [/INST] OK </s>"  # the run's instruction, byte for byte, then "OK"
    run = tmp_path / "run"
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text("http://127.0.0.1:9/v1\n")  # never called: only the prompt is rendered
    model = ["--task_family", family, "--run_dir", str(run), "--model", str(tiny_model_dir), "--backend", "openai",
             "--endpoints", str(endpoints), "--chat_format", "llama-2"]
    prompts: dict[str, str] = {}

    for icl_num in ("0", "1"):  # SFT: no example by default (the original's), the run's with SFT_ICL_NUM=1
        sft_args, _ = sft_parser().parse_args_into_dataclasses(
            ["--task_family", family, "--data", str(expert_file), "--output_dir", str(tmp_path / "sft"),
             "--icl_num", icl_num])
        messages, _, replaced = next(training_messages(sft_args, [expert]))
        prompts[f"sft_icl{icl_num}"] = LLAMA2.render(messages)
        assert replaced == published  # the published rows carry their own first turn: the run's is trained
    for stage, extra in (("steps", ["--expert_data", str(expert_file)]), ("mc", []), ("eval", ["--split", "seen"]),
                         ("calibration", ["--split", "seen"]), ("step_accuracy", ["--split", "seen"])):
        prompts[stage] = policy_prompt(stage, model + extra, expert.task_text)
    rows_args = collection_args(["--task_family", family, "--run_dir", str(run), "--expert_data", str(expert_file)])
    rows_instruction = instructions(rows_args, {expert.meta["key"]: expert})[expert.meta["key"]]
    prompts["training_rows"] = LLAMA2.render(datasets.expert_prompt(rows_instruction, expert, 0))
    shards = slurm_shard_argv(tmp_path, {"RUN_DIR": str(run), "TASK_FAMILY": family, "MODEL": str(tiny_model_dir),
                                         "EXPERT_DATA": str(expert_file), "CHAT_FORMAT": "llama-2"})
    prompts["slurm_steps"] = policy_prompt("steps", shards["generate_steps"], expert.task_text)
    prompts["slurm_mc"] = policy_prompt("mc", shards["mc_rollouts"], expert.task_text)

    for stage, prompt in prompts.items():
        assert prompt.startswith(head), f"{stage}: {prompt[:300]!r}"
    shown = LLAMA2.render(example.to_messages(include_last_observation=False))
    with_example = [s for s in prompts if s not in ("sft_icl0", "training_rows")]  # these have none, as the original
    for stage in with_example:
        assert prompts[stage][len(head):].startswith(shown), f"{stage}: another example"
    for stage in ("sft_icl0", "training_rows"):
        assert prompts[stage][len(head):].startswith(LLAMA2.render([{"role": "user", "content": expert.task_text}]))


def test_named_files_reach_sft_and_the_slurm_shards_and_row_instruction_keeps_the_original(tmp_path, monkeypatch,
                                                                                             tiny_model_dir):
    """INSTRUCTION_FROM / ICL_FROM named by the run reach the SFT script and the shards' command lines;
    ROW_INSTRUCTION=1 trains (and builds rows) with each published row's own first turn, as the original."""
    from data_collection.build import instructions, parse_args as collection_args
    from sft.train import build_parser as sft_parser, training_messages

    root, expert_file = run_layout(tmp_path, "alfworld", True, monkeypatch)
    (expert,) = load_expert_data(expert_file)
    mine = tmp_path / "mine_inst.txt"
    mine.write_text("My own instruction.")
    shards = slurm_shard_argv(tmp_path, {"RUN_DIR": str(tmp_path / "run"), "TASK_FAMILY": "alfworld",
                                         "MODEL": str(tiny_model_dir), "EXPERT_DATA": str(expert_file),
                                         "INSTRUCTION_FROM": str(mine), "ICL_FROM": str(expert_file)})
    for argv in shards.values():
        assert argv[argv.index("--instruction_from") + 1] == str(mine) and argv[argv.index("--icl_from") + 1] == str(expert_file)
    env = {**os.environ, "STECA_FINGERPRINT": "1", "PYTHON": sys.executable, "TASK_FAMILY": "alfworld",
           "RUN_DIR": str(tmp_path / "run"), "BASE_MODEL": str(tiny_model_dir), "EXPERT_DATA": str(expert_file),
           "INSTRUCTION_FROM": str(mine)}
    done = subprocess.run(["bash", "sft/sft.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (fp,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert fp["inputs"]["instruction_from"]["path"] == str(mine)

    sft_args, _ = sft_parser().parse_args_into_dataclasses(
        ["--task_family", "alfworld", "--data", str(expert_file), "--output_dir", str(tmp_path / "sft"),
         "--row_instruction", "True"])
    messages, _, replaced = next(training_messages(sft_args, [expert]))
    assert messages[0]["content"] == expert.meta["instruction"] != (root / "alfworld_inst.txt").read_text()
    assert not replaced
    rows_args = collection_args(["--task_family", "alfworld", "--run_dir", str(tmp_path / "run"), "--expert_data",
                                 str(expert_file), "--row_instruction"])
    assert instructions(rows_args, {"k": expert}) == {"k": expert.meta["instruction"]}
