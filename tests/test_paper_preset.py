"""The paper preset never degrades silently (issue 23): what it refuses in the pre-flight unless opted into by name
(generated training data, reflection or LLM step rewards by the SFT model itself, a deviation-threshold grid that
collapses at the run's N), the labels the run cards and the report carry for what was opted into, the knobs it sets
where the paper and the published code differ, and the evaluation manifest the report checks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from eval import manifest
from eval.evaluate import main as evaluate
from eval.report import main as report
from eval_agent import opt_ins, preflight
from eval_agent.layout import RunDir
from eval_agent.parsing import parse_reply
from eval_agent.run_card import write_run_card
from eval_agent.runner import run_episodes
from eval_agent.variants import VARIANTS
from helpers import CounterEnv, ScriptedPolicy, counter_task

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
KEYS = ("OPENAI_API_KEY", "REFLECT_API_KEY", "OPENAI_BASE_URL", "REFLECT_BASE_URL", "EXPERT_DATA", "EXPERT_SOURCE",
        "ALFWORLD_DATA", "VH_DATA", "VARIANT", "ALLOW_GENERATED_DATA", "ALLOW_DELTA_COLLAPSE", "PRESET")


def problems(env: dict[str, str], families=("alfworld", "virtualhome")) -> list[str]:
    base = {"PRESET": "paper", "BASE_MODEL": str(SMOLLM2), "HF_HUB_OFFLINE": "1"}
    return preflight.preflight({**base, **env}, list(families), str(REPO / "outputs"), gpus=0).problems


def one(found: list[str], needle: str) -> str:
    hits = [p for p in found if needle in p]
    assert len(hits) == 1, "\n".join(found)
    return hits[0]


def vh_published(tmp_path: Path) -> Path:
    """A VirtualHome data root with a training split and SFT file of its own (shaped as the published ones)."""
    root = tmp_path / "vh"
    shutil.copytree(REPO / "data" / "virtualhome", root)
    (root / "virtualhome_sft.json").write_text(json.dumps([{"id": "0", "conversations": [
        {"from": "human", "value": "inst"}, {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "The task is Drink (Drink water)."},
        {"from": "gpt", "value": "Thought: go.\nAction: walk to dining room"}]}]))
    return root


# ---- generated training data ------------------------------------------------------------------------------

def test_generated_training_data_is_refused_unless_allowed(tmp_path, smollm2_dir):
    found = problems({})
    assert "SFT trains on alfworld's handcoded expert" in one(found, "alfworld: SFT trains")
    assert "ALLOW_GENERATED_DATA=1 runs on the generated set anyway" in one(found, "virtualhome: SFT trains")
    assert one(found, "virtualhome: sampling and MC play the generated")
    assert not any("alfworld: the training games" in p for p in found)  # check_data refuses the games already
    allowed = preflight.preflight({"PRESET": "paper", "BASE_MODEL": str(SMOLLM2), "HF_HUB_OFFLINE": "1",
                                   "ALLOW_GENERATED_DATA": "1"}, ["virtualhome"], str(tmp_path), gpus=0)
    assert not any("generated" in p for p in allowed.problems if "data under" not in p)
    assert any("ALLOW_GENERATED_DATA=1: its rows are labelled 'generated data'" in w for w in allowed.warnings)
    tiny = preflight.preflight({"PRESET": "tiny", "BASE_MODEL": str(SMOLLM2)}, ["virtualhome"], str(tmp_path), gpus=0)
    assert not any("generated" in p for p in tiny.problems)  # only the paper preset refuses it


def test_which_training_data_a_family_uses(tmp_path):
    assert set(opt_ins.generated_training_data("virtualhome", {})) == {"tasks", "expert"}
    root = vh_published(tmp_path)
    (root / "vh_train.jsonl").rename(root / "vh_train.jsonl.x")  # no training split: the generated one is played
    env = {"VH_DATA": str(root), "EXPERT_SOURCE": str(root / "virtualhome_sft.json")}
    assert list(opt_ins.generated_training_data("virtualhome", env)) == ["tasks"]
    (root / "vh_train.jsonl.x").rename(root / "vh_train.jsonl")  # a training split beside the published data
    assert opt_ins.generated_training_data("virtualhome", env) == {}
    # PRESET=paper finds the published SFT file beside the data itself (as scripts/presets.sh does per family)
    assert not any("virtualhome: SFT trains" in p for p in problems({"VH_DATA": str(root)}, ("virtualhome",)))
    assert "expert" in opt_ins.generated_training_data("alfworld", {})
    assert "expert" not in opt_ins.generated_training_data("alfworld", {"EXPERT_DATA": "/x/alfworld_sft.json"})


# ---- reflection and step rewards by the SFT model itself --------------------------------------------------

def test_reflection_without_a_key_is_refused_unless_self_by_name(smollm2_dir):
    found = problems({})
    line = one(found, "reflections by the SFT model itself")
    assert line.startswith("the main run: ") and "REFLECT_BACKEND=self to run it so" in line
    assert not any("by the SFT model itself" in p for p in problems({"REFLECT_BACKEND": "self"}))
    assert not any("by the SFT model itself" in p for p in problems({"TRAIN_SETS": "explored"}))  # nothing asked
    keyless = one(problems({"REFLECT_BASE_URL": "http://127.0.0.1:9/v1"}), "by the SFT model itself")
    assert "REFLECT_BACKEND=chat for a keyless endpoint" in keyless
    # the variants: self_reflection says self by name; llm_step_reward asks for step rewards without a key
    found = problems({"VARIANT": "table3", "REFLECT_BACKEND": "self"})
    assert not any("by the SFT model itself" in p for p in found)
    found = problems({"VARIANT": "table3,wo_de"})
    assert one(found, "variant llm_step_reward: reflections and step rewards by the SFT model itself")
    assert not any("self_reflection:" in p or "wo_de:" in p for p in found)  # wo_de's problem is the main run's


def model_evaluation(run: Path, label: str, model: Path, limit: str = "1") -> None:
    """A real evaluation of `model` labelled `label` (a label names a model: the expert's run would be refused)."""
    evaluate(["--task", "alfworld", "--split", "seen", "--model", str(model), "--limit", limit, "--max_steps", "1",
              "--max_new_tokens", "4", "--run_dir", str(run), "--label", label])


def test_run_cards_and_report_label_self_reflection_and_generated_data(tmp_path, tiny_model_dir, monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    alf = tmp_path / "alfworld"
    model_evaluation(alf, "steca", tiny_model_dir)
    shutil.copytree(RunDir(alf).evaluation("steca", "seen"), RunDir(alf).evaluation("base", "seen"))
    env = dict(os.environ)
    args = {"task_family": "alfworld", "run_dir": str(alf), "train_sets": ("calibration", "explored"),
            "reflect_backend": "auto", "step_reward": "mc"}
    labels = write_run_card(RunDir(alf).data_collection, "data_collection.build", args)["opt_ins"]
    assert list(labels) == ["generated data", "self-reflection"]
    assert "handcoded expert" in labels["generated data"]
    assert opt_ins.card_opt_ins("data_collection.build", args, {**env, "REFLECT_API_KEY": "k"}).keys() == {"generated data"}
    assert "step rewards by itself" in opt_ins.card_opt_ins("data_collection.build", {**args, "step_reward": "llm"}, env)
    assert opt_ins.card_opt_ins("eval", args, env) == {}
    md = tmp_path / "report"
    report(["--run", f"alfworld={alf}", "--out", str(md), "--paper_tables"])
    text = (md / "report.md").read_text()
    assert "| STeCa (ours) [generated data, self-reflection] |" in text
    assert "| Base model (ours) |" in text  # the base model was trained on nothing
    # the signals table's rows carry the same labels
    assert "| ALFWorld | seen | STeCa [generated data, self-reflection] |" in text
    assert "| ALFWorld | seen | Base model |" in text
    rows = json.loads((md / "report.json").read_text())["signals"]["rows"]
    assert next(r["opt_ins"] for r in rows if r["label"] == "steca") == ["generated data", "self-reflection"]


# ---- the deviation threshold grid (Table 7) ---------------------------------------------------------------

def test_deviation_cut():
    assert [preflight.deviation_cut(Fraction(d), False, 5) for d in ("0", "0.05", "0.1", "-0.01", "0.2")] == [0, 0, 0, -1, 1]
    assert preflight.deviation_cut(Fraction(0), True, 5) == -1  # STRICT=1 (<) at delta 0 is delta -0.01 at N = 5
    assert preflight.deviation_cut(Fraction("0.05"), False, 20) == 1


def test_collapsing_delta_grid(smollm2_dir):
    line = one(problems({"VARIANT": "table7"}), "select the same deviations at N=5")
    assert line.startswith("the main run (delta 0) and variant delta_0.05 (delta 0.05) and variant delta_0.1 (delta 0.1)")
    assert "N=20 tells them apart" in line and "ALLOW_DELTA_COLLAPSE=1 runs them anyway" in line
    assert not any("same deviations" in p for p in problems({"VARIANT": "table7", "N": "20"}))
    assert not any("same deviations" in p for p in problems({"VARIANT": "table7", "ALLOW_DELTA_COLLAPSE": "1"}))
    assert not any("same deviations" in p for p in problems({"VARIANT": "delta_m0.01"}))  # -0.01 differs from 0
    strict = one(problems({"VARIANT": "delta_m0.01", "STRICT": "1"}), "same deviations")  # both are '<' at N = 5
    assert "the main run (delta 0, STRICT=1) and variant delta_m0.01" in strict
    report = preflight.Report()
    preflight.check_delta_grid("tiny", {"N": "2"}, [VARIANTS["delta_0.05"]], report)
    assert report.problems == [] and "select the same deviations at N=2" in report.warnings[0]


# ---- environment options, action parsing, the preset's knobs ----------------------------------------------

def test_env_args_are_checked(smollm2_dir):
    found = problems({"ENV_ARGS": '{"feedback": "reason"}', "EVAL_ENV_ARGS": "{bad"})
    assert "alfworld's environment takes no option feedback (it takes task_text)" in one(found, "ENV_ARGS: alfworld")
    assert one(found, "EVAL_ENV_ARGS={bad: not JSON")
    assert "task_text must be one of" in one(problems({"EVAL_ENV_ARGS": '{"task_text": "x"}'}, ("alfworld",)),
                                             "EVAL_ENV_ARGS")


def test_original_action_parsing():
    reply = "Thought: go.\nAction: count 1\nThought: more"
    assert parse_reply(reply).action == "count 1"
    assert parse_reply(reply, "original").action == "count 1\nThought: more"  # every line after it
    assert parse_reply("Thought: x\naction: count 1").action == "count 1"
    assert parse_reply("Thought: x\naction: count 1", "original").action is None  # case-sensitive
    with pytest.raises(ValueError, match="action parse mode"):
        parse_reply(reply, "last_line")
    for mode, observation in (("first_line", "You said 1."), ("original", "Nothing happens.")):
        policy = ScriptedPolicy({"t": ["Thought: a\nAction: count 1\nThought: b"]})
        policy.action_parse = mode
        done = []
        run_episodes([counter_task("t", goal=5)], policy, CounterEnv, done.append, max_steps=1, progress=False)
        assert done[0].traj.steps[0].observation == observation


def test_paper_preset_sets_the_published_code_choices():
    def preset(family: str, **env: str) -> dict[str, str]:
        names = "EMBEDDER REFLECT_PROMPT ACTION_PARSE EVAL_ENV_ARGS KEEP_THRESHOLD"
        out = subprocess.run(["bash", "-c", f"source scripts/presets.sh; apply_preset paper; for v in {names}; "
                              'do echo "$v=${!v}"; done'], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if k not in KEYS}, "TASK_FAMILY": family,
                                  "PYTHON": sys.executable, **env}).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    vh = preset("virtualhome")
    assert vh == {"EMBEDDER": "bert-cls", "REFLECT_PROMPT": "original", "ACTION_PARSE": "original",
                  "EVAL_ENV_ARGS": '{"task_text": "original"}', "KEEP_THRESHOLD": "1e-22"}
    assert preset("alfworld")["KEEP_THRESHOLD"] == ""  # ALFWorld's own 0.013 is the published code's
    assert preset("virtualhome", REFLECT_PROMPT="ours", KEEP_THRESHOLD="1e-6")["KEEP_THRESHOLD"] == "1e-6"


# ---- the evaluation manifest ------------------------------------------------------------------------------

def test_manifest_recorded_and_different_ones_refused(tmp_path, tiny_model_dir):
    run = tmp_path / "alfworld"
    for label, limit in (("base", "1"), ("sft", "2")):
        model_evaluation(run, label, tiny_model_dir, limit)
    base = json.loads(RunDir(run).eval_summary("base", "seen").read_text())["manifest"]
    assert base["num_tasks"] == 1 and base["tasks"][0].startswith("valid_seen/") and len(base["tasks_sha256"]) == 64
    assert set(base["packages"]) == {"alfworld", "textworld"} and base["packages"]["alfworld"]
    with pytest.raises(SystemExit) as e:
        report(["--run", f"alfworld={run}", "--out", str(tmp_path / "r"), "--paper_tables"])
    text = str(e.value)
    assert "--allow_different_manifests" in text and "eval alfworld/seen: 2 different manifests side by side" in text
    assert "1 tasks (sha256" in text and "2 tasks (sha256" in text and str(RunDir(run).eval_summary("sft", "seen")) in text
    rep = report(["--run", f"alfworld={run}", "--out", str(tmp_path / "r"), "--paper_tables", "--allow_different_manifests"])
    assert len(rep["different_manifests"]) == 1
    assert "## Different manifests side by side" in (tmp_path / "r" / "report.md").read_text()
    assert manifest.differences([RunDir(run).eval_summary("base", "seen")] * 2) == []


# ---- acceptance: the paper command stops in the pre-flight --------------------------------------------------

def test_paper_pipeline_stops_in_the_preflight_naming_each_problem(tmp_path, smollm2_dir):
    """PRESET=paper TASK_FAMILY=both without a key, without the published data, with the paper's delta grid: refused
    before any stage, each problem on one line, no stage run or marked done."""
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env.update(TASK_FAMILY="both", PRESET="paper", BASE_MODEL=str(SMOLLM2), RUN_ROOT=str(tmp_path / "run"),
               HF_HUB_OFFLINE="1", VARIANT="table7", PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for needle in ("reflections by the SFT model itself", "alfworld: SFT trains on alfworld's handcoded expert",
                   "virtualhome: SFT trains on the generated trajectories", "select the same deviations at N=5",
                   "virtualhome: sampling and MC play the generated"):
        assert sum(needle in line for line in lines) == 1, done.stdout
    assert "== " not in done.stdout and not (tmp_path / "run").exists()  # no stage started, none marked done


def test_env_args_and_action_parse_reach_the_evaluation(tmp_path, smollm2_dir):
    """What the evaluation script passes (its fingerprint, printed without work): ENV_ARGS, then EVAL_ENV_ARGS (the
    paper preset's task text), and ACTION_PARSE."""
    def settings(**env: str) -> dict:
        out = subprocess.run(["bash", "eval/evaluate.sh"], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if k not in KEYS}, "STECA_FINGERPRINT": "1",
                                  "TASK_FAMILY": "alfworld", "RUN_DIR": str(tmp_path), "SPLIT": "seen",
                                  "PYTHON": sys.executable, **env}).stdout
        return json.loads(out.splitlines()[-1])["settings"]

    assert settings()["env_args"] == {} and settings()["action_parse"] == "first_line"
    assert settings(ENV_ARGS='{"task_text": "original"}')["env_args"] == {"task_text": "original"}
    paper = settings(PRESET="paper", ENV_ARGS='{"task_text": "data"}')
    assert paper["env_args"] == {"task_text": "original"} and paper["action_parse"] == "original"
    assert settings(PRESET="paper", EVAL_ENV_ARGS='{"task_text": "data"}')["env_args"] == {"task_text": "data"}
