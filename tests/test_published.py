"""The published inputs read as published: SFT and training files in both turn schemas, the original's
instruction and one-shot example files, and where the `paper` preset finds them (small fixtures written
here in the published layouts; no fetched data)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from eval_agent.expert_data import load_expert_data
from eval_agent.prompts import PromptBuilder, icl_from, instruction_from
from eval_agent.published import published_files
from eval_agent.store import BadRecord
from Reinforced_train.data import load_rows

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = ("Interact with a household to solve a task. PUBLISHED-INSTRUCTION-MARKER\n"
               "Your response should use the following format:\n\nThought: <your thoughts>\nAction: <your next action>")
ICL_TASK = "You are in the middle of a room. PUBLISHED-EXAMPLE-MARKER\n\nYour task is to: put a pen in drawer."


def turns(schema: str, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Turns in one of the two published schemas: from/value (human/gpt) or role/content (user/assistant)."""
    if schema == "from":
        return [{"from": {"user": "human", "assistant": "gpt"}[r], "value": v} for r, v in pairs]
    return [{"role": r, "content": v} for r, v in pairs]


def sft_row(schema: str, i: int = 0, game: str = "data/json_2.1.1/train/pick-x/trial_1") -> dict:
    return {"id": f"alfworld_{i}", "game_file": game, "conversations": turns(schema, [
        ("user", INSTRUCTION), ("assistant", "OK"), ("user", "You are in a room.\n\nYour task is to: open drawer."),
        ("assistant", "Thought: The drawer.\nAction: go to drawer 1"), ("user", "Observation: The drawer 1 is closed."),
        ("assistant", "Thought: Open it.\nAction: open drawer 1")])}


def icl_file(path: Path) -> Path:
    """ETO's alfworld_icl.json mixes `role` and `from` keys with `content` (original-code.md 7.2)."""
    example = [{"role": "user", "content": ICL_TASK},
               {"from": "gpt", "content": "Thought: Pens lie on desks.\nAction: go to desk 1"},
               {"role": "user", "content": "Observation: On the desk 1, you see a pen 1."},
               {"from": "gpt", "content": "Thought: Take it.\nAction: take pen 1 from desk 1"}]
    path.write_text(json.dumps([example]))
    return path


@pytest.mark.parametrize("schema", ["from", "role"])
def test_sft_file_in_both_schemas(tmp_path, schema):
    path = tmp_path / "alfworld_sft.json"
    path.write_text(json.dumps([sft_row(schema, 0), sft_row(schema, 1)]))
    trajs = load_expert_data(path)
    assert [t.meta["key"] for t in trajs] == ["alfworld_0", "alfworld_1"]
    assert trajs[0].meta["instruction"] == INSTRUCTION and trajs[0].actions == ["go to drawer 1", "open drawer 1"]
    assert trajs[0].steps[0].observation == "The drawer 1 is closed." and trajs[0].steps[-1].observation == ""
    assert instruction_from(path) == INSTRUCTION
    assert icl_from(path).actions == ["go to drawer 1", "open drawer 1"]  # an expert row as the example


@pytest.mark.parametrize("schema", ["from", "role"])
def test_training_file_in_both_schemas(tmp_path, schema):
    row = {"id": "0", "reward": 1.01, "deviation": 1.0,
           "prompt": turns(schema, [("user", INSTRUCTION), ("assistant", "OK"), ("user", "task")]),
           "chosen": turns(schema, [("assistant", "Thought: a\nAction: b"), ("user", "Observation: c"),
                                    ("assistant", "Thought: d\nAction: e")]),
           "rejected": turns(schema, [("assistant", "Thought: x\nAction: y")])}
    path = tmp_path / "final_data_rft_train.json"
    path.write_text(json.dumps([row]))
    (got,) = load_rows(path, need_rejected=True)
    assert [m["role"] for m in got.chosen] == ["assistant", "user", "assistant"] and got.weight == 1.01
    assert got.prompt[0] == {"role": "user", "content": INSTRUCTION}


@pytest.mark.parametrize("turn, message", [
    ({"role": "user"}, r"row 1: turn 3 has no field 'value'"),
    ({"content": "x"}, r"row 1: turn 3 has no field 'from' \(or 'role'\)"),
    ({"role": "system", "content": "x"}, r"row 1: turn 3 field 'role' has unknown role 'system'"),
    ({"from": "gpt", "value": 3}, r"row 1: turn 3 field 'value' must be text"),
])
def test_bad_turn_names_file_row_turn_and_field(tmp_path, turn, message):
    bad = sft_row("role", 1)
    bad["conversations"][3] = turn
    path = tmp_path / "alfworld_sft.json"
    path.write_text(json.dumps([sft_row("role", 0), bad]))
    with pytest.raises(BadRecord, match=rf"alfworld_sft\.json: {message}"):
        load_expert_data(path)


def test_published_instruction_and_example_files(tmp_path):
    inst = tmp_path / "alfworld_inst.txt"
    inst.write_text(INSTRUCTION)  # read whole, as the original reads it
    assert instruction_from(inst) == INSTRUCTION
    example = icl_from(icl_file(tmp_path / "alfworld_icl.json"))
    assert example.task_text == ICL_TASK and example.actions == ["go to desk 1", "take pen 1 from desk 1"]
    from eval_agent.trajectory import Trajectory

    msgs = PromptBuilder(INSTRUCTION, example).messages(Trajectory(task_text="the task"))
    # the original's conversation: instruction, OK, the example's turns verbatim (ending with an answer), the task
    assert [m["content"] for m in msgs] == [INSTRUCTION, "OK", ICL_TASK, "Thought: Pens lie on desks.\nAction: go to desk 1",
                                            "Observation: On the desk 1, you see a pen 1.",
                                            "Thought: Take it.\nAction: take pen 1 from desk 1", "the task"]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt: the instruction file is empty"):
        instruction_from(tmp_path / "empty.txt")
    (tmp_path / "bad_icl.json").write_text(json.dumps([[{"role": "assistant", "content": "x"}]]))
    with pytest.raises(ValueError, match=r"bad_icl\.json: row 0: example 0: the task turn"):
        icl_from(tmp_path / "bad_icl.json")


def official_layout(root: Path, with_prompts: bool = True) -> Path:
    """A data folder in the layout scripts/download_data.sh leaves: games + the published files beside them."""
    alf = root / "alfworld"
    alf.mkdir(parents=True)
    (alf / "json_2.1.1").symlink_to(REPO / "data" / "alfworld" / "json_2.1.1")
    (alf / "alfworld_sft.json").write_text(json.dumps([sft_row("role")]))
    if with_prompts:
        (alf / "alfworld_inst.txt").write_text(INSTRUCTION + "\n")  # a file ends a line; the rows' first turn does not
        icl_file(alf / "alfworld_icl.json")
    return alf


def test_published_files_found_beside_the_data(tmp_path):
    alf = official_layout(tmp_path / "a")
    assert published_files("alfworld", alf) == {"EXPERT_SOURCE": alf / "alfworld_sft.json",
                                                "INSTRUCTION_FROM": alf / "alfworld_inst.txt",
                                                "ICL_FROM": alf / "alfworld_icl.json"}
    bare = official_layout(tmp_path / "b", with_prompts=False)  # the SFT rows stand in for the prompt files
    assert published_files("alfworld", bare) == dict.fromkeys(["EXPERT_SOURCE", "INSTRUCTION_FROM", "ICL_FROM"],
                                                              bare / "alfworld_sft.json")
    assert published_files("virtualhome", tmp_path / "nothing") == {}


def preset_env(alf: Path, **extra: str) -> dict[str, str]:
    """What `source scripts/stage_lib.sh` leaves for PRESET=paper (its variables printed back)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXPERT_SOURCE", "INSTRUCTION_FROM", "ICL_FROM", "EMBEDDER")}
    env.update(PRESET="paper", TASK_FAMILY="alfworld", ALFWORLD_DATA=str(alf), PYTHON=str(REPO / ".venv/bin/python"),
               **extra)
    script = 'source scripts/stage_lib.sh; for v in EXPERT_SOURCE INSTRUCTION_FROM ICL_FROM EMBEDDER; do echo "$v=${!v:-}"; done'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_paper_preset_uses_the_published_files_and_the_user_wins(tmp_path):
    alf = official_layout(tmp_path / "official")
    got = preset_env(alf)
    assert got == {"EXPERT_SOURCE": str(alf / "alfworld_sft.json"), "INSTRUCTION_FROM": str(alf / "alfworld_inst.txt"),
                   "ICL_FROM": str(alf / "alfworld_icl.json"), "EMBEDDER": "bert-cls"}
    mine = preset_env(alf, INSTRUCTION_FROM="/my/inst.txt", EMBEDDER="minilm", EXPERT_SOURCE="/my/sft.json")
    assert mine["INSTRUCTION_FROM"] == "/my/inst.txt" and mine["EMBEDDER"] == "minilm"
    assert mine["EXPERT_SOURCE"] == "/my/sft.json"
    assert mine["ICL_FROM"] == str(alf / "alfworld_icl.json")


def test_paper_preset_prompts_carry_the_published_instruction_and_example(tmp_path, tiny_model_dir, serve_hf,
                                                                         monkeypatch):
    """PRESET=paper on data in the official layout: the expert data is the published file (its instruction kept
    for SFT and reflection), and every prompt that sampling, MC and evaluation send (logged by the server
    as rendered) carries the published instruction and one-shot example."""
    from data_collection.build import build_parser, instructions

    game = sorted((REPO / "data" / "alfworld" / "json_2.1.1" / "train").glob("*/*/game.tw-pddl"))[0].parent
    alf = tmp_path / "official" / "alfworld"
    alf.mkdir(parents=True)
    (alf / "json_2.1.1").symlink_to(REPO / "data" / "alfworld" / "json_2.1.1")
    (alf / "alfworld_sft.json").write_text(json.dumps(
        [sft_row("role", 0, game=f"data/json_2.1.1/train/{game.parent.name}/{game.name}")]))
    (alf / "alfworld_inst.txt").write_text(INSTRUCTION)
    icl_file(alf / "alfworld_icl.json")
    log = tmp_path / "requests.jsonl"
    url = serve_hf(tiny_model_dir, "--log_requests", str(log))
    (tmp_path / "endpoints.txt").write_text(url + "\n")
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXPERT_SOURCE", "EXPERT_DATA", "INSTRUCTION_FROM", "ICL_FROM", "OPENAI_API_KEY", "REFLECT_API_KEY")}
    env.update(PRESET="paper", TASK_FAMILY="alfworld", ALFWORLD_DATA=str(alf), RUN_DIR=str(run), OMP_NUM_THREADS="1",
               BACKEND="openai", ENDPOINTS=str(tmp_path / "endpoints.txt"), MODEL=str(tiny_model_dir),
               MAX_NEW_TOKENS="4", MAX_STEPS="4", SAMPLE_LIMIT="1", KIND="explore", N="1", EVAL_LIMIT="1",
               SPLIT="", LABEL="probe", CONCURRENCY="2")

    def stage(script: str, **extra: str) -> None:
        done = subprocess.run(["bash", script], cwd=REPO, env={**env, **extra}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{script}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    stage("sft/make_expert_data.sh")
    (expert,) = load_expert_data(run / "expert" / "train" / "trajectories.jsonl")
    assert expert.meta["key"] == "alfworld_0" and expert.meta["instruction"] == INSTRUCTION  # SFT trains on it
    args = build_parser().parse_args(["--task_family", "alfworld", "--run_dir", str(run)])
    monkeypatch.setenv("ALFWORLD_DATA", str(alf))  # as the stages see it
    assert instructions(args, {"alfworld_0": expert}) == {"alfworld_0": INSTRUCTION}  # the reflection history's
    stage("sampling/generate_steps.sh")
    stage("sampling/mc_rollouts.sh", MIN_STEP="0")  # the one short trajectory has no step data collection judges
    stage("eval/evaluate.sh", SPLIT="seen")
    prompts = [json.loads(line)["prompt"] for line in log.read_text().splitlines()]
    prompts = [p for batch in prompts for p in (batch if isinstance(batch, list) else [batch])]
    assert len(prompts) >= 3
    for prompt in prompts:
        assert INSTRUCTION in prompt and ICL_TASK in prompt and "Action: take pen 1 from desk 1" in prompt
        assert "You are an agent in a household" not in prompt  # never our own instruction


# ---- the published VirtualHome training data ---------------------------------------------------------------

VH_GENERATED = REPO / "data" / "virtualhome"
VH_INSTRUCTION = ("Interact with a household to solve a task. PUBLISHED-VH-MARKER\nYour response should use the "
                  "following format:\nThought: <your thoughts>\nAction: <your next action>")
VH_ICL_TASK = "The task is Drink (Drink water)."
# an absolute path from another machine (the published rows carry their authors'): only its tail matches ours
FOREIGN_PREFIX = ("/srv/elsewhere/language-planner-main/evaluation-code/dataset/"
                  "programs_processed_precond_nograb_morepreconds/executable_programs/")


def vh_training_rows(schema: str, n: int = 3) -> list[dict]:
    """Rows shaped like the published new_train_conversation.jsonl, made from the first generated training tasks
    (scene 1, whose graphs virtualhome-eval ships): `path` on the authors' machine, the expert's conversation
    (instruction, OK, task, steps) in `schema`, the goal and ids; no `new_program_lines`."""
    from eval_agent.envs.virtualhome import path_tail
    from eval_agent.trajectory import Trajectory

    tasks = [json.loads(line) for line in (VH_GENERATED / "vh_train.jsonl").read_text().splitlines()[:n]]
    trajs = {r["key"]: r for r in map(json.loads, (VH_GENERATED / "vh_train_trajectories.jsonl").read_text().splitlines())}
    rows = []
    for i, task in enumerate(tasks):
        tail = path_tail(task["path"])
        traj = Trajectory.from_dict({k: v for k, v in trajs[tail].items() if k != "key"})
        conversation = traj.to_conversation(VH_INSTRUCTION)
        if schema == "role":
            conversation = turns("role", [({"human": "user", "gpt": "assistant"}[t["from"]], t["value"])
                                          for t in conversation])
        rows.append({"id": str(i), "path": FOREIGN_PREFIX + tail + ".txt", "conversations": conversation,
                     **{k: task[k] for k in ("revised_graph", "object_id_dict", "task", "description")}})
    return rows


def vh_icl_file(path: Path) -> Path:
    """The shape of STeCa's virtualhome_icl.json: one example, the task then steps with `Observation: ` turns."""
    example = turns("from", [("user", VH_ICL_TASK), ("assistant", "Thought: I am thirsty.\nAction: Walk to dining room"),
                             ("user", "Observation: "), ("assistant", "Thought: A glass.\nAction: Find water glass")])
    path.write_text(json.dumps([example]))
    return path


def vh_official_layout(root: Path, schema: str = "from", sft_file: bool = False, prompts: bool = True,
                       training: bool = True) -> Path:
    """A VH_DATA folder as scripts/download_data.sh leaves it: the test sets, the published training tasks
    (`training`), their SFT file in the other schema (`sft_file`), the instruction and example (`prompts`)."""
    vh = root / "virtualhome"
    vh.mkdir(parents=True)
    for name in ("vh_seen_test.jsonl", "vh_unseen_test.jsonl"):
        (vh / name).symlink_to(VH_GENERATED / name)
    rows = vh_training_rows(schema)
    if training:
        (vh / "new_train_conversation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if sft_file:
        other = "role" if schema == "from" else "from"
        (vh / "new_train_sft.json").write_text(json.dumps(
            [{"path": r["path"], "conversations": vh_training_rows(other)[i]["conversations"]} for i, r in enumerate(rows)]))
    if prompts:
        (vh / "virtualhome_inst.txt").write_text(VH_INSTRUCTION + "\n")
        vh_icl_file(vh / "virtualhome_icl.json")
    return vh


@pytest.mark.parametrize("schema, sft_file", [("from", False), ("role", True)])
def test_vh_published_training_data_is_the_training_split(tmp_path, schema, sft_file):
    """Its tasks are the training split (graphs by the tail of `path`), its conversations the SFT data, imported by
    the expert-data stage, and the expert replay of sampling plays them (every step record written)."""
    from eval_agent.envs.virtualhome import VirtualHomeEnv, load_tasks
    from eval_agent.published import training_data
    from sampling.generate_steps import main as generate_steps
    from sft.make_expert_data import main as make_expert_data

    vh = vh_official_layout(tmp_path, schema, sft_file)
    data = training_data("virtualhome", vh)
    want_expert = vh / ("new_train_sft.json" if sft_file else "new_train_conversation.jsonl")
    assert (data.kind, data.tasks, data.expert) == ("published", vh / "new_train_conversation.jsonl", want_expert)
    tasks = load_tasks("train", data_root=vh)
    assert [t.key for t in tasks] == [r["path"][len(FOREIGN_PREFIX):-4] for r in vh_training_rows(schema)]
    assert tasks[0].meta["program"] == [] and tasks[0].meta["graph_file"].endswith(tasks[0].key + ".json")

    run = tmp_path / "run"
    make_expert_data(["--task_family", "virtualhome", "--run_dir", str(run), "--data_root", str(vh)])
    experts = load_expert_data(run / "expert" / "train" / "trajectories.jsonl")
    assert [t.meta["key"] for t in experts] == [t.key for t in tasks]
    assert all(t.meta["instruction"] == VH_INSTRUCTION for t in experts)
    assert VirtualHomeEnv().reset(tasks[0]) == experts[0].task_text  # the task text the env gives
    summary = generate_steps(["--task_family", "virtualhome", "--kind", "expert", "--run_dir", str(run),
                              "--data_root", str(vh)])
    assert summary["expert"]["unmatched"] == 0
    assert summary["expert"]["written"] == sum(len(t.steps) for t in experts) and summary["expert"]["env_errors"] == 0


def test_vh_data_without_the_training_file_says_so(tmp_path, caplog):
    from eval_agent.envs import virtualhome
    from eval_agent.published import check_training, training_data

    vh = vh_official_layout(tmp_path, training=False)
    with caplog.at_level("WARNING"):
        data = training_data("virtualhome", vh)
    assert data.kind == "generated" and data.tasks == VH_GENERATED / "vh_train.jsonl"
    assert f"{vh} has no new_train_conversation.jsonl" in data.why
    assert f"{vh} has no new_train_conversation.jsonl (the published VirtualHome training tasks)" in caplog.text
    assert [t.key for t in virtualhome.load_tasks("train", data_root=vh)][:1]  # the fall-back still runs, loudly
    ok, line = check_training("virtualhome", vh, expected=4920)
    assert ok and line.startswith("--   virtualhome training data: generated")


def test_vh_training_data_counted_by_the_check_and_the_doctor(tmp_path, capsys):
    from eval_agent.doctor import _virtualhome_data
    from eval_agent.published import check_training, main

    vh = vh_official_layout(tmp_path, "role", sft_file=True)
    ok, line = check_training("virtualhome", vh, expected=3)
    assert ok and line.startswith("ok   virtualhome training data: published: tasks 3, with_scene_graph 3, "
                                  "expert_trajectories 3, of_a_task 3"), line
    with pytest.raises(SystemExit):  # the paper's 4,920 tasks: 3 is short
        main(["--task_family", "virtualhome", "--data_root", str(vh), "--check_training"])
    assert capsys.readouterr().out.startswith("BAD  virtualhome training data: published: tasks 3")
    doctor = _virtualhome_data(str(vh))["training_data"]
    assert doctor["kind"] == "published" and doctor["tasks"] == 3 and doctor["of_a_task"] == 3


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.pop("conversations"), r":1: field 'new_program_lines' is missing or not a list"),
    (lambda r: r.update(path="/elsewhere/file.txt"), r":1: field 'path': path '/elsewhere/file.txt' does not end"),
])
def test_bad_vh_training_rows_name_file_line_and_field(tmp_path, breakage, message):
    from eval_agent.envs.virtualhome import read_task_file

    row = vh_training_rows("from", 1)[0]
    breakage(row)
    path = tmp_path / "new_train_conversation.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BadRecord, match=f"new_train_conversation.jsonl{message}"):
        read_task_file(path)
    if "conversations" in row:  # the same row as SFT data: its key is the path's tail, named when it has none
        with pytest.raises(BadRecord, match=r"new_train_conversation.jsonl: line 1: field 'path': "):
            load_expert_data(path)
