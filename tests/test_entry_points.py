"""The shape of the code and its front door: eval/'s modules import one another without a cycle."""
import ast
from pathlib import Path

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
