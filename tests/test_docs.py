"""The docs stay true to the scripts: every variable a script reads is documented once in docs/ (a table row
whose first cell is the variable), with the default the stage's Python actually has; older names are listed."""
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SCRIPTS = sorted(p for p in REPO.glob("*/*.sh") if p.parent.name not in ("tests", ".venv")) + sorted(REPO.glob("*.sh"))
ASSIGN = re.compile(r"^([A-Z][A-Z0-9_]*)=\$\{\1:-(.*)\}\s*(?:#.*)?$")  # NAME=${NAME:-default}
OLDER = re.compile(r"^\$\{([A-Z][A-Z0-9_]*):-")  # NAME=${NAME:-${OLDER:-...}}
OPT = re.compile(r'^(opt|flag|opt_bool) (--\w+) "\$([A-Z][A-Z0-9_]*)"')
MODULE = re.compile(r'(?:-m |launch_training )([A-Za-z_]+(?:\.[a-z_]+)+)')
STAGE_PACKAGES = ("sft", "sampling", "data_collection", "Reinforced_train", "eval", "eval_agent")
ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|([^|]*)\|")


def script_variables() -> dict[str, list[tuple[Path, str]]]:
    """variable -> [(script, the default it is given there)]."""
    out: dict[str, list[tuple[Path, str]]] = {}
    for script in SCRIPTS:
        for line in script.read_text().splitlines():
            m = ASSIGN.match(line.strip())
            if m:
                out.setdefault(m[1], []).append((script, m[2]))
    return out


def older_names() -> set[str]:
    names = set()
    for script in SCRIPTS:
        for line in script.read_text().splitlines():
            m = ASSIGN.match(line.strip())
            if m and (old := OLDER.match(m[2])):
                names.add(old[1])
    return names


def doc_rows() -> dict[str, list[tuple[str, str]]]:
    """variable -> [(page, default cell)] over every table in docs/."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for page in sorted(DOCS.glob("*.md")):
        for line in page.read_text().splitlines():
            m = ROW.match(line)
            if m:
                rows.setdefault(m[1], []).append((page.name, m[2].strip().strip("`")))
    return rows


def python_defaults() -> dict[str, dict[str, object]]:
    """variable -> {stage module: the Python default of the flag it passes} for every variable a stage script
    passes as a flag (a variable several stages read may have a default per stage)."""
    out: dict[str, dict[str, object]] = {}
    for script in SCRIPTS:
        text = script.read_text()
        sourced = "".join((REPO / s).read_text() for s in re.findall(r"source ([\w/]+\.sh)", text))
        modules = MODULE.findall("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
        if not modules or modules[0].split(".")[0] not in STAGE_PACKAGES or modules[0] in ("eval_agent.layout", "eval.report"):
            continue
        parser = importlib.import_module(modules[0]).build_parser()
        defaults = {o: a.default for a in parser._actions for o in a.option_strings}
        for line in (text + sourced).splitlines():
            m = OPT.match(line.strip())
            if m and m[2] in defaults:
                out.setdefault(m[3], {})[modules[0]] = defaults[m[2]]
    return out


def documented(cell: str, defaults: dict[str, object]) -> bool:
    """Every stage's default is in the docs cell: one value, or `value (where); value (where)` when the stages
    differ."""
    parts = [re.sub(r"\s*\(.*?\)\s*$", "", part).strip().strip("`") for part in cell.split(";")]
    return all(any(same(part, d) for part in parts) for d in defaults.values())


def same(cell: str, default: object) -> bool:
    """A docs default cell against a Python default: numbers by value, booleans as 1/0, none as empty."""
    cell = cell.strip()
    if default is None or default == "":
        return cell in ("", "empty", "(none)", "-", "–")
    if isinstance(default, bool):
        return cell in (("1", "True", "true") if default else ("0", "False", "false"))
    value = getattr(default, "value", default)  # transformers' enums
    try:
        return float(cell) == float(value)
    except (TypeError, ValueError):
        return cell == str(value)


@pytest.fixture(scope="module")
def rows():
    if not DOCS.is_dir():
        pytest.fail("docs/ is missing")
    return doc_rows()


def test_every_script_variable_is_documented_once(rows):
    missing = sorted(v for v in script_variables() if v not in rows)
    twice = {v: [p for p, _ in r] for v, r in rows.items() if len(r) > 1}
    assert not missing, f"variables read by scripts but in no docs/ table: {missing}"
    assert not twice, f"variables documented more than once: {twice}"


def test_documented_defaults_are_the_python_defaults(rows):
    wrong = {v: (defaults, rows[v][0][1]) for v, defaults in python_defaults().items()
             if v in rows and not documented(rows[v][0][1], defaults)}
    assert not wrong, f"docs default differs from the Python default (variable: python per stage, docs): {wrong}"


def test_older_names_are_listed(rows):
    text = "".join(p.read_text() for p in DOCS.glob("*.md"))
    assert not [n for n in older_names() if f"`{n}`" not in text]
