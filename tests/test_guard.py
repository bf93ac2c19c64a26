"""No silent wrong results: fingerprints, one writer per output, values and inputs checked up front, bad rows
named by file, line and field, user errors in one line. Real stages on the real engines with the tiny model;
the pipeline rerunning exactly the stages a changed setting affects is in tests/test_pipeline.py."""
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.evaluate import main as evaluate
from eval_agent.cli import UserError, check_weights, model_folder
from eval_agent.expert_data import load_expert_data
from eval_agent.guard import FingerprintMismatch, Lock, LockHeld, RunGuard, fingerprint
from eval_agent.guard import main as guard_main
from eval_agent.layout import RunDir, fingerprint_path, lock_path
from eval_agent.store import BadRecord, move_aside
from Reinforced_train.data import load_rows
from sampling.generate_steps import main as generate_steps
from sampling.merge import main as merge
from tests.helpers import change_weights_in_place

REPO = Path(__file__).resolve().parent.parent
VH_TRAJECTORIES = REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl"
VH_SEEN = REPO / "data" / "virtualhome" / "vh_seen_test.jsonl"
TINY_RUN = ["--max_steps", "3", "--max_new_tokens", "4", "--icl_num", "0"]


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, no traceback, and the last line names what is wrong."""
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in last and all(w in last for w in words), last


# ---- fingerprints ---------------------------------------------------------------------------------------

def test_a_rerun_with_other_settings_is_refused_and_overwrite_moves_the_old_results_aside(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    common = ["--task_family", "virtualhome", "--split", "seen", "--limit", "2", "--out", str(out)]
    assert evaluate(common + ["--policy", "expert"])["success_rate"] == 1.0
    card = (out / "config.json").read_text()
    model = common + ["--policy", "model", "--model", str(tiny_model_dir), *TINY_RUN]
    with pytest.raises(FingerprintMismatch, match=r'policy: "expert" -> "model".*--overwrite'):
        evaluate(model)  # once reported the expert's 1.000 for the random model
    assert (out / "config.json").read_text() == card  # the run card is not rewritten either
    with pytest.raises(FingerprintMismatch, match=r"max_steps: 40 -> 1\b"):
        evaluate(common + ["--policy", "expert", "--max_steps", "1"])
    summary = evaluate(model + ["--overwrite"])
    assert summary["success_rate"] == 0.0 and summary["run"]["episodes"] == 2  # every task run again
    assert json.loads((tmp_path / "eval.old" / "summary.json").read_text())["success_rate"] == 1.0
    # what does not change results may change between a run and its resumption
    assert evaluate(model + ["--concurrency", "1"])["run"]["episodes"] == 0


def test_pipeline_mode_moves_changed_results_aside_and_fingerprint_mode_does_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    common = ["--task_family", "virtualhome", "--split", "seen", "--policy", "expert", "--out", str(out)]
    monkeypatch.setenv("STECA_FINGERPRINT", "1")
    with pytest.raises(SystemExit) as done:
        evaluate(common + ["--limit", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert done.value.code == 0 and printed["selection"]["limit"] == 1 and printed["output"] == str(out)
    assert not out.exists() and not lock_path(out).exists()
    monkeypatch.delenv("STECA_FINGERPRINT")
    evaluate(common + ["--limit", "1"])
    # the task limit only selects which results are summed up: the first task's result is kept
    assert evaluate(common + ["--limit", "2"])["run"]["episodes"] == 1
    monkeypatch.setenv("STECA_ON_CHANGE", "move_aside")  # what the pipeline sets
    assert evaluate(common + ["--limit", "2", "--max_steps", "30"])["run"]["episodes"] == 2
    assert len(list((tmp_path / "eval.old" / "tasks").iterdir())) == 2


def test_step_records_of_another_model_are_refused_expert_ones_do_not_depend_on_it(tmp_path, vh_expert, tiny_model_dir):
    args = ["--task_family", "virtualhome", "--expert_data", str(vh_expert), "--run_dir", str(tmp_path), "--limit", "1"]
    written = generate_steps(args + ["--kind", "both", "--model", str(tiny_model_dir), *TINY_RUN])
    retrained = shutil.copytree(tiny_model_dir, tmp_path / "retrained")  # the same folder trained again
    change_weights_in_place(retrained)
    steps = RunDir(tmp_path).steps("explore")
    before = steps.read_text()
    with pytest.raises(FingerprintMismatch, match=r"steps_explore.jsonl holds results made with other settings "
                                                  r"\(model: weights changed \(.*tiny_model.* -> .*retrained\)\)"):
        generate_steps(args + ["--kind", "both", "--model", str(retrained), *TINY_RUN])
    assert steps.read_text() == before
    again = generate_steps(args + ["--kind", "expert", "--model", str(retrained), *TINY_RUN])  # no model in them
    assert again["expert"]["skipped_done"] == written["expert"]["records_expected"] and again["expert"]["written"] == 0


def test_shards_made_with_other_settings_are_not_merged(tmp_path):
    expert = tmp_path / "expert.jsonl"  # six trajectories: both shards get some
    expert.write_text("".join(line + "\n" for line in VH_TRAJECTORIES.read_text().splitlines()[:6]))
    args = ["--task_family", "virtualhome", "--expert_data", str(expert), "--run_dir", str(tmp_path),
            "--kind", "expert", "--num_shards", "2"]
    generate_steps(args + ["--shard_id", "0"])
    generate_steps(args + ["--shard_id", "1", "--max_steps", "30"])
    with pytest.raises(SystemExit, match=r"steps_expert.shard1of2.jsonl was made with other settings .*max_steps: 40 -> 30"):
        merge(["--what", "steps", "--kind", "expert", "--num_shards", "2", "--task_family", "virtualhome",
               "--expert_data", str(expert), "--run_dir", str(tmp_path)])
    assert not RunDir(tmp_path).steps("expert").exists()


def test_a_rebuilt_folder_moves_aside_with_its_cache_carried_over(tmp_path):
    out = tmp_path / "data_collection"

    def build(settings: dict, overwrite: bool = False) -> None:
        with RunGuard({out: fingerprint("x", 1, settings, {})}, folder=True, resumes=False, overwrite=overwrite,
                      keep=("cache.jsonl",)):
            (out / "cache.jsonl").write_text((out / "cache.jsonl").read_text() + "a\n" if (out / "cache.jsonl").exists() else "a\n")
            (out / "train.jsonl").write_text(json.dumps(settings))

    build({"delta": 0})
    build({"delta": 0})  # the same settings: rebuilt in place
    assert not (tmp_path / "data_collection.old").exists()
    build({"delta": 0.1})
    assert json.loads((tmp_path / "data_collection.old" / "train.jsonl").read_text()) == {"delta": 0}
    assert (out / "cache.jsonl").read_text() == "a\na\na\n"  # carried over, then used
    build({"delta": 0.1}, overwrite=True)
    assert (tmp_path / "data_collection.old2" / "fingerprint.json").is_file()


def test_a_writer_killed_while_recording_its_fingerprint_leaves_a_resumable_folder(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / ".fingerprint.json.tmp4242").write_text('{"stage": ')  # the temp of write_atomic, never renamed
    fp = fingerprint("eval.evaluate", 1, {"split": "seen"}, {})
    with RunGuard({out: fp}, folder=True):
        (out / "summary.json").write_text("{}")
    (out / ".summary.json.tmp4242").write_text("{")
    with pytest.raises(FingerprintMismatch, match='split: "seen" -> "unseen"'):  # real results still count
        RunGuard({out: fingerprint("eval.evaluate", 1, {"split": "unseen"}, {})}, folder=True).__enter__()


def test_move_aside_keeps_results_and_their_fingerprint_together(tmp_path):
    data, record = tmp_path / "r.jsonl", fingerprint_path(tmp_path / "r.jsonl", folder=False)
    for p in (data, record, tmp_path / "r.jsonl.old"):  # an older data file moved aside by hand
        p.write_text(p.name)
    assert move_aside(data, record) == [tmp_path / "r.jsonl.old2", tmp_path / "r.jsonl.fingerprint.json.old2"]
    assert (tmp_path / "r.jsonl.old").read_text() == "r.jsonl.old"


def test_markers_carry_the_fingerprints(tmp_path, monkeypatch, capsys):
    marker = RunDir(tmp_path).marker("mc")
    output = tmp_path / "rollouts.jsonl"
    output.write_text("{}\n")

    def status(fp: dict, action: str = "marker-status") -> int:
        line = json.dumps({"output": str(output), **fp})
        monkeypatch.setattr(sys, "stdin", io.StringIO("some other line\n" + line + "\n"))
        return guard_main([action, str(marker)])

    fp = fingerprint("sampling.mc_rollouts", 1, {"n": 2}, {"steps": {"path": "/a/steps.jsonl", "sha256": "1"}})
    assert status(fp) == 1  # never completed
    assert status(fp, "marker-write") == 0 and status(fp) == 0
    assert status(fingerprint("sampling.mc_rollouts", 1, {"n": 2}, {"steps": {"path": "/b/steps.jsonl", "sha256": "1"}})) == 0
    assert status(fingerprint("sampling.mc_rollouts", 1, {"n": 3}, {"steps": {"path": "/a/steps.jsonl", "sha256": "1"}})) == 1
    assert "n: 2 -> 3" in capsys.readouterr().err
    assert status(fingerprint("sampling.mc_rollouts", 1, {"n": 2}, {"steps": {"path": "/a/steps.jsonl", "sha256": "2"}})) == 1
    assert "steps: content changed (/a/steps.jsonl)" in capsys.readouterr().err
    selected = fingerprint("sampling.mc_rollouts", 1, {"n": 2}, {"steps": {"path": "/a/steps.jsonl", "sha256": "1"}},
                           selection={"limit": 2})
    assert status(selected) == 1 and "limit: null -> 2" in capsys.readouterr().err  # resumable, still a rerun
    # the marker stands for the output as the stage left it: a rewrite or another run's fingerprint beside it is a rerun
    output.write_text("{}\n{}\n")
    assert status(fp) == 1 and "rollouts.jsonl: changed since" in capsys.readouterr().err
    status(fp, "marker-write")
    fingerprint_path(output, folder=False).write_text(json.dumps(fingerprint("sampling.mc_rollouts", 1, {"n": 3}, {})))
    assert status(fp) == 1 and "rollouts.jsonl: made with other settings since" in capsys.readouterr().err
    output.unlink()
    assert status(fp) == 1 and "rollouts.jsonl: missing" in capsys.readouterr().err


# ---- one writer per output ------------------------------------------------------------------------------

def test_a_second_writer_fails_at_once_and_a_killed_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "eval.evaluate", "--task_family", "virtualhome", "--split", "seen", "--policy",
           "expert", "--limit", "12", "--concurrency", "1", "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline and not (
            lock_path(out).exists() and lock_path(out).stat().st_size):  # the lock names its holder
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # holds its lock while the second one starts
    try:
        assert first.poll() is None, "the first evaluation ended before it could be paused"
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        one_line_error(second, f"pid {first.pid} on {socket.gethostname()}", "being written by")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert lock_path(out).exists()  # left behind by the killed run
    third = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and f"taking over the lock of pid {first.pid}" in third.stderr, third.stderr[-2000:]
    assert len(list((out / "tasks").iterdir())) == 12 and not lock_path(out).exists()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "r.jsonl"
    mine = Lock(lock_path(out), out)
    mine.acquire()
    with pytest.raises(LockHeld, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
        Lock(lock_path(out), out).acquire()
    mine.release()
    assert not lock_path(out).exists()
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-01-01 00:00:00"}))
    with pytest.raises(LockHeld, match=rf"pid 1 on node-17 .*never taken over: if that run is gone, remove {lock_path(out)}"):
        Lock(lock_path(out), out).acquire()


# ---- values and inputs checked up front -----------------------------------------------------------------

@pytest.mark.parametrize("module,args,message", [
    ("eval.evaluate", ["--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ("eval.evaluate", ["--limit", "-1"], "argument --limit: must be >= 1, got -1"),
    ("eval.evaluate", ["--max_steps", "0"], "argument --max_steps: must be >= 1"),
    ("eval.evaluate", ["--temperature", "-0.1"], "argument --temperature: must be >= 0"),
    ("sampling.mc_rollouts", ["--n", "0"], "argument --n: must be >= 1"),
    ("sampling.generate_steps", ["--limit", "0"], "argument --limit: must be >= 1"),
    ("sft.make_expert_data", ["--limit", "-1"], "argument --limit: must be >= 1"),
    ("data_collection.build", ["--n", "0"], "argument --n: must be >= 1"),
    ("eval.step_accuracy", ["--steps_per_task", "0"], "argument --steps_per_task: must be >= 1"),
])
def test_values_out_of_range_are_refused(tmp_path, capsys, module, args, message):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as refused:
        main(["--task_family", "virtualhome", "--run_dir", str(tmp_path), *args])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_missing_model_folder_or_one_without_a_tokenizer(tmp_path, tiny_model_dir):
    common = ["--task_family", "virtualhome", "--split", "seen", "--limit", "1", "--out", str(tmp_path / "eval")]
    with pytest.raises(UserError, match=rf"^model folder not found: {tmp_path}/nope$"):
        evaluate(common + ["--model", str(tmp_path / "nope")])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare)
    with pytest.raises(UserError, match=r"model folder .*bare has no tokenizer"):
        evaluate(common + ["--model", str(bare)])
    assert not (tmp_path / "eval").exists()
    assert model_folder("HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id is left to transformers
    with pytest.raises(UserError, match="model folder not found: models/nope"):
        model_folder("models/nope")  # models/ is a folder here: a local path that is missing


def test_weights_are_checked_before_loading(tmp_path, tiny_model_dir):
    """Present, every shard an index names, every safetensors file as long as its header says, each tensor the size
    of its dtype and shape: else one line naming the file."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    check_weights(model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"^{weights}: truncated: {len(data) // 2} bytes, the header gives {len(data)}"):
        check_weights(model)
    weights.write_bytes(data[:5])
    with pytest.raises(UserError, match="not a complete safetensors file .5 bytes"):
        check_weights(model)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(UserError, match=rf"tensor {name!r} takes \d+ bytes, its dtype and shape need \d+"):
        check_weights(model)
    weights.rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="1 of the 2 weight files model.safetensors.index.json names are missing "
                                        r"\(e.g. model-00002-of-00002.safetensors\)"):
        check_weights(model)
    for p in model.glob("*.safetensors*"):
        p.unlink()
    with pytest.raises(UserError, match=rf"^model folder {model} has no weights"):
        model_folder(str(model))
    assert model_folder(str(model), "tokenizer", weights=False)  # a tokenizer folder needs none


def test_a_stage_that_produces_nothing_fails(tmp_path, vh_expert):
    run = RunDir(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = ["--task_family", "virtualhome", "--kind", "expert", "--run_dir", str(tmp_path)]
    with pytest.raises(UserError, match=rf"expert data is empty: {empty}"):
        generate_steps(args + ["--expert_data", str(empty)])
    with pytest.raises(UserError, match=r"none of the 2 expert trajectories of .* matches a task of virtualhome/seen"):
        generate_steps(args + ["--expert_data", str(vh_expert), "--split", "seen"])
    assert not run.steps("expert").exists() and not lock_path(run.steps("expert")).exists()


# ---- bad values in rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(task_text=5), "field 'task_text' must be text, got 5"),
    (lambda r: r["steps"][0].update(text=5), "field 'steps[0].text' must be text, got 5"),
    (lambda r: r["steps"][0].update(action=5), "field 'steps[0].action' must be text or null, got 5"),
    (lambda r: r.update(key=7), "field 'key' must be text, got 7"),
])
def test_an_integer_where_text_belongs_is_named(tmp_path, change, message):
    rows = [json.loads(line) for line in VH_TRAJECTORIES.read_text().splitlines()[:2]]
    change(rows[1])
    path = tmp_path / "expert.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRecord, match=re.escape(f"expert.jsonl: line 2: {message}")):
        load_expert_data(path)


def test_training_rows_with_an_integer_for_text_or_none_at_all(tmp_path):
    turn = lambda role, value: {"from": role, "value": value}  # noqa: E731
    row = {"key": "a", "prompt": [turn("human", "task")], "chosen": [turn("gpt", "Thought: t\nAction: a")], "reward": 1.0}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({**row, "key": 3}) + "\n")
    with pytest.raises(BadRecord, match=r"train.jsonl: line 1: field 'key' must be text, got 3"):
        load_rows(path)
    path.write_text(json.dumps({**row, "chosen": [turn("gpt", 12)]}) + "\n")
    with pytest.raises(BadRecord, match=r"train.jsonl: line 1: field 'chosen': turn 0 field 'value' must be text"):
        load_rows(path)
    (tmp_path / "rft.json").write_text("[]")
    with pytest.raises(BadRecord, match=rf"^no rows in {tmp_path / 'rft.json'}$"):
        load_rows(tmp_path / "rft.json")
    with pytest.raises(BadRecord, match="^no rows in"):
        load_expert_data(tmp_path / "rft.json")


# ---- user errors end in one line ------------------------------------------------------------------------

def test_user_errors_end_in_one_line(tmp_path, vh_expert, tiny_model_dir):
    # SFT on VirtualHome rows under TASK_FAMILY=alfworld once trained with the ALFWorld instruction, silently
    sft = run_script("sft/sft.sh", {"TASK_FAMILY": "alfworld", "EXPERT_DATA": str(vh_expert),
                                    "BASE_MODEL": str(tiny_model_dir), "OUT": str(tmp_path / "sft" / "model")})
    one_line_error(sft, "is a virtualhome task", "TASK_FAMILY=virtualhome")
    assert not (tmp_path / "sft").exists()
    # the VirtualHome loader on a malformed task file
    vh_data = tmp_path / "vh"
    vh_data.mkdir()
    rows = VH_SEEN.read_text().splitlines()[:2]
    rows[1] = json.dumps({**json.loads(rows[1]), "path": 17})
    (vh_data / "vh_seen_test.jsonl").write_text("\n".join(rows) + "\n")
    env = {"TASK_FAMILY": "virtualhome", "POLICY": "expert", "SPLIT": "seen", "VH_DATA": str(vh_data),
           "OUT": str(tmp_path / "eval")}
    one_line_error(run_script("eval/evaluate.sh", env), "vh_seen_test.jsonl:2: field 'path'")
    assert "Traceback" in run_script("eval/evaluate.sh", {**env, "STECA_DEBUG": "1"}).stderr
    one_line_error(run_script("eval/evaluate.sh", {**env, "EVAL_LIMIT": "0"}), "--limit: must be >= 1")
    # data collection on an expert file with an integer for a step's text
    bad = [json.loads(line) for line in vh_expert.read_text().splitlines()]
    bad[0]["steps"][1]["text"] = 3
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    build = run_script("data_collection/build_dataset.sh", {"TASK_FAMILY": "virtualhome", "RUN_DIR": str(tmp_path / "run"),
                                                            "EXPERT_DATA": str(tmp_path / "bad.jsonl")})
    one_line_error(build, "bad.jsonl: line 1: field 'steps[1].text' must be text")


def test_a_nested_output_starting_beside_its_parent_is_neither_its_result_nor_moved(tmp_path, monkeypatch):
    """Evaluation and its step accuracy (a folder inside the evaluation's) run side by side: a nested folder whose
    writer holds its lock but has not written its fingerprint yet is not the evaluation's result, and moving the
    evaluation's results aside on a change leaves the nested output where its writer writes."""
    monkeypatch.setenv("STECA_ON_CHANGE", "move_aside")
    evaluation = tmp_path / "eval" / "base" / "seen"
    nested = evaluation / "step_accuracy"
    nested.mkdir(parents=True)
    lock_path(nested).write_text("")
    with RunGuard({evaluation: {"settings": {"a": 1}}}, folder=True):
        (evaluation / "summary.json").write_text("{}")
    assert not (tmp_path / "eval" / "base" / "seen.old").exists()  # a fresh claim: nothing moved
    (nested / "steps.jsonl").write_text("x\n")
    with RunGuard({evaluation: {"settings": {"a": 2}}}, folder=True):
        pass
    old = tmp_path / "eval" / "base" / "seen.old"
    assert (old / "summary.json").is_file() and not (evaluation / "summary.json").exists()
    assert (nested / "steps.jsonl").read_text() == "x\n" and not (old / "step_accuracy").exists()
