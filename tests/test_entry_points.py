"""The shape of the code and its front door: eval/'s modules import one another without a cycle; every `python -m`
entry point and every stage script prints its help with --help whatever else is missing, and refuses a bad value
in one line naming the variable (or flag) and the form it takes, without the usage."""
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval_agent.cli import FORMS, run_main

REPO = Path(__file__).resolve().parent.parent


def imports_of(path: Path, package: str) -> set[str]:
    """The modules of `package` that a file imports, at its top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == package:  # from eval import signals
            out |= {f"{package}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(package + ".")}
    return out


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> the modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node, [node]))), None)


def test_eval_modules_import_one_another_without_a_cycle():
    graph = {f"eval.{p.stem}": imports_of(p, "eval") for p in (REPO / "eval").glob("*.py")}
    assert graph["eval.report"] >= {"eval.signals", "eval.tables"}  # the walk sees the imports
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and would see a cycle


# ---- the front door: --help, and a refused value in one line ---------------------------------------------

STAGE_PACKAGES = ("sft", "sampling", "data_collection", "Reinforced_train", "eval", "eval_agent")
MAIN = re.compile(r'^if __name__ == "__main__":', re.M)
ENTRY_POINTS = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for pkg in STAGE_PACKAGES
                      for p in (REPO / pkg).rglob("*.py") if MAIN.search(p.read_text()))
RUNS = re.compile(r'^\s*(?:exec "\$PYTHON" -m|launch_training) ([A-Za-z_]+(?:\.[a-z_]+)+)', re.M)  # the stage's module
STAGE_SCRIPTS = sorted(p for pkg in STAGE_PACKAGES for p in (REPO / pkg).glob("*.sh") if RUNS.search(p.read_text()))
OPT = re.compile(r'^(?:opt|opt_bool) (--\w+) "\$([A-Z][A-Z0-9_]*)"', re.M)
NUMBER_TYPES = ("int", "float", "count", "natural", "non_negative", "probability")


def test_the_walk_finds_every_entry_point_and_stage_script():
    assert {"sft.train", "Reinforced_train.train", "eval.report", "eval_agent.guard", "eval_agent.llm.serve_hf"} \
        <= set(ENTRY_POINTS)
    assert len(STAGE_SCRIPTS) == 9


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_prints_its_help_and_refuses_in_one_line(module, monkeypatch, capsys):
    """`python -m <module> --help` prints the help whatever else is missing; an unknown option, a missing required
    one or a bad value is one line, without the usage."""
    source = (REPO / module.replace(".", "/")).with_suffix(".py").read_text()
    assert "run_main(main)" in MAIN.split(source)[1]  # what python -m runs
    main = importlib.import_module(module).main
    for argv, code in (["--help"], 0), (["--no_such_option"], 2):
        monkeypatch.setattr(sys, "argv", [module, *argv])
        with pytest.raises(SystemExit) as done:
            run_main(main)
        out, err = capsys.readouterr()
        assert done.value.code == code, (argv, err)
        if code == 0:
            assert "usage:" in out and "--help" in out
        else:
            assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "usage:" not in err, err


@pytest.mark.parametrize("module", ["sft.train", "Reinforced_train.train"])
def test_the_first_command_a_user_types_prints_the_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "--learning_rate" in done.stdout and "--run_dir" in done.stdout, done.stderr


def a_number_variable(script: Path) -> tuple[str, str, str]:
    """(VARIABLE, --flag, the flag's type): the first variable the script passes to a flag that takes a number."""
    text = script.read_text()
    text += "".join((REPO / s).read_text() for s in re.findall(r"^source ([\w/]+\.sh)", text, re.M))
    module = RUNS.search(text)[1]
    actions = {o: a for a in importlib.import_module(module).build_parser()._actions for o in a.option_strings}
    types = {flag: getattr(actions[flag].type, "__name__", None) for flag, _ in OPT.findall(text) if flag in actions}
    return next((var, flag, types[flag]) for flag, var in OPT.findall(text) if types.get(flag) in NUMBER_TYPES)


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stage_script_prints_its_help_and_names_a_bad_variable(script, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    variable, flag, kind = a_number_variable(script)
    refused = subprocess.run(["bash", str(script)], cwd=REPO, env={**env, variable: "abc"}, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: {variable}=abc: {flag} takes {FORMS[kind]}, got 'abc'"], refused.stderr
    assert not (tmp_path / "run").exists()


def test_a_refused_learning_rate_is_one_line_naming_its_variable(tmp_path):
    """SFT_LR=abc printed 8 to 115 lines of usage before the error."""
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path), "SFT_LR": "abc"}
    refused = subprocess.run(["bash", "sft/sft.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr == "error: SFT_LR=abc: --learning_rate takes a number, got 'abc'\n"


@pytest.mark.parametrize("script", ["scripts/run_pipeline.sh", "scripts/quickstart.sh"])
def test_the_whole_pipeline_scripts_print_their_help_and_take_no_arguments(script):
    done = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"bash {script}" in done.stdout and "set -euo" not in done.stdout
    refused = subprocess.run(["bash", script, "--task_family", "alfworld"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--help lists them" in refused.stderr
