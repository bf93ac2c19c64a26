"""What a hostile user tried, each probe reproduced as it was run, at the smallest scale that shows it (the real stage
scripts on the VirtualHome engine with the tiny model): a result is what its label says in every path through the
pipeline. The pipeline's own stage function runs end to end in tests/test_pipeline.py; `stage` below does what it
does (scripts/run_pipeline.sh): ask the stage for its fingerprints, skip it when its marker says it completed with
them, else run it and write the marker."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.evaluate import main as evaluate
from eval.report import main as report
from eval_agent.guard import FingerprintMismatch
from eval_agent.layout import RunDir
from eval_agent.store import read_jsonl
from sampling.generate_steps import main as generate_steps
from tests.helpers import change_weights_in_place

REPO = Path(__file__).resolve().parent.parent


def script_env(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REFLECT_API_KEY", "N", "TRAIN_SETS")}
    return {**clean, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PRESET": "tiny", **env}


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def stage(run: Path, name: str, script: str, env: dict[str, str]) -> tuple[str, str]:
    """("skipped" | "ran" | "failed", what the marker check said), as the pipeline's `stage` does it."""
    marker = str(RunDir(run).marker(name))
    fingerprints = subprocess.run(["bash", script], cwd=REPO, env={**env, "STECA_FINGERPRINT": "1"},
                                  capture_output=True, text=True, check=True).stdout
    status = subprocess.run([sys.executable, "-m", "eval_agent.guard", "marker-status", marker], input=fingerprints,
                            cwd=REPO, capture_output=True, text=True)
    if status.returncode == 0:
        return "skipped", status.stderr
    if run_script(script, env).returncode != 0:
        return "failed", status.stderr
    subprocess.run([sys.executable, "-m", "eval_agent.guard", "marker-write", marker], input=fingerprints, cwd=REPO,
                   text=True, check=True)
    return "ran", status.stderr


@pytest.fixture()
def sampled(tmp_path, vh_expert, tiny_model_dir) -> tuple[Path, dict[str, str]]:
    """A run directory with step records of one task (both kinds) and its MC rollouts under N=2, marked done."""
    env = script_env(TASK_FAMILY="virtualhome", RUN_DIR=str(tmp_path), EXPERT_DATA=str(vh_expert),
                     MODEL=str(tiny_model_dir), MAX_STEPS="5", MAX_NEW_TOKENS="4", SAMPLE_LIMIT="1",
                     REFLECT_BACKEND="self", STECA_ON_CHANGE="move_aside")
    assert stage(tmp_path, "steps", "sampling/generate_steps.sh", env)[0] == "ran"
    assert stage(tmp_path, "mc", "sampling/mc_rollouts.sh", {**env, "N": "2"})[0] == "ran"
    return tmp_path, env


def test_a_marker_stands_for_the_rollouts_on_disk_not_an_interrupted_run_of_other_settings(sampled):
    """Stopped in MC under N=3 (the N=2 rollouts moved aside), then rerun under N=2: MC once said `done, skipped` and
    data collection built its training set from the partial N=3 rollouts."""
    run, env = sampled
    rollouts = RunDir(run).rollouts("expert")
    complete = sorted(r["key"] for r in read_jsonl(rollouts))
    stopped = subprocess.Popen(["bash", "sampling/mc_rollouts.sh"], cwd=REPO, env={**env, "N": "3"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (rollouts.exists() and len(rollouts.read_text().splitlines()) not in (0, len(complete))) \
            and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stopped.poll() is None, "the N=3 run ended before it could be stopped"
    os.kill(stopped.pid, signal.SIGKILL)
    stopped.wait()
    assert rollouts.with_name("rollouts_expert.jsonl.old").is_file()  # the N=2 rollouts, moved aside
    what, said = stage(run, "mc", "sampling/mc_rollouts.sh", {**env, "N": "2"})
    assert what == "ran" and "rollouts_expert.jsonl: made with other settings since" in said, said
    assert sorted(r["key"] for r in read_jsonl(rollouts)) == complete  # every rollout of N=2, each once
    assert stage(run, "mc", "sampling/mc_rollouts.sh", {**env, "N": "2"})[0] == "skipped"


def test_a_failed_rerun_under_other_settings_leaves_no_marker_standing_for_its_output(sampled):
    """A TRAIN_SETS=explored rerun fails on an empty training set after moving the good data collection aside; the
    next default rerun once skipped data collection as done and failed in training on the empty set."""
    run, env = sampled
    assert stage(run, "data_collection", "data_collection/build_dataset.sh", env)[0] == "ran"
    train = RunDir(run).train_set
    good = train.read_text()
    assert good
    explored = {**env, "TRAIN_SETS": "explored"}
    assert stage(run, "data_collection", "data_collection/build_dataset.sh", explored)[0] == "failed"
    assert (run / "data_collection.old" / "train.jsonl").read_text() == good
    what, said = stage(run, "data_collection", "data_collection/build_dataset.sh", env)
    assert what == "ran" and "data_collection: made with other settings since" in said, said
    assert train.read_text() == good


def test_a_run_that_failed_before_its_first_result_leaves_nothing_to_refuse(tmp_path, scripted_server, tiny_model_dir):
    """The wrong served model name fails before any task; the corrected rerun was refused for "results made with other
    settings" in a folder holding only the failed run's card and fingerprint."""
    server = scripted_server()
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text(server.url + "\n")
    out = tmp_path / "eval"
    args = [sys.executable, "-m", "eval.evaluate", "--task_family", "virtualhome", "--split", "seen", "--limit", "1",
            "--max_steps", "2", "--backend", "openai", "--endpoints", str(endpoints), "--tokenizer",
            str(tiny_model_dir), "--out", str(out)]
    wrong = subprocess.run(args + ["--model", "wrong"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "serves ['fake'], not 'wrong'" in wrong.stderr.splitlines()[-1]
    assert (out / "config.json").is_file()  # the card of what failed
    right = subprocess.run(args + ["--model", "fake"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert right.returncode == 0, right.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["num_tasks"] == 1
    assert json.loads((out / "config.json").read_text())["args"]["model"] == "fake"
    assert not out.with_name("eval.old").exists()


def test_two_trainings_under_one_parent_keep_their_run_cards_and_event_files_apart(tmp_path, tiny_model_dir):
    """OUT=.../model and OUT=.../model2 once wrote one run card and one tensorboard/ folder in their common parent."""
    pytest.importorskip("tensorboard")
    from tests.test_reinforced_train import ROWS, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    env = script_env(MODEL=str(tiny_model_dir), TRAIN_SET=str(data), RFT_BATCH="2", RFT_MICRO_BATCH="2", GRAD_CKPT="0",
                     PRECISION="fp32", REPORT_TO="tensorboard", RUN_DIR=str(tmp_path / "run"))
    for name, lr in (("model", "1e-3"), ("model2", "2e-3")):
        done = subprocess.run(["bash", "Reinforced_train/steca_train.sh", "--max_steps", "1", "--save_strategy", "no"],
                              cwd=REPO, env={**env, "OUT": str(tmp_path / "steca" / name), "RFT_LR": lr},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for name, lr in (("model", 1e-3), ("model2", 2e-3)):
        out = tmp_path / "steca" / name
        card = json.loads((out / "run_card.json").read_text())["args"]
        assert card["output_dir"] == str(out) and card["learning_rate"] == lr
        assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 1
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # the model's own config
    assert sorted(p.name for p in (tmp_path / "steca").iterdir()) == ["model", "model2"]  # nothing shared beside them


def test_missing_or_truncated_weights_are_one_line_before_anything_loads(tmp_path, tiny_model_dir, vh_expert):
    """A model folder without its weights, or with them cut short, was a 38-line transformers traceback ("no file
    named model.safetensors", "SafetensorError: incomplete metadata"), where a missing folder already got one line."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    evaluation = run_script("eval/evaluate.sh", script_env(TASK_FAMILY="virtualhome", SPLIT="seen", EVAL_LIMIT="1",
                                                           MODEL=str(model), OUT=str(tmp_path / "eval")))
    assert evaluation.returncode == 2 and evaluation.stderr.strip().splitlines() == [
        f"error: model folder {model} has no weights (model.safetensors, pytorch_model.bin or their shards): pass a "
        "complete model folder, or save the model into it"], evaluation.stderr[-3000:]
    weights.write_bytes(data[: len(data) - 1000])
    sft = run_script("sft/sft.sh", script_env(TASK_FAMILY="virtualhome", BASE_MODEL=str(model),
                                              EXPERT_DATA=str(vh_expert), OUT=str(tmp_path / "sft" / "model")))
    assert sft.returncode == 2 and sft.stderr.strip().splitlines() == [
        f"error: {weights}: truncated: {len(data) - 1000} bytes, the header gives {len(data)}; copy or save the model "
        "again"], sft.stderr[-3000:]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "sft").exists()


def test_weights_changed_in_place_and_changed_inputs_are_named_as_such(tmp_path, tiny_model_dir, vh_expert):
    """Weights changed in place with the same size and modification time were reused silently; a changed input file
    was reported as a change of its path."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    args = ["--task_family", "virtualhome", "--split", "seen", "--limit", "1", "--max_steps", "2", "--max_new_tokens",
            "4", "--model", str(model), "--out", str(tmp_path / "eval")]
    evaluate(args)
    change_weights_in_place(model)
    with pytest.raises(FingerprintMismatch, match=rf"\(model: weights changed \({model}\)\)"):
        evaluate(args)
    first, second, third = (tmp_path / name / "expert.jsonl" for name in ("vh", "vhx", "vhy"))
    for path in (first, second, third):
        path.parent.mkdir()
        shutil.copy(vh_expert, path)
    second.write_text(second.read_text().replace("First, I", "First I", 1))
    steps = ["--task_family", "virtualhome", "--kind", "expert", "--run_dir", str(tmp_path / "run"), "--limit", "1"]
    generate_steps(steps + ["--expert_data", str(first)])
    with pytest.raises(FingerprintMismatch, match=rf"\(expert_data: content changed \({first} -> {second}\)\)"):
        generate_steps(steps + ["--expert_data", str(second)])
    assert generate_steps(steps + ["--expert_data", str(third)])["expert"]["written"] == 0  # the same data elsewhere


def test_an_expert_evaluation_is_never_reported_as_a_model(tmp_path):
    """POLICY=expert LABEL=sft was accepted, and the report printed the expert's 100.0 as "SFT (ours)"."""
    env = script_env(TASK_FAMILY="virtualhome", RUN_DIR=str(tmp_path), SPLIT="seen", EVAL_LIMIT="1", POLICY="expert")
    refused = run_script("eval/evaluate.sh", {**env, "LABEL": "sft"})
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: --label sft names the run's sft model, but --policy expert plays the built-in expert: leave LABEL "
        "unset (its results go under expert/) or evaluate the model"], refused.stderr[-2000:]
    assert not RunDir(tmp_path).evaluation("sft", "seen").exists()
    assert run_script("eval/evaluate.sh", env).returncode == 0
    shutil.copytree(RunDir(tmp_path).evaluation("expert", "seen"), RunDir(tmp_path).evaluation("sft", "seen"))
    summary = RunDir(tmp_path).eval_summary("sft", "seen")  # as an older version, or a hand, put it there
    shown = subprocess.run([sys.executable, "-m", "eval.report", "--run", f"virtualhome={tmp_path}", "--out",
                            str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 2 and shown.stderr.strip().splitlines()[-1] == (
        f"error: {summary}: labelled sft (SFT), but made by the expert policy: label it expert (--summary expert=...), "
        "or evaluate the model (POLICY=model)")
    assert not (tmp_path / "report").exists()


def test_the_report_warns_when_a_summarys_model_changed_since(tmp_path, tiny_model_dir):
    """eval.report showed the summaries of a model that had changed since, without a word."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "sft_model")
    evaluate(["--task_family", "virtualhome", "--split", "seen", "--limit", "1", "--max_steps", "2", "--max_new_tokens",
              "4", "--label", "sft", "--model", str(model), "--run_dir", str(tmp_path / "run")])
    args = ["--run", f"virtualhome={tmp_path / 'run'}", "--out", str(tmp_path / "report")]
    assert report(args)["cells"][0]["model_changed"] is None
    change_weights_in_place(model)
    cell = report(args)["cells"][0]
    assert cell["model_changed"] == f"weights changed ({model})"
    shown = (tmp_path / "report" / "report.md").read_text()
    assert (f"Warning: 1 summaries were made with a model that changed since (evaluate it again to report it as it is "
            f"now):\n\n- {cell['summary']}: weights changed ({model})") in shown


def test_an_expert_import_that_matches_fewer_tasks_than_asked_fails_at_import(tmp_path, vh_expert):
    """An EXPERT_SOURCE whose trajectories play no task of the split was accepted ("8 trajectories") and failed only
    at sampling."""
    rows = [json.loads(line) for line in vh_expert.read_text().splitlines()]
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("".join(json.dumps({**r, "key": f"elsewhere/{r['key']}"}) + "\n" for r in rows[:1]) +
                       "".join(json.dumps(r) + "\n" for r in rows))
    env = script_env(TASK_FAMILY="virtualhome", RUN_DIR=str(tmp_path / "run"), EXPERT_SOURCE=str(foreign))
    refused = run_script("sft/make_expert_data.sh", env)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: {foreign}: 2 of the 3 expert trajectories asked for match a task of virtualhome/train (e.g. "
        f"'elsewhere/{rows[0]['key']}' plays 'elsewhere/{rows[0]['key']}', which is none of the "), refused.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written
    assert run_script("sft/make_expert_data.sh", {**env, "EXPERT_SOURCE": str(vh_expert)}).returncode == 0


def test_credentials_in_a_base_url_reach_no_log_line_error_or_file(tmp_path, scripted_server, tiny_model_dir):
    """http://user:secret@host/v1 appeared in httpx's INFO line and in our own error line."""
    server = scripted_server()
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text(server.url.replace("http://", "http://user:secret@") + "\n")
    args = [sys.executable, "-m", "eval.evaluate", "--task_family", "virtualhome", "--split", "seen", "--limit", "1",
            "--max_steps", "2", "--backend", "openai", "--endpoints", str(endpoints), "--tokenizer",
            str(tiny_model_dir), "--out", str(tmp_path / "eval")]
    served = subprocess.run(args + ["--model", "fake"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0 and "httpx: HTTP Request: POST http://***@127.0.0.1" in served.stderr, served.stderr
    refused = subprocess.run(args + ["--model", "wrong", "--out", str(tmp_path / "wrong")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "http://***@127.0.0.1" in refused.stderr.splitlines()[-1]
    endpoints.write_text("http://user:secret@127.0.0.1:9/v1?api_key=secret\n")  # nothing listens there
    down = subprocess.run(args + ["--model", "fake", "--out", str(tmp_path / "down")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert down.returncode == 2 and "http://***@127.0.0.1:9/v1?api_key=***" in down.stderr.splitlines()[-1]
    for output in (served, refused, down):
        assert "secret" not in output.stdout + output.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p != endpoints and b"secret" in p.read_bytes()]


def test_a_hung_server_stops_an_evaluation_in_its_dead_budget_not_after_every_retry(tmp_path, scripted_server,
                                                                                     tiny_model_dir):
    """With the default 600 s per request a hung server held an evaluation for ~70 minutes (7 attempts and their
    backoff; 64 s with STECA_HTTP_TIMEOUT=3). Now a request waits as long as its length asks (tested in
    test_http_client.py) and an endpoint silent for STECA_HTTP_DEAD_AFTER (default 300 s) is dead: here, scaled
    down, 1 s per request and 3 s in all."""
    server = scripted_server()
    server.control(hang=600)
    endpoints = tmp_path / "endpoints.txt"
    endpoints.write_text(server.url + "\n")
    hung = subprocess.run(
        [sys.executable, "-m", "eval.evaluate", "--task_family", "virtualhome", "--split", "seen", "--limit", "1",
         "--backend", "openai", "--endpoints", str(endpoints), "--model", "fake", "--tokenizer", str(tiny_model_dir),
         "--out", str(tmp_path / "eval")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=script_env(STECA_HTTP_TIMEOUT="1", STECA_HTTP_DEAD_AFTER="3"))
    last = hung.stderr.strip().splitlines()[-1]
    assert hung.returncode == 2 and last.startswith("error: ") and (
        f"every endpoint is dead ({server.url} answered nothing for 3 s, STECA_HTTP_DEAD_AFTER); last: endpoint "
        f"{server.url}: ") in last, hung.stderr[-2000:]
    assert server.posts() < 7  # the retry policy's 7 attempts were not waited out
