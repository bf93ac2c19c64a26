"""The report's signals table and its reading, on hand-built counts placed in real summary files (written by
eval.evaluate, eval.step_accuracy and data_collection.build themselves, so their format cannot drift)."""
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from eval.report import main as report
from eval.step_accuracy import main as step_accuracy
from eval_agent.layout import RunDir
from eval_agent.stats import difference_interval, format_share, wilson_interval
from tests.test_data_collection import build, fixture_args, fixture_run, toy
from tests.test_report import place, real_summaries  # noqa: F401  (a fixture)
from tests.test_step_accuracy import VIRTUALHOME_SCRIPT, ScriptedPolicy


@pytest.fixture(scope="module")
def real_step_accuracy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("step_accuracy")
    step_accuracy(["--task_family", "virtualhome", "--split", "unseen", "--limit", "1", "--steps_per_task", "2",
                   "--out", str(out)], policy=ScriptedPolicy(out, VIRTUALHOME_SCRIPT))
    return out


@pytest.fixture(scope="module")
def real_collection(tmp_path_factory, tiny_model_dir) -> Path:
    """data_collection.build on test_data_collection's hand-built run: 8 explored steps, 5 judged, 2 deviated,
    2 calibrated rows (templated fallback thoughts), expert MC 0.2..1.0 on 15 steps, explored 1.6 over 7."""
    run = tmp_path_factory.mktemp("collection")
    fixture_run(run)
    build(fixture_args(run, "--reflect_backend", "self", "--model", str(tiny_model_dir), "--reflect_retries", "0",
                       "--reflect_max_tokens", "4", "--reflection_fallback"), embeddings=toy())
    return run / "data_collection"


def place_steps(src: Path, dst: Path, env: str, split: str, match: int, valid: int, steps: int, **fields) -> Path:
    """A copy of a real step-accuracy summary with other counts."""
    dst.mkdir(parents=True)
    summary = json.loads((src / "summary.json").read_text())
    summary.update(env=env, split=split, match=match, valid=valid, steps=steps, no_action=steps - valid, **fields)
    (dst / "summary.json").write_text(json.dumps(summary))
    return dst / "summary.json"


share = format_share


def diff(before: tuple[int, int], after: tuple[int, int]) -> str:
    lo, hi = difference_interval(*after, *before)
    return f"difference {after[0] / after[1] - before[0] / before[1]:+.2f} [{lo:+.2f}, {hi:+.2f}]"


@pytest.fixture()
def runs(tmp_path, real_summaries, real_step_accuracy, real_collection):  # noqa: F811
    """ALFWorld unseen: success 0/4 for every model; step accuracy base 1/40 -> SFT 20/40 (moved) -> STeCa 22/40
    (not); valid 5/40 -> 30/40 -> 31/40. ALFWorld seen: step accuracy SFT 13/48 -> STeCa 3/48, moved although the
    two intervals overlap; valid 20/48 -> 19/48. VirtualHome: success only, no data collection."""
    alf, vh = RunDir(tmp_path / "alfworld"), RunDir(tmp_path / "virtualhome")
    model = {"base": "models/SmolLM2-135M-Instruct", "sft": "x/sft/model", "steca": "x/steca/model"}
    for label in model:
        place(real_summaries["alfworld"], alf.evaluation(label, "unseen"), "unseen", 0.0, model=model[label],
              num_tasks=4)
    for label, (match, valid) in {"base": (1, 5), "sft": (20, 30), "steca": (22, 31)}.items():
        place_steps(real_step_accuracy, alf.step_accuracy(label, "unseen"), "alfworld", "unseen", match, valid, 40)
    place_steps(real_step_accuracy, alf.step_accuracy("sft", "seen"), "alfworld", "seen", 13, 20, 48)
    place_steps(real_step_accuracy, alf.step_accuracy("steca", "seen"), "alfworld", "seen", 3, 19, 48)
    shutil.copytree(real_collection, alf.data_collection)
    place(real_summaries["virtualhome"], vh.evaluation("base", "seen"), "seen", 0.0, model=model["base"], num_tasks=3)
    place(real_summaries["virtualhome"], vh.evaluation("steca", "seen"), "seen", 1 / 3, model=model["steca"],
          num_tasks=3)
    return alf, vh


def table_row(markdown: str, *first: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first} in\n{markdown}")


def test_signals_table_collection_and_reading(tmp_path, runs, capsys):
    alf, vh = runs
    out = tmp_path / "report"
    rep = report(["--run", f"alfworld={alf.root}", "--run", f"virtualhome={vh.root}", "--out", str(out), "--reading"])
    md = (out / "report.md").read_text()
    assert md.index("# STeCa reproduction") < md.index("## Signals at small scale") < md.index("## Data collection") \
        < md.index("## Reading")
    assert table_row(md, "ALFWorld", "unseen", "Base model") == [
        "ALFWorld", "unseen", "Base model", "0/4 = 0.00 [0.00, 0.49]", "1/40 = 0.03 [0.00, 0.13]",
        "5/40 = 0.12 [0.05, 0.26]"]
    assert table_row(md, "ALFWorld", "seen", "SFT")[3:] == ["–", format_share(13, 48), format_share(20, 48)]
    assert table_row(md, "ALFWorld", "seen", "Base model")[3:] == ["–", "–", "–"]  # not measured: shown, no crash
    assert table_row(md, "VirtualHome", "seen", "STeCa")[3:] == ["1/3 = 0.33 [0.06, 0.79]", "–", "–"]
    # data collection: 2 of 5 judged deviated, 2 calibrated rows kept; expert 9.0/15, explored 1.6/7
    assert table_row(md, "ALFWorld", "2/5") == ["ALFWorld", "2/5", "2 (2)", table_row(md, "ALFWorld", "2/5")[3],
                                                "0.60 (n=15)", "0.23 (n=7)"]
    assert not any(line.startswith("| VirtualHome | ") and "(n=" in line for line in md.splitlines())

    reading = (out / "reading.md").read_text()
    assert md.endswith(reading) and capsys.readouterr().out.endswith(reading)
    moved, rest = reading.split("What did not move:")
    assert f"SFT raised step accuracy on ALFWorld unseen from {share(1, 40)} to {share(20, 40)} " \
           f"({diff((1, 40), (20, 40))})." in moved
    assert f"SFT raised the valid-action share on ALFWorld unseen from {share(5, 40)} to {share(30, 40)} " \
           f"({diff((5, 40), (30, 40))})." in moved
    assert f"STeCa training lowered step accuracy on ALFWorld seen from {share(13, 48)} to {share(3, 48)} " \
           f"({diff((13, 48), (3, 48))})." in moved
    assert wilson_interval(3, 48)[1] > wilson_interval(13, 48)[0]  # moved although the two intervals overlap
    assert sum(line.startswith("- ") for line in moved.splitlines()) == 3 and "success" not in moved
    assert f"Step accuracy on ALFWorld unseen, SFT {share(20, 40)} vs STeCa {share(22, 40)}: no difference we can " \
           f"tell ({diff((20, 40), (22, 40))} holds 0)." in rest
    assert f"The valid-action share on ALFWorld seen, SFT {share(20, 48)} vs STeCa {share(19, 48)}: no difference" in rest
    assert f"Success on ALFWorld unseen, Base model {share(0, 4)} vs SFT {share(0, 4)}: no difference" in rest
    assert "Not measured, so not compared:\n- VirtualHome seen: success of SFT; step accuracy of any model.\n" \
        "- VirtualHome unseen: success of any model; step accuracy of any model.\n" \
        "- ALFWorld seen: success of any model; step accuracy of Base model.\n\n" in rest
    assert "found 2 deviations; 2 calibrated rows were written (2 kept)" in rest
    assert "0.60 after the expert's steps (n=15) against 0.23 after the SFT policy's own (n=7): the expert's steps " \
           "led to success more often" in rest
    assert "Our backbone is SmolLM2-135M-Instruct; the paper's is Llama-2-7B-Chat" in rest
    assert "rests on 3 to 4 tasks: 1/3 (STeCa, VirtualHome seen) is consistent with any success rate from 0.06 " \
        "to 0.79" in rest
    assert f"The paper's STeCa success lies above our interval on ALFWorld unseen (paper 76.1, ours {share(0, 4)})" in rest
    assert f"Our interval still holds the paper's STeCa success on VirtualHome seen (paper 69.6, ours {share(1, 3)})" in rest
    assert "(40 to 48 steps a cell, against 3 to 4 tasks for success)" in rest
    assert f"{out / 'report.png'}, {out / 'tables.png'}, {out / 'signals.png'}" in rest  # tables: Table 9 (VH)
    assert str(alf.data_collection / "plots" / "step_reward_by_position.png") in rest

    tex = (out / "report.tex").read_text()
    assert r"\label{tab:steca-signals}" in tex and r"\label{tab:steca-data-collection}" in tex
    assert r"ALFWorld & unseen & SFT & 0/4 = 0.00 {[}0.00, 0.49{]} & 20/40 = 0.50 {[}0.35, 0.65{]}" in tex
    assert "–" not in tex and "{[}Wilson 95\\% interval{]}" in tex
    with Image.open(out / "signals.png") as img:
        assert img.size[0] > 600

    sig = json.loads((out / "report.json").read_text())["signals"]
    assert sig == json.loads(json.dumps(rep["signals"])) and sig["reading"] == reading
    row = next(r for r in sig["rows"] if (r["label"], r["env"], r["split"]) == ("sft", "alfworld", "unseen"))
    assert row["step_accuracy"] == {"k": 20, "n": 40, "share": 0.5, "ci95": list(wilson_interval(20, 40))}
    assert row["sources"]["step_accuracy"] == str(alf.step_accuracy("sft", "unseen") / "summary.json")
    assert sig["data_collection"][0]["expert_reward"] == pytest.approx(0.6)
    assert sig["data_collection"][0]["explored_reward"] == pytest.approx(1.6 / 7)


def test_nothing_moved_and_no_signals(tmp_path, real_summaries, real_step_accuracy):  # noqa: F811
    run = RunDir(tmp_path / "alfworld")
    for label in ("base", "sft"):
        place(real_summaries["alfworld"], run.evaluation(label, "seen"), "seen", 0.0, model="m", num_tasks=3)
        place_steps(real_step_accuracy, run.step_accuracy(label, "seen"), "alfworld", "seen", 2, 4, 20)
    out = tmp_path / "report"
    report(["--run", str(run.root), "--out", str(out)])
    reading = (out / "reading.md").read_text()
    assert "What moved (the 95% interval of the difference excludes 0):\n- nothing: no signal changed" in reading
    assert "Data collection:\n- – (not found)." in reading

    # an evaluation with no step accuracy at all: the table shows dashes, the reading says what is missing
    only = tmp_path / "only"
    place(real_summaries["virtualhome"], only, "unseen", 0.0, model="m", num_tasks=2)
    report(["--summary", f"base={only}", "--out", str(tmp_path / "r2")])
    md = (tmp_path / "r2" / "report.md").read_text()
    assert table_row(md, "VirtualHome", "unseen", "Base model")[3:] == ["0/2 = 0.00 [0.00, 0.66]", "–", "–"]
    assert "- VirtualHome unseen: success of SFT, STeCa; step accuracy of any model." in md


def test_a_run_with_step_accuracy_only(tmp_path, real_step_accuracy):
    """No evaluation yet: the report still builds, from what there is."""
    run = RunDir(tmp_path / "virtualhome")
    place_steps(real_step_accuracy, run.step_accuracy("base", "unseen"), "virtualhome", "unseen", 0, 1, 11,
                model="models/SmolLM2-135M-Instruct")
    out = tmp_path / "report"
    report(["--run", str(run.root), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert table_row(md, "VirtualHome", "unseen", "Base model")[3:] == ["–", "0/11 = 0.00 [0.00, 0.26]",
                                                                         "1/11 = 0.09 [0.02, 0.38]"]
    assert "Nothing to compare: no signal was measured for two of base, SFT and STeCa" in md
    assert "Our backbone is SmolLM2-135M-Instruct;" in md


def test_step_accuracy_flag_and_bad_summaries(tmp_path, real_summaries, real_step_accuracy):  # noqa: F811
    out = tmp_path / "report"
    sft = place(real_summaries["virtualhome"], tmp_path / "sft", "unseen", 1.0, model="x/sft/model")
    rep = report(["--summary", f"sft={sft}", "--step_accuracy", f"sft={real_step_accuracy}", "--out", str(out)])
    row = next(r for r in rep["signals"]["rows"] if r["label"] == "sft" and r["step_accuracy"])
    real = json.loads((real_step_accuracy / "summary.json").read_text())
    assert (row["env"], row["split"]) == ("virtualhome", "unseen") and row["step_accuracy"]["k"] == real["match"]

    bad = place_steps(real_step_accuracy, tmp_path / "bad", "virtualhome", "unseen", 5, 4, 10)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(bad))}: field 'match' is 5, more than 'valid'"):
        report(["--step_accuracy", f"sft={bad}", "--out", str(out)])
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "steps": -1}))
    with pytest.raises(SystemExit, match=r"field 'steps' is -1, expected a count"):
        report(["--step_accuracy", f"sft={bad}", "--out", str(out)])
    bad.write_text(json.dumps({"env": "alfworld"}))
    with pytest.raises(SystemExit, match=r"missing field 'split' \(not a summary.json of eval.step_accuracy\?\)"):
        report(["--step_accuracy", f"sft={bad}", "--out", str(out)])
    with pytest.raises(SystemExit, match="expected LABEL=PATH"):
        report(["--step_accuracy", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit, match="a second step-accuracy summary for sft virtualhome/unseen"):
        report(["--step_accuracy", f"sft={real_step_accuracy}", "--step_accuracy", f"sft={real_step_accuracy}",
                "--out", str(out)])


def test_count_range_names_one_count_once():
    from eval.signals import count_range

    assert (count_range([12, 12]), count_range([106, 114, 110])) == ("12", "106 to 114")
