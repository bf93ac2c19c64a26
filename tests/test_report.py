"""The results report: tables from real evaluation summaries (the expert on the generated ALFWorld games
and the VirtualHome tasks, so the summary format cannot drift from eval.evaluate), the paper's rows, bad input."""
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from eval.evaluate import main as evaluate
from eval.paper_results import COLUMNS, PAPER_ROWS
from eval.report import main as report
from eval_agent.layout import RunDir

REPO = Path(__file__).resolve().parent.parent
PAPER_MD = REPO.parent / "shared" / "reference" / "paper.md"


@pytest.fixture(scope="module")
def real_summaries(tmp_path_factory) -> dict[str, Path]:
    """One summary folder per environment, written by the evaluation stage itself (expert policy, one task)."""
    root = tmp_path_factory.mktemp("real")
    out = {}
    for env, split in (("alfworld", "seen"), ("virtualhome", "unseen")):
        out[env] = root / env
        evaluate(["--task", env, "--split", split, "--policy", "expert", "--limit", "1", "--out", str(out[env])])
    return out


def place(src: Path, dst: Path, split: str, reward: float, success: float | None = None, model: str | None = None,
          **fields) -> Path:
    """A copy of a real summary folder (summary.json + config.json) with other numbers, split and model."""
    dst.mkdir(parents=True)
    summary = json.loads((src / "summary.json").read_text())
    summary.update(split=split, avg_reward=reward, success_rate=reward if success is None else success, **fields)
    (dst / "summary.json").write_text(json.dumps(summary))
    card = json.loads((src / "config.json").read_text())
    if model:
        card["args"].update(policy="model", model=model)
    (dst / "config.json").write_text(json.dumps(card))
    return dst / "summary.json"


def table_row(markdown: str, method: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == method:
            return cells
    raise AssertionError(f"no row {method!r} in\n{markdown}")


@pytest.fixture()
def two_runs(tmp_path, real_summaries) -> tuple[Path, Path]:
    """outputs/alfworld and outputs/virtualhome as the pipeline lays them out: eval/<label>/<split>/."""
    alf, vh = tmp_path / "alfworld", tmp_path / "virtualhome"
    base = "models/SmolLM2-135M-Instruct"
    place(real_summaries["alfworld"], RunDir(alf).evaluation("base", "seen"), "seen", 1.0, model=base)
    place(real_summaries["alfworld"], RunDir(alf).evaluation("base", "unseen"), "unseen", 0.25, model=base)
    place(real_summaries["alfworld"], RunDir(alf).evaluation("sft", "seen"), "seen", 0.5, model="outputs/alfworld/sft/model")
    place(real_summaries["alfworld"], RunDir(alf).evaluation("steca", "seen"), "seen", 0.75, model="x/steca/model")
    place(real_summaries["alfworld"], RunDir(alf).evaluation("steca", "unseen"), "unseen", 0.625, model="x/steca/model")
    place(real_summaries["virtualhome"], RunDir(vh).evaluation("base", "seen"), "seen", 0.1, model=base)
    place(real_summaries["virtualhome"], RunDir(vh).evaluation("steca", "seen"), "seen", 0.5, model="y/steca/model")
    real = shutil.copytree(real_summaries["virtualhome"], RunDir(vh).evaluation("steca", "unseen"))  # 100, its tasks
    card = json.loads((real / "config.json").read_text())
    card["args"].update(policy="model", model="y/steca/model")  # as a model's evaluation records itself
    (real / "config.json").write_text(json.dumps(card))
    return alf, vh


def test_tables_chart_and_sources(tmp_path, two_runs):
    alf, vh = two_runs
    out = tmp_path / "report"
    rep = report(["--run", f"alfworld={alf}", "--run", f"virtualhome={vh}", "--out", str(out)])
    md = (out / "report.md").read_text()
    assert "Average final reward ×100" in md
    # Method, Backbone, VH seen, VH unseen, ALF seen, ALF unseen, Average, Source
    assert table_row(md, "STeCa (ours)") == [  # Average: (50 + 100 + 75 + 62.5) / 4 = 71.875
        "STeCa (ours)", "SmolLM2-135M-Instruct", "50.0", "100.0", "75.0", "62.5", "71.9", "ours"]
    assert table_row(md, "Base model (ours)")[2:7] == ["10.0", "–", "100.0", "25.0", "–"]
    assert table_row(md, "SFT (ours)")[2:7] == ["–", "–", "50.0", "–", "–"]
    assert table_row(md, "IPR") == ["IPR", "Llama-2-7B-Chat", "67.6", "61.9", "70.3", "74.7", "68.6", "paper Table 1"]
    assert table_row(md, "SFT")[2:] == ["–", "–", "–", "–", "63.3", "paper Table 1"]  # only the Average is printed
    assert table_row(md, "STeCa, reflection by the agent itself")[6] == "68.0 †"  # (66.0+61.1+71.4+73.3)/4 = 67.95
    assert md.index("STeCa (ours)") < md.index("| IPR |")  # ours first

    tex = (out / "report.tex").read_text()
    assert r"STeCa (ours) & SmolLM2-135M-Instruct & 50.0 & 100.0 & 75.0 & 62.5 & 71.9 \\" in tex
    assert r"SFT (ours) & SmolLM2-135M-Instruct & -- & -- & 50.0 & -- & -- \\" in tex
    assert r"\begin{tabular}" in tex and tex.count(r"\\") > len(PAPER_ROWS) and "–" not in tex

    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.size[0] > 600 and img.size[1] > 300

    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(rep)) and saved["metric"] == "avg_reward" and not saved["skipped"]
    cells = {(c["label"], c["env"], c["split"]): c for c in saved["cells"]}
    assert len(cells) == 8
    real = cells[("base", "alfworld", "seen")]
    assert real["summary"] == str(RunDir(alf).eval_summary("base", "seen"))
    assert real["config"].endswith("config.json") and real["policy"] == "model" and real["model"].endswith("Instruct")
    assert real["num_tasks"] == 1 and real["value"] == 100.0 and real["model_changed"] is None
    assert cells[("sft", "alfworld", "seen")]["model"] == "outputs/alfworld/sft/model"
    steca = next(r for r in saved["rows"] if r["method"] == "STeCa (ours)")
    assert steca["cells"] == [50.0, 100.0, 75.0, 62.5] and steca["average"] == pytest.approx(71.875)


def test_summary_flag_metric_and_no_paper_rows(tmp_path, real_summaries):
    folder = tmp_path / "anywhere"
    place(real_summaries["virtualhome"], folder, "unseen", 0.5, success=0.25, model="m/tiny")
    out = tmp_path / "report"
    report(["--summary", f"mine={folder}", "--metric", "success_rate", "--paper_tables", "--backbone", "Tiny",
            "--out", str(out)])
    md = (out / "report.md").read_text()
    assert md.startswith("# ") and "Success rate ×100" in md
    assert table_row(md, "mine (ours)") == ["mine (ours)", "Tiny", "–", "25.0", "–", "–", "–", "ours"]
    assert "paper Table" not in md and "†" not in md
    report(["--summary", f"expert={real_summaries['alfworld'] / 'summary.json'}", "--paper_tables", "1",
            "--out", str(out)])
    md = (out / "report.md").read_text()
    assert table_row(md, "expert (ours)")[1:6] == ["expert policy", "–", "–", "100.0", "–"]
    assert "paper Table 1" in md and "paper Table 2" not in md


def test_skipped_folders_are_counted(tmp_path, real_summaries):
    run = tmp_path / "alfworld"
    place(real_summaries["alfworld"], RunDir(run).evaluation("sft", "seen"), "seen", 1.0, model="m/sft/model")
    (RunDir(run).eval / "steca").mkdir()  # evaluation not run yet
    shutil.copytree(real_summaries["alfworld"], RunDir(run).eval / "flat")  # summary.json without a split folder
    place(real_summaries["alfworld"], RunDir(run).evaluation("sft", "train"), "train", 1.0)
    out = tmp_path / "report"
    rep = report(["--run", f"alfworld={run}", "--out", str(out)])
    reasons = {Path(s["path"]).name: s["reason"] for s in rep["skipped"]}
    assert len(rep["skipped"]) == 3 and len(rep["cells"]) == 1
    assert reasons["steca"] == "no <split>/summary.json"
    assert "--summary LABEL=DIR" in reasons["flat"] and "'train'" in reasons["summary.json"]
    assert "Skipped (3):" in (out / "report.md").read_text()


def test_bad_input_names_the_file(tmp_path, real_summaries):
    run = tmp_path / "run"
    bad = place(real_summaries["alfworld"], RunDir(run).evaluation("sft", "seen"), "seen", 0.5, model="m")
    summary = json.loads(bad.read_text())
    del summary["avg_reward"]
    bad.write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(bad))}: missing field 'avg_reward'"):
        report(["--run", str(run), "--out", str(tmp_path / "o")])
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(bad))}: not a readable JSON file"):
        report(["--run", str(run), "--out", str(tmp_path / "o")])
    place(real_summaries["alfworld"], tmp_path / "x", "seen", 1.5, success=0.5)
    with pytest.raises(SystemExit, match=r"x/summary.json: field 'avg_reward' is 1.5, expected a fraction"):
        report(["--summary", f"a={tmp_path / 'x'}", "--out", str(tmp_path / "o")])
    shutil.copytree(real_summaries["alfworld"], tmp_path / "alf" / "eval" / "expert" / "seen")
    with pytest.raises(SystemExit, match="field 'env' is 'alfworld', but --run says 'virtualhome'"):
        report(["--run", f"virtualhome={tmp_path / 'alf'}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="a second summary for a alfworld/seen"):
        report(["--summary", f"a={real_summaries['alfworld']}", "--summary", f"a={real_summaries['alfworld']}",
                "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no <label>/<split>/summary.json under"):
        report(["--run", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="unknown environment 'webshop'"):
        report(["--run", f"webshop={tmp_path / 'empty'}", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_paper_averages_are_the_mean_of_the_four_columns():
    checked = 0
    for row in PAPER_ROWS:
        assert len(row.cells) == len(COLUMNS)
        if row.avg is not None and None not in row.cells:
            assert abs(sum(row.cells) / 4 - row.avg) <= 0.05 + 1e-9, row
            checked += 1
    assert checked == 2  # IPR and STeCa print all four cells and the Average


def _numbers(text: str) -> list[float | None]:
    return [None if v.strip() == "?" else float(v) for v in text.replace("*", "").split("/")]


@pytest.mark.skipif(not PAPER_MD.is_file(), reason=f"{PAPER_MD} not present (the shared reference)")
def test_transcription_matches_the_reference_text():
    text = PAPER_MD.read_text()

    def table(title: str) -> list[list[str]]:
        body = text.split(f"### {title}", 1)[1].split("\n###", 1)[0]
        return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
                if line.startswith("| ") and "not recovered" not in line][1:]  # drop the header

    rows = {(r.table, r.method, r.backbone): r for r in PAPER_ROWS}
    table1 = table("Table 1")
    assert len(table1) == 6
    for cells in table1:
        row = rows[("Table 1", cells[0].replace("*", ""), "Llama-2-7B-Chat")]
        assert list(row.cells) + [row.avg] == [_numbers(c)[0] for c in cells[1:6]]
    for backbone, *by_method in table("Table 2"):
        for method, pair in zip(("SFT", "IPR", "STeCa"), by_method):
            assert rows[("Table 2", method, backbone)].cells == (None, None, *_numbers(pair))
    table3 = [r.cells for r in PAPER_ROWS if r.table == "Table 3"]
    assert [tuple(_numbers(c)[0] for c in cells[1:]) for cells in table("Table 3")[1:]] == table3


def test_variant_tables_table9_and_figure4(tmp_path, two_runs):
    """The paper's other tables from the variants below a run: each variant's own STeCa in its table beside the
    paper's rows, Table 1's variants as Table 1 rows, Table 9 by the expert program's length, Figure 4."""
    from eval_agent.variants import VARIANTS, init

    alf, vh = two_runs
    for name, reward in (("wo_de", 0.25), ("delta_0.05", 0.5), ("delta_0.1", 0.5), ("sft_dpo", 0.125),
                         ("mistral_7b", 0.375)):
        variant = init(str(alf), VARIANTS[name])
        place(real_summaries_of(alf), variant.evaluation("steca", "seen"), "seen", reward, model=f"{name}/steca/model")
    # delta = 0.05 calibrated the main run's steps (as at N = 5), delta = 0.1 others
    for run, digest in ((alf, "a0"), (vh, "v0"), (alf / "variants" / "delta_0.05", "a0"),
                        (alf / "variants" / "delta_0.1", "a1")):
        RunDir(run).collection_summary.parent.mkdir(parents=True, exist_ok=True)
        RunDir(run).collection_summary.write_text(json.dumps({
            "deviation": {"explored_steps": 4, "judged": 3, "deviated": 1, "calibrated_digest": digest},
            "sets": {"calibration": {"rows": 1, "kept": 1}}, "train": {"rows": 2},
            "step_reward_by_position": {kind: {"mean": [], "count": []} for kind in ("expert", "explore")}}))
    mistral = RunDir(alf / "variants" / "mistral_7b")
    place(real_summaries_of(alf), mistral.evaluation("sft", "unseen"), "unseen", 0.5, model="m/sft/model")
    (RunDir(alf).calibration("steca", "seen")).mkdir(parents=True)
    (RunDir(alf).calibration("steca", "seen") / "summary.json").write_text(json.dumps(
        {"histories": 5, "scored": 4, "deviated": {"k": 1, "n": 4}, "clean": {"k": 3, "n": 4}}))
    out = tmp_path / "report"
    rep = report(["--run", f"alfworld={alf}", "--run", f"virtualhome={vh}", "--out", str(out)])
    md = (out / "report.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n## ")}

    # Table 1: the SFT+DPO variant's row (ALFWorld seen only), the others are not Table 1's
    assert table_row(md, "STeCa w/ SFT+DPO (ours)")[2:7] == ["–", "–", "12.5", "–", "–"]
    assert "STeCa w/o D_e (ours)" not in md.split("\n## ")[0]
    saved = json.loads((out / "report.json").read_text())
    assert [c["variant"] for c in saved["variant_cells"]] == ["sft_dpo"]
    assert saved["variant_cells"][0]["summary"].endswith("variants/sft_dpo/eval/steca/seen/summary.json")
    # Table 6: the main run's STeCa, then w/o D_e; the paper's STeCa and its one recovered ablation row
    t6 = sections["Table 6: training without one of D_c, D_e, D_s"]
    assert table_row(t6, "STeCa (ours)")[1:] == ["50.0 (n 1)", "100.0 (n 1)", "75.0 (n 1)", "62.5 (n 1)", "ours"]
    assert table_row(t6, "STeCa w/o D_e (ours)")[1:] == ["–", "–", "25.0 (n 1)", "–", "ours"]
    assert table_row(t6, "STeCa w/o exploration loss")[1:] == ["–", "60.5", "–", "71.2", "paper Table 6"]
    assert table_row(t6, "STeCa")[1:] == ["69.6", "63.6", "74.3", "76.1", "paper Table 1"]
    # Table 7: delta 0 is the main run; the paper's other thresholds are unknown
    t7 = sections["Table 7: the deviation threshold delta"]
    assert table_row(t7, "delta = 0.05 (ours) [same calibrated steps as delta = 0]")[3] == "50.0 (n 1)"
    assert table_row(t7, "delta = 0.1 (ours)")[3] == "50.0 (n 1)"
    assert table_row(t7, "delta = 0 (STeCa)")[1:] == ["69.6", "63.6", "74.3", "76.1", "paper Table 1"]
    assert table_row(t7, "delta = 0.1")[1:] == ["–", "–", "–", "–", "paper Table 7"]
    # Table 2: a backbone variant evaluates its own SFT; the paper's Mistral rows
    t2 = sections["Table 2: other backbones (ALFWorld)"]
    assert table_row(t2, "SFT (ours), Mistral-7B")[1:] == ["–", "50.0 (n 1)", "ours"]
    assert table_row(t2, "STeCa (ours), Mistral-7B")[1:] == ["37.5 (n 1)", "–", "ours"]
    assert table_row(t2, "STeCa, Mistral-7B")[1:] == ["73.3", "75.3", "paper Table 2"]
    # Table 9: the real VirtualHome task file of steca/unseen (its expert program's length picks the group)
    task = json.loads(next((RunDir(vh).evaluation("steca", "unseen") / "tasks").glob("*.json")).read_text())
    group = 0 if len(task["meta"]["program"]) <= 7 else 1 if len(task["meta"]["program"]) <= 13 else 2
    t9 = table_row(sections["Table 9: VirtualHome by task length"], "STeCa (ours)")
    assert t9[1 + group] == "100.0 (n 1)" and t9.count("– (n 0)") == 2
    assert table_row(sections["Table 9: VirtualHome by task length"], "STeCa")[1:] == ["76.2", "60.0", "48.9",
                                                                                          "paper Table 9"]
    # Figure 4: from the calibration summary
    f4 = table_row(sections["Figure 4: calibration ability"], "STeCa (ours), ALFWorld")
    assert f4[1:5] == ["25.0 (n 4)", "75.0 (n 4)", "–", "–"]
    tables = {t["key"]: t for t in rep["tables"]}
    assert set(tables) == {"table2", "table3", "table6", "table7", "table9", "figure4"}
    assert tables["figure4"]["rows"][0]["sources"][0] == str(RunDir(alf).calibration("steca", "seen") / "summary.json")
    tex = (out / "report.tex").read_text()
    assert r"\label{tab:steca-table9}" in tex and "STeCa w/o D\\_e (ours)" in tex
    assert (out / "tables.png").read_bytes()[:4] == b"\x89PNG"


def real_summaries_of(run: Path) -> Path:
    """An evaluation summary folder of the run (placed by two_runs)."""
    return RunDir(run).evaluation("base", "seen")


def test_stage_times_from_the_markers(tmp_path, capsys):
    from eval.stage_times import main as stage_times

    for name, times in (("a", {"sft": 61.4, "mc": 30}), ("b", {"sft": 20})):
        run = RunDir(tmp_path / name)
        run.pipeline.mkdir(parents=True)
        for stage, seconds in times.items():
            run.marker(stage).write_text(json.dumps({"fingerprints": [], "seconds": seconds}))
    run.marker("eval").write_text("{not json")  # unreadable: left out, not an error
    table = stage_times(["--run", f"a={tmp_path / 'a'}", "--run", f"b={tmp_path / 'b'}", "--out", str(tmp_path)])
    assert "| sft | 61 s | 20 s |" in table and "| mc | 30 s | - |" in table and "| eval |" not in table
    assert "| **total** | **91 s** | **20 s** |" in table and "111 s (1.9 min)" in table
    assert (tmp_path / "stage_times.md").read_text() == table == capsys.readouterr().out
    variant = RunDir(tmp_path / "a" / "variants" / "wo_dc")  # a variant's own stages: a column of its own
    variant.pipeline.mkdir(parents=True)
    variant.marker("steca").write_text(json.dumps({"fingerprints": [], "seconds": 7}))
    table = stage_times(["--run", f"a={tmp_path / 'a'}"])
    assert "| stage | a | a/wo_dc |" in table and "| steca | - | 7 s |" in table and "**91 s** | **7 s** |" in table
