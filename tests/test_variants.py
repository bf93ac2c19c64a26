"""Variants of a run (eval_agent/variants.py): the registry, the layout of a variant's folder (shared stages
resolve to the main run), and what each named variant changes in the training set or the objective, on the
data-collection fixture records (exact toy embeddings) and a tiny reinforced training."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_collection.build import main as build
from eval_agent.layout import LABELS, STAGES, RunDir
from eval_agent.records import step_key
from eval_agent.variants import GROUPS, VARIANTS, init, resolve
from test_data_collection import N, explore_record, fixture_args, fixture_run, reply, rollouts_for, toy, write_jsonl

REPO = Path(__file__).resolve().parent.parent
OPT = re.compile(r'^(opt|flag) (--\w+) "\$([A-Z][A-Z0-9_]*)"')


def flags(script: str, env: dict[str, str]) -> list[str]:
    """The flags `script` passes for the variables in `env` (as its opt/flag lines map them); a variable the
    script does not read is an error: the variant would set it for nothing."""
    mapping = {m[3]: (m[1], m[2]) for line in (REPO / script).read_text().splitlines() if (m := OPT.match(line.strip()))}
    out = []
    for name, value in env.items():
        assert name in mapping, f"{script} does not read {name}"
        kind, flag = mapping[name]
        out += [flag, value] if kind == "opt" else [flag] if value == "1" else []
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the registry and the layout ----------------------------------------------------------------------

def test_registry_names_groups_and_stages():
    assert set(GROUPS["all"]) == set(VARIANTS)
    assert [v.name for v in resolve("table6,wo_de, delta_0.05")] == ["wo_dc", "wo_de", "wo_ds", "delta_0.05"]
    with pytest.raises(SystemExit, match="no variant named 'nope'"):
        resolve("wo_de,nope")
    for v in VARIANTS.values():
        assert v.shares == list(STAGES[: STAGES.index(v.diverges_at)])
    # what each one changes, and where it diverges: the training objective only, or data collection, or SFT
    expected = {
        "rft": ("data_collection", {"TRAIN_SETS": "explored", "KEEP_THRESHOLD": "inf", "WEIGHTS": "uniform"}),
        "wo_rt": ("steca", {"WEIGHTS": "uniform"}), "sft_dpo": ("steca", {"BETA": "0.1"}),
        "self_reflection": ("data_collection", {"REFLECT_BACKEND": "self"}),
        "llm_step_reward": ("data_collection", {"STEP_REWARD": "llm"}),
        "wo_dc": ("data_collection", {"TRAIN_SETS": "expert_sub,expert_full,explored"}),
        "wo_de": ("data_collection", {"TRAIN_SETS": "calibration,expert_sub,expert_full"}),
        "wo_ds": ("data_collection", {"TRAIN_SETS": "calibration,explored"}),
        "delta_m0.01": ("data_collection", {"DELTA": "-0.01"}), "delta_0.05": ("data_collection", {"DELTA": "0.05"}),
        "delta_0.1": ("data_collection", {"DELTA": "0.1"}),
    }
    for name, (stage, env) in expected.items():
        assert (VARIANTS[name].diverges_at, VARIANTS[name].env) == (stage, env), name
    for name in GROUPS["table2"]:  # another backbone: only the expert data is shared
        v = VARIANTS[name]
        assert v.diverges_at == "sft" and v.env["BASE_MODEL"] and v.env["CHAT_FORMAT"] == "template"
    # every variable a variant sets is read by the script of the stage it diverges at (or a later one)
    scripts = {"sft": "sft/sft.sh", "data_collection": "data_collection/build_dataset.sh",
               "steca": "Reinforced_train/steca_train.sh"}
    for v in VARIANTS.values():
        later = [s for s in STAGES[STAGES.index(v.diverges_at):] if s in scripts]
        for name in v.env:
            assert any(re.search(rf"^{name}=\$\{{{name}:-", (REPO / scripts[s]).read_text(), re.M) for s in later) \
                or name == "BASE_MODEL", (v.name, name)  # BASE_MODEL: sft.sh reads it (and the pipeline)


def test_cli_names_env_and_init(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "eval_agent.variants", *args], cwd=REPO, capture_output=True,
                              text=True)

    assert run("names", "demo").stdout.split() == GROUPS["demo"]
    assert run("env", "rft").stdout.splitlines() == ["TRAIN_SETS=explored", "KEEP_THRESHOLD=inf", "WEIGHTS=uniform"]
    bad = run("names", "table1,bogus")
    assert bad.returncode == 2 and bad.stderr.startswith("error: VARIANT: no variant named 'bogus'")
    folder = Path(run("init", "--run_dir", str(tmp_path / "alfworld"), "--name", "wo_de").stdout.strip())
    assert folder == tmp_path / "alfworld" / "variants" / "wo_de"
    spec = json.loads((folder / "variant.json").read_text())
    assert spec["base"] == "../.." and spec["shares"] == ["expert_data", "sft", "steps", "mc"]
    nested = run("init", "--run_dir", str(folder), "--name", "wo_dc")
    assert nested.returncode == 2 and "is itself a variant" in nested.stderr


def test_a_variants_shared_stages_are_the_main_runs(tmp_path):
    main = RunDir(tmp_path / "alfworld")
    v = init(str(main.root), VARIANTS["wo_de"])  # diverges at data collection
    assert v.base == main and v.root == main.variant("wo_de")
    for own, shared in ((v.expert_data(), main.expert_data()), (v.sft_model, main.sft_model),
                        (v.steps("explore"), main.steps("explore")), (v.rollouts("expert", 2, 1), main.rollouts("expert", 2, 1)),
                        (v.marker("mc"), main.marker("mc")), (v.evaluation("sft", "seen"), main.evaluation("sft", "seen")),
                        (v.evaluation("base", "unseen"), main.evaluation("base", "unseen"))):
        assert own == shared
    assert v.shared_with("mc") == main.root and v.shared_with("data_collection") is None
    for path in (v.data_collection, v.train_set, v.steca_model, v.evaluation("steca", "seen"),
                 v.step_accuracy("steca", "seen"), v.calibration("steca", "unseen"), v.marker("data_collection"),
                 v.marker("eval"), v.tracking, v.server_endpoints):
        assert v.root in path.parents, path
    assert v.eval_labels == ["steca"] and main.eval_labels == list(LABELS)
    backbone = init(str(main.root), VARIANTS["mistral_7b"])  # another base model: every model is its own
    assert backbone.eval_labels == list(LABELS) and backbone.expert_data() == main.expert_data()
    assert backbone.root in backbone.sft_model.parents and backbone.root in backbone.evaluation("base", "seen").parents
    assert RunDir(v.root).shares == frozenset(STAGES[:4])  # read back from variant.json
    (v.root / "variant.json").write_text('{"base": "../..", "shares": ["sampling"]}')
    with pytest.raises(SystemExit, match="names no stage: \\['sampling'\\]"):
        RunDir(v.root)
    layout = subprocess.run([sys.executable, "-m", "eval_agent.layout", "--run_dir", str(backbone.root), "eval_labels"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert layout.stdout.strip() == "base sft steca"


# ---- what each variant changes in the training set ------------------------------------------------------

def extended_fixture(run_dir: Path) -> dict:
    """fixture_run plus two explored records: C's greedy episode from t=0 wins with other actions than the
    expert's (a D_e row too far from the expert to be kept: nDTW >= 0.013), and C t=3 whose MC value equals the
    expert's at t=2 (0.6: deviated when delta >= 0 under <=, not at delta = -0.01)."""
    fx = fixture_run(run_dir)
    expert, kc = fx["expert"], fx["c"]
    extra = [(explore_record(kc, expert, 0, reply("go to drawer 1"), expert.steps[1:], True), 1.0),
             (explore_record(kc, expert, 3, reply("go to drawer 1"), [reply("go to sinkbasin 1")], False), 0.6)]
    run = RunDir(run_dir)
    write_jsonl(run.steps("explore"), read(run.steps("explore")) + [r.to_dict() for r, _ in extra])
    write_jsonl(run.rollouts("explore"), read(run.rollouts("explore")) +
                [ro.to_dict() for r, mc in extra for ro in rollouts_for(r, mc, N)])
    return fx


def build_variant(main: Path, name: str, tiny_model_dir: Path) -> tuple[RunDir, dict]:
    """Data collection of a variant in its own folder, with the flags build_dataset.sh passes for its variables."""
    run, env = RunDir(main), {}
    if name != "main":
        run = init(str(main), VARIANTS[name])
        env = {k: val for k, val in VARIANTS[name].env.items() if k != "WEIGHTS"}  # WEIGHTS: the training's
    argv = fixture_args(main, *flags("data_collection/build_dataset.sh", env)) + [
        "--reflect_backend", "self", "--model", str(tiny_model_dir), "--reflect_retries", "0",
        "--reflect_max_tokens", "2", "--reflection_fallback"]
    argv[argv.index("--run_dir") + 1] = str(run.root)
    return run, build(argv, embeddings=toy())


def by_set(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["set"], []).append(row)
    return out


def test_each_variant_changes_exactly_its_sets_and_deviations(tmp_path, tiny_model_dir):
    main_dir = tmp_path / "alfworld"
    fx = extended_fixture(main_dir)
    main, summary = build_variant(main_dir, "main", tiny_model_dir)
    train = by_set(read(main.train_set))
    assert {s: len(r) for s, r in train.items()} == {"calibration": 3, "expert_sub": 5, "expert_full": 1, "explored": 1}
    assert summary["reflections"]["calls"] == 3 and summary["train"]["sets"] == list(train)
    explored = read(main.data_collection / "explored.jsonl")
    assert [(r["task_key"], r["kept"]) for r in explored] == [(fx["a"], True), (fx["c"], False)]
    devs = {d["key"] for d in read(main.data_collection / "deviations.jsonl") if d["deviated"]}
    c3 = step_key(fx["c"], 3, "explore")
    assert c3 in devs

    drops = {"wo_dc": {"calibration"}, "wo_de": {"explored"}, "wo_ds": {"expert_sub", "expert_full"}}
    for name, dropped in drops.items():
        run, s = build_variant(main_dir, name, tiny_model_dir)
        got = by_set(read(run.train_set))
        assert set(got) == set(train) - dropped, name
        assert all(got[k] == train[k] for k in got), name  # the other sets' rows are the main run's, unchanged
        assert run.data_collection != main.data_collection and run.steps("explore") == main.steps("explore")
        # the main run's reflections come from its cache, copied into the variant: nothing asked again
        assert s["reflections"].get("calls", 0) == 0, name
        assert (s["reflections"]["requests"] == 0) == ("calibration" in dropped), name
    assert read(main.train_set) == [r for rows in train.values() for r in rows]  # the main run is untouched

    # RFT: every successful explored trajectory, the one too far from the expert's too; nothing else
    run, _ = build_variant(main_dir, "rft", tiny_model_dir)
    rft = read(run.train_set)
    assert [(r["set"], r["task_key"]) for r in rft] == [("explored", fx["a"]), ("explored", fx["c"])]

    # delta: the criterion is r(explored t) <= r(expert t-1) + delta, so a larger delta flags every step a
    # smaller one does; MC values of 5 rollouts lie on a 0.2 grid, so delta = 0.05 and 0.1 flag what delta = 0
    # flags, and delta = -0.01 is the strict < (C t=3, an explored step as good as the expert's before it, drops)
    deviated = {}
    for name in ("delta_m0.01", "delta_0.05", "delta_0.1"):
        run, _ = build_variant(main_dir, name, tiny_model_dir)
        deviated[name] = {d["key"] for d in read(run.data_collection / "deviations.jsonl") if d["deviated"]}
        assert json.loads(run.collection_summary.read_text())["deviation"]["config"]["delta"] == float(VARIANTS[name].env["DELTA"])
    assert deviated["delta_m0.01"] == devs - {c3} and deviated["delta_0.05"] == deviated["delta_0.1"] == devs


def test_uniform_weights_and_beta_change_only_the_objective(tmp_path, tiny_model_dir):
    """wo_rt: every row weighs 1; sft_dpo: the DPO term against the reference (its margin is logged)."""
    from Reinforced_train.train import main as train
    from test_reinforced_train import ROWS

    data = write_jsonl_rows(tmp_path / "train.jsonl", ROWS)
    assert sorted(r["reward"] for r in ROWS) == [0.5, 1.0]
    base = ["--model_name_or_path", str(tiny_model_dir), "--data", str(data), "--global_batch_size", "2",
            "--per_device_train_batch_size", "2", "--precision", "fp32", "--save_strategy", "no",
            "--logging_steps", "1", "--report_to", "none"]
    for name in ("wo_rt", "sft_dpo"):
        out = tmp_path / name / "model"
        summary = train(base + flags("Reinforced_train/steca_train.sh", VARIANTS[name].env) + ["--output_dir", str(out)])
        logged = [h for h in summary["log_history"] if "loss" in h]
        if name == "wo_rt":
            assert (summary["weights"], summary["weight_min"], summary["weight_max"], summary["beta"]) == ("uniform", 1.0, 1.0, 0)
            assert "margin" not in logged[0]
        else:
            assert (summary["weights"], summary["weight_min"], summary["beta"]) == ("reward", 0.5, 0.1)
            assert logged[0]["margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference


def write_jsonl_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
