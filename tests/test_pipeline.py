"""The whole pipeline (scripts/run_pipeline.sh) end to end for both environments with the tiny model:
ALFWorld in-process (BACKEND=hf) killed in the middle of its Monte-Carlo stage, VirtualHome through real
server processes the pipeline starts and stops per stage (BACKEND=serve_hf) stopped by a signal in the
middle of its Monte-Carlo stage; both rerun, every stage's outputs checked, and no server outlives its stage.
Then VirtualHome again with another N, which reruns exactly the stages N affects, and two variants of the run
(VARIANT=wo_de,sft_dpo): each in a run directory of its own, the stages it shares never run again, the report with
every table."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from eval_agent.layout import RunDir, report_dir, run_dir_of
from eval_agent.records import judged, read_rollouts, read_step_records
from eval_agent.store import read_jsonl

REPO = Path(__file__).resolve().parent.parent
STAGES = ("expert_data", "sft", "steps", "mc", "data_collection", "steca", "eval")
N = 2
SMALL = {"PRESET": "tiny", "EXPERT_LIMIT": "2", "SFT_EPOCHS": "1", "SFT_BATCH": "2", "SAMPLE_LIMIT": "1", "N": str(N),
         "MAX_STEPS": "5", "MAX_NEW_TOKENS": "8", "RFT_BATCH": "2", "EVAL_LIMIT": "1", "CONCURRENCY": "4",
         "REFLECT_BACKEND": "self", "GRAD_CKPT": "0", "CALIBRATION_EVAL": "1",
         "CALIBRATION_LIMIT": "1"}


def pipeline(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", "scripts/run_pipeline.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


def kill_when(proc: subprocess.Popen, path: Path, sig: int, group: bool) -> None:
    """Signal the pipeline once the first Monte-Carlo rollout is written, i.e. in the middle of that stage."""
    deadline = time.monotonic() + 600
    while lines(path) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the pipeline ended before the rollouts began:\n{proc.stdout.read()[-3000:]}"
    (os.killpg if group else os.kill)(proc.pid, sig)


SERVER_LINE = re.compile(r"^== virtualhome(?:/[\w.]+)?: server for (\w+) (starting|stopped) \(pid (\d+)", re.M)


def check_servers_per_stage(out: str) -> list[int]:
    """Every server started is stopped before the next stage starts; none is up while a model trains."""
    up: dict[str, int] = {}
    for line in out.splitlines():
        m = SERVER_LINE.match(line)
        if m:
            label, what, pid = m[1], m[2], int(m[3])
            if what == "starting":
                assert not up, f"{label} started while {up} still up"
                up[label] = pid
            else:
                assert up.pop(label) == pid
        elif re.match(r"^== virtualhome(?:/[\w.]+)?: \w+ \(", line):  # a stage begins
            assert not up, f"{line!r} began while {up} was up"
    assert not up
    return [int(m[3]) for m in SERVER_LINE.finditer(out)]


def test_pipeline_both_envs_killed_and_resumed(tmp_path, tiny_model_dir):
    root = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "REFLECT_API_KEY")}
    env.update(SMALL, RUN_ROOT=str(root), BASE_MODEL=str(tiny_model_dir), OMP_NUM_THREADS="1")
    alf = dict(env, TASK_FAMILY="alfworld")
    port = free_port()
    vh = dict(env, TASK_FAMILY="virtualhome", BACKEND="serve_hf", SERVE_PORT=str(port), SERVE_TIMEOUT="300",
              CALIBRATION_EVAL="0")  # two server starts saved: ALFWorld runs the calibration evaluation

    # 1. ALFWorld in-process: kill the whole process group once its rollouts have started to come in
    first = pipeline(alf)
    kill_when(first, run_dir_of(root, "alfworld").rollouts("expert"), signal.SIGKILL, group=True)
    first.wait()
    assert not run_dir_of(root, "alfworld").marker("mc").exists()
    # the rerun skips the completed stages and finishes everything
    second = pipeline(alf)
    out, _ = second.communicate(timeout=1200)
    assert second.returncode == 0, out[-4000:]
    for stage in ("expert_data", "sft", "steps"):
        assert f"alfworld: {stage}: done, skipped" in out
    assert "server for" not in out  # BACKEND=hf starts none
    alf_run = run_dir_of(root, "alfworld")
    assert alf_run.marker("calibration").is_file()  # Figure 4: SFT and STeCa from deviated and clean histories
    for label in ("sft", "steca"):
        for split in ("seen", "unseen"):
            s = json.loads((alf_run.calibration(label, split) / "summary.json").read_text())
            assert s["histories"] <= 1 and s["scored"] <= s["histories"]  # CALIBRATION_LIMIT=1

    # 2. VirtualHome through serve_hf processes: SIGTERM to the pipeline alone in the MC stage stops the
    # stage and its server (the trap), nothing of it left running
    vh_run = run_dir_of(root, "virtualhome")
    third = pipeline(vh)
    kill_when(third, vh_run.rollouts("expert"), signal.SIGTERM, group=False)
    killed_out, _ = third.communicate(timeout=300)
    assert third.returncode == 143, killed_out[-3000:]
    assert "server for sft stopped" in killed_out
    for pid in check_servers_per_stage(killed_out):
        assert not alive(pid)
    assert not answers(port) and not vh_run.marker("mc").exists()
    written = lines(vh_run.rollouts("expert"))
    time.sleep(1)
    assert lines(vh_run.rollouts("expert")) == written  # the stage itself stopped too
    fourth = pipeline(vh)
    out, _ = fourth.communicate(timeout=1200)
    assert fourth.returncode == 0, out[-4000:]
    assert "virtualhome: steps: done, skipped" in out
    times = out[out.index("## Stage times"):]  # the table the pipeline ends with: every stage timed
    assert all(re.search(rf"\| {stage} \| \d+ s \|", times) for stage in STAGES), times
    labels = [m[1] for m in SERVER_LINE.finditer(out) if m[2] == "starting"]
    assert labels == ["sft", "sft", "base", "sft", "steca"]  # mc, data collection (self reflection), eval x3
    for pid in check_servers_per_stage(out):
        assert not alive(pid)
    assert not answers(port)

    for family in ("alfworld", "virtualhome"):
        run = run_dir_of(root, family)
        assert all(run.marker(s).is_file() for s in STAGES), family
        assert lines(run.expert_data()) == 2
        assert json.loads((run.sft_model / "train_summary.json").read_text())["rows_out"] == 2
        rolled = {}
        for kind in ("expert", "explore"):
            records = read_step_records(run.steps(kind))
            assert records and len({r.task_key for r in records}) == 1  # SAMPLE_LIMIT=1
            records = [r for r in records if judged(kind, r.t)]  # MC rolls out the ones data collection reads
            path = run.rollouts(kind)
            rolled[kind] = N * len(records)
            assert len(keys(path)) == len(set(keys(path))) == rolled[kind] > 0, (family, kind)
            assert {r.record_key for r in read_rollouts(path)} == {r.key for r in records}
        summary = json.loads(run.collection_summary.read_text())
        train = list(read_jsonl(run.train_set))
        assert train and all(r["chosen"][0]["from"] == "gpt" and r["reward"] > 0 for r in train)
        published = json.loads((run.data_collection / "final_data_rft_train.json").read_text())
        assert len(published) == len(train) and set(published[0]) >= {"id", "prompt", "chosen", "rejected", "reward"}
        assert summary["train"]["rows"] == len(train) == sum(v["kept"] for v in summary["sets"].values())
        assert summary["inputs"]["rollouts"] == rolled
        assert (run.steca_model / "steca_chat_format.json").is_file()
        assert json.loads((run.sft_model / "run_card.json").read_text())["stage"] == "sft"  # run cards in the models
        assert json.loads((run.steca_model / "run_card.json").read_text())["stage"] == "reinforced_train"
        for label in ("base", "sft", "steca"):
            for split in ("seen", "unseen"):
                s = json.loads(run.eval_summary(label, split).read_text())
                assert (s["env"], s["num_tasks"]) == (family, 1) and 0.0 <= s["success_rate"] <= 1.0
                assert s["manifest"]["num_tasks"] == 1  # the task list it ran (eval/manifest.py)
    table = (report_dir(root) / "report.md").read_text()  # the last run's: VirtualHome
    assert all(f"{name} (ours)" in table for name in ("Base model", "SFT", "STeCa"))
    # what the tiny run opted into, after the row name (eval_agent/opt_ins.py): no key, the generated data
    assert "| Base model (ours) |" in table and "| SFT (ours) [generated data] |" in table
    assert "| STeCa (ours) [generated data, self-reflection] |" in table
    assert json.loads((run.data_collection / "config.json").read_text())["opt_ins"].keys() == {"generated data",
                                                                                               "self-reflection"}
    assert (report_dir(root) / "report.png").read_bytes()[:4] == b"\x89PNG"

    # 3. another N: expert data, SFT and step records are kept; MC and data collection rerun, their old results
    # moved aside; reinforced training and its evaluations rerun exactly when the training set came out otherwise
    # (inputs are known by content); the base and SFT evaluations are the same runs and are skipped
    # 4. ... in the same invocation, two variants (eval_agent/variants.py), after the main run: wo_de (data collection
    # without D_e) and sft_dpo (reinforced training with the DPO term), on the main run's new rollouts
    records = sum(judged("expert", r.t) for r in read_step_records(vh_run.steps("expert")))
    shared_markers = {s: vh_run.marker(s).stat().st_mtime_ns for s in ("expert_data", "sft", "steps")}
    fifth = pipeline(dict(vh, N=str(N + 1), VARIANT="wo_de,sft_dpo"))
    out, _ = fifth.communicate(timeout=1200)
    assert fifth.returncode == 0, out[-4000:]
    train_changed = vh_run.train_set.read_text() != (vh_run.root / "data_collection.old" / "train.jsonl").read_text()
    rerun = ("mc", "data_collection") + (("steca", "eval") if train_changed else ())
    for stage in STAGES:
        assert (f"virtualhome: {stage}: done, skipped" in out) == (stage not in rerun), stage
        assert (f"== {stage}: changed since it completed" in out) == (stage in rerun), stage
    assert "rollouts_expert.jsonl: n: 2 -> 3" in out
    for pid in check_servers_per_stage(out):
        assert not alive(pid)
    assert len(keys(vh_run.rollouts("expert"))) == (N + 1) * records
    assert len(keys(vh_run.rollouts("expert").with_name("rollouts_expert.jsonl.old"))) == N * records
    assert json.loads(vh_run.collection_summary.read_text())["inputs"]["rollouts"]["expert"] == (N + 1) * records
    assert vh_run.steca_model.with_name("model.old").is_dir() == train_changed
    assert vh_run.evaluation("steca", "seen").with_name("seen.old").is_dir() == train_changed
    assert not vh_run.evaluation("sft", "seen").with_name("seen.old").exists()

    variants = {name: RunDir(vh_run.variant(name)) for name in ("wo_de", "sft_dpo")}
    assert {s: vh_run.marker(s).stat().st_mtime_ns for s in shared_markers} == shared_markers
    for name, own in (("wo_de", ("data_collection", "steca", "eval")), ("sft_dpo", ("steca", "eval"))):
        run = variants[name]
        assert sorted(p.stem for p in run.pipeline.glob("*.done")) == sorted(own), name  # its own stages only
        for stage in STAGES:
            assert (f"virtualhome/{name}: {stage}: shared with the main run" in out) == (stage not in own), (name, stage)
            assert (f"virtualhome/{name}: {stage} (" in out) == (stage in own), (name, stage)
            assert run.marker(stage).parent == (run.pipeline if stage in own else vh_run.pipeline)
        assert run.marker("steca").stat().st_mtime_ns > vh_run.marker("eval").stat().st_mtime_ns  # after the main run
        for split in ("seen", "unseen"):  # its STeCa evaluated in its own folder; SFT's is the main run's
            assert json.loads(run.eval_summary("steca", split).read_text())["num_tasks"] == 1
            assert run.eval_summary("steca", split).is_relative_to(run.root)
            assert run.eval_summary("sft", split) == vh_run.eval_summary("sft", split)
    wo_de = variants["wo_de"]
    summary = json.loads(wo_de.collection_summary.read_text())
    assert summary["inputs"]["rollouts"]["expert"] == (N + 1) * records  # the main run's current rollouts
    assert "explored" not in summary["train"]["sets"]
    assert {r["set"] for r in read_jsonl(wo_de.train_set)} <= {"calibration", "expert_sub", "expert_full"}
    card = json.loads((variants["sft_dpo"].steca_model / "run_card.json").read_text())["args"]
    assert card["beta"] == 0.1 and card["data"] == str(vh_run.train_set)  # the main run's training set
    assert not vh_run.variant("sft_dpo").joinpath("data_collection").exists()

    report = (report_dir(root) / "report.md").read_text()
    for title in ("Table 2", "Table 3", "Table 6", "Table 7", "Table 9", "Figure 4"):
        assert f"## {title}" in report and f"paper {title}" in report, title
    tiny = "[generated data, self-reflection]"  # what the tiny run opted into (eval_agent/opt_ins.py)
    for row in (f"STeCa w/ SFT+DPO (ours) {tiny}", f"STeCa w/o D_e (ours) {tiny}", "STeCa w/o exploration loss"):
        assert f"| {row} |" in report, row
    assert (report_dir(root) / "tables.png").read_bytes()[:4] == b"\x89PNG"


def test_launched_commands_run_side_by_side_and_the_first_failure_counts(tmp_path):
    """scripts/serve_lib.sh's launch / wait_launched (the evaluation's episodes beside its step accuracy): the first
    command can only end once the second has run (a FIFO between them), the status is the first failure's, and
    fingerprinting runs them one after the other, in order."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    both = ("set -euo pipefail; source scripts/serve_lib.sh; "
            f"launch bash -c 'read line < {fifo}; echo \"first read $line\"; exit 3'; "
            f"launch bash -c 'echo second > {fifo}'; rc=0; wait_launched || rc=$?; echo \"rc=$rc\"")
    out = subprocess.run(["timeout", "60", "bash", "-c", both], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.splitlines() == ["first read second", "rc=3"], out
    ordered = "source scripts/serve_lib.sh; launch echo one; launch echo two; wait_launched"
    out = subprocess.run(["bash", "-c", ordered], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, STECA_FINGERPRINT="1"))
    assert out.returncode == 0 and out.stdout == "one\ntwo\n", out
