"""The paired comparison (eval.compare): every model of a run, and each variant's STeCa model, scored on the same
items, the paired cells counted item by item and the differences' intervals Newcombe's paired ones."""
import json
from pathlib import Path

import pytest

from eval.compare import compare, main as compare_main, reading, to_markdown
from eval_agent.layout import RunDir
from eval_agent.stats import paired_difference_interval
from eval_agent.variants import VARIANTS, init as init_variant


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def outcomes(run: RunDir, label: str, split: str, calibration: list, steps: list, tasks: list) -> None:
    """Records as the stages write them: 1 / 0 an outcome, None a skipped record."""
    write_jsonl(run.calibration(label, split, "next_action") / "episodes.jsonl",
                [{"key": f"h{i}", "skip": None if v is not None else "replay_differs", "returns": bool(v)}
                 for i, v in enumerate(calibration)])
    write_jsonl(run.step_accuracy(label, split) / "steps.jsonl",
                [{"key": f"task{i // 2}|t{i % 2}", "skip": None if v is not None else "env_error", "match": bool(v),
                  "valid": v is not None} for i, v in enumerate(steps)])
    folder = run.evaluation(label, split) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(tasks):
        (folder / f"task{i}.json").write_text(json.dumps({"success": bool(v), "steps": []}))


def test_models_scored_on_shared_items_with_paired_differences(tmp_path):
    run = RunDir(tmp_path / "virtualhome")
    sft_cal = [1, 0, 0, 1, 0, 0, None, 0]
    steca_cal = [1, 1, 1, 1, 0, 1, 1, 0]
    outcomes(run, "base", "seen", [0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0], [0, 0])
    outcomes(run, "sft", "seen", sft_cal, [1, 0, 1, 0], [0, 1])
    outcomes(run, "steca", "seen", steca_cal, [1, 1, 1, None], [1, 1])
    outcomes(run, "sft", "unseen", [1, 0], [0, 0], [0])
    outcomes(run, "steca", "unseen", [1, 1], [1, 0], [0])  # base has no unseen records: the items others share
    variant = init_variant(str(run.root), VARIANTS["wo_dc"])
    outcomes(variant, "steca", "seen", [1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0], [0, 0])

    c = compare("virtualhome", run.root)
    assert c.models == ["Base", "SFT", "STeCa", "STeCa w/o D_c"]
    # calibration: base and the variant have no unseen histories, sft skipped h6: 7 items left, all seen
    assert c.shares["calibration"] == {"Base": (0, 7), "SFT": (2, 7), "STeCa": (5, 7), "STeCa w/o D_c": (1, 7)}
    assert c.per_split["unseen"]["calibration"]["SFT"] == (0, 0)
    assert c.shares["step_accuracy"] == {"Base": (1, 3), "SFT": (2, 3), "STeCa": (3, 3), "STeCa w/o D_c": (2, 3)}
    assert c.shares["valid"]["STeCa"] == (3, 3)
    assert c.shares["success"] == {"Base": (0, 2), "SFT": (1, 2), "STeCa": (2, 2), "STeCa w/o D_c": (0, 2)}

    by = {(d.metric, d.first, d.second): d for d in c.differences}
    assert set(by) == {(m, a, b) for m in ("calibration", "step_accuracy", "valid", "success")
                       for a, b in (("SFT", "Base"), ("STeCa", "SFT"), ("STeCa", "STeCa w/o D_c"))}
    # STeCa vs SFT on the 7 shared histories h0-h5, h7: both h0 h3, STeCa only h1 h2 h5, SFT only none, neither h4 h7
    d = by["calibration", "STeCa", "SFT"]
    assert d.cells == (2, 3, 0, 2) and d.difference == pytest.approx(3 / 7)
    assert d.ci == paired_difference_interval(2, 3, 0, 2) and d.excludes_zero == (d.ci[0] > 0)
    assert by["calibration", "STeCa", "STeCa w/o D_c"].cells == (1, 4, 0, 2)

    text = to_markdown([c])
    assert "| STeCa w/o D_c | 1/7 = 0.14" in text and "| STeCa − STeCa w/o D_c |" in text
    sentences = reading([c])
    assert len(sentences) == 3 and sentences[1].startswith("virtualhome, STeCa − SFT on the same items: ")

    result = compare_main(["--run", f"virtualhome={run.root}", "--out", str(tmp_path / "report")])
    assert result[0]["shares"]["calibration"]["STeCa"] == (5, 7)
    assert json.loads((tmp_path / "report" / "compare.json").read_text())[0]["models"] == c.models
    assert (tmp_path / "report" / "compare.md").read_text().startswith("### Paired comparison, virtualhome")


def test_a_run_without_records_gives_no_comparison_and_a_bad_result_is_named(tmp_path, capsys):
    run = RunDir(tmp_path / "alfworld")
    assert compare_main(["--run", str(run.root), "--out", str(tmp_path / "out")]) == []
    bad = run.evaluation("sft", "seen") / "tasks" / "task0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        compare_main(["--run", str(run.root), "--out", str(tmp_path / "out")])
    assert str(bad) in str(e.value)


def test_small_preset_compares_four_models_on_the_same_items(tmp_path, tiny_model_dir):
    """`PRESET=small VARIANT=wo_dc` at a few items: base, SFT, STeCa and STeCa w/o D_c from one SFT model, step
    records and rollouts; the next-action probe on held-out histories for each; the report's paired comparison."""
    import os
    import subprocess

    from eval_agent.layout import report_dir, run_dir_of
    from eval_agent.store import read_jsonl

    repo = Path(__file__).resolve().parent.parent
    root = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "REFLECT_API_KEY")}
    env.update(PRESET="small", VARIANT="wo_dc", TASK_FAMILY="virtualhome", RUN_ROOT=str(root),
               BASE_MODEL=str(tiny_model_dir), OMP_NUM_THREADS="1", EXPERT_LIMIT="2", SFT_BATCH="2",
               SAMPLE_LIMIT="1", MAX_STEPS="5", MAX_NEW_TOKENS="8", RFT_BATCH="2", EVAL_LIMIT="2",
               EVAL_MAX_STEPS="3", CONCURRENCY="8")
    done = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run = run_dir_of(root, "virtualhome")
    variant = RunDir(run.variant("wo_dc"))
    assert "calibration" not in {r["set"] for r in read_jsonl(variant.train_set)}  # w/o D_c
    assert variant.sft_model == run.sft_model and variant.rollouts("expert") == run.rollouts("expert")
    for rd, labels in ((run, ("base", "sft", "steca")), (variant, ("steca",))):
        for label in labels:
            for split in ("seen", "unseen"):  # the small preset's probe and held-out histories, for every model
                s = json.loads((rd.calibration(label, split, "next_action") / "summary.json").read_text())
                assert (s["probe"], s["histories_from"]) == ("next_action", "step_accuracy")
                assert s["sources"]["step_records"] == str(run.step_accuracy("sft", split) / "steps.jsonl")
    report = json.loads((report_dir(root) / "report.json").read_text())
    (comparison,) = report["comparison"]
    assert comparison["models"] == ["Base", "SFT", "STeCa", "STeCa w/o D_c"]
    for metric in ("step_accuracy", "valid", "success"):
        ns = {n for _, n in comparison["shares"][metric].values()}
        assert len(ns) == 1 and ns.pop() > 0, metric  # every model on the same items
    pairs = {(d["first"], d["second"]) for d in comparison["differences"]}
    assert pairs == {("SFT", "Base"), ("STeCa", "SFT"), ("STeCa", "STeCa w/o D_c")}
    text = (report_dir(root) / "report.md").read_text()
    assert "### Paired comparison, virtualhome" in text and "| STeCa − STeCa w/o D_c |" in text
    assert "Paired comparison, item by item on the same items" in text  # the reading says it
