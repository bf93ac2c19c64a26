"""The paper's other tables and Figure 4, from a run and its variants (eval_agent/variants.py), beside the paper's
values (eval/paper_results.py): eval.report lays them out below Table 1.

- Table 1's variant rows (RFT, STeCa w/o RT, STeCa w/ SFT+DPO): each variant's STeCa model, in Table 1's columns;
- Table 2 (other backbones, ALFWorld): SFT and STeCa of the main run and of each backbone variant;
- Table 3 (reflection and step-reward sources), Table 6 (without D_c / D_e / D_s), Table 7 (delta): STeCa of the
  main run and of each variant of the table, in Table 1's columns; a Table 7 row that calibrated the same steps as
  an earlier row (thresholds that select the same deviations at the run's N) is labelled so;
- Table 9 (VirtualHome by the expert trajectory's length: <= 7, 8-13, >= 14 steps): SFT and STeCa of the main
  run, from the evaluations' per-task files (both test splits pooled: the paper does not say which) and the
  expert program each task file records;
- Figure 4 (calibration ability): success from deviated and from clean histories (eval.calibration), per model
  and split.

A variant's evaluation of a model it shares is the main run's (eval_agent/layout.py), so a variant diverging at
reinforced training shows the main run's SFT. Every number keeps the file it came from (report.json). A cell
neither the run nor the paper has is "–"; the paper's cells it did not publish (or paper.md did not recover) too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.formatting import ENV_TITLES, MISSING, OUR_LABELS, Row, fmt, latex_escape, mean_of, save_png
from eval.paper_results import COLUMNS, LENGTH_BINS, PAPER_BY_LENGTH, PAPER_ROWS
from eval.summaries import Cell, load_json, read_summary
from eval_agent.layout import EVAL_SUMMARY, VARIANT_FILE, RunDir
from eval_agent.opt_ins import model_opt_ins, row_name, run_opt_ins
from eval_agent.variants import VARIANTS, Variant

SPLITS = ("seen", "unseen")


@dataclass
class TRow:
    method: str
    source: str  # "ours" or "paper ..."
    cells: list[float | None]
    counts: list[int | None] = field(default_factory=list)  # ours: the tasks (episodes) behind each cell
    sources: list[str | None] = field(default_factory=list)  # ours: the file each cell came from


@dataclass
class Table:
    key: str  # "table2", ..., "figure4"
    title: str
    caption: str
    columns: list[str]
    rows: list[TRow]


@dataclass
class Run:
    """One main run (one task family) and its variants found below it."""
    env: str | None
    main: RunDir
    variants: dict[str, RunDir]


def find_runs(specs: list[str]) -> list[Run]:
    runs = []
    for spec in specs:
        env, _, folder = spec.rpartition("=")
        main = RunDir(folder)
        found = {}
        if main.variants.is_dir():
            for d in sorted(p for p in main.variants.iterdir() if (p / VARIANT_FILE).is_file()):
                found[d.name] = RunDir(d)
        runs.append(Run(env or None, main, found))
    return runs


def value_of(run: RunDir, label: str, env: str, split: str, metric: str) -> Cell | None:
    """The cell of `label`'s evaluation on (env, split) in `run` (the base run's where the variant shares it)."""
    path = run.eval_summary(label, split)
    if not path.is_file():
        return None
    cell = read_summary(path, label, metric)
    return cell if cell.env == env else None


def our_row(method: str, runs: list[tuple[str, RunDir]], label: str, columns: list[tuple[str, str]],
            metric: str, labels: list[str] | None = None) -> TRow | None:
    """A row of ours over `columns` from the runs of each family (env, RunDir); None when it has no value at all.
    `labels`: said after the method's name, after what its runs opted into."""
    row = TRow(method, "ours", [], [], [])
    for env, split in columns:
        cell = next((c for e, rd in runs if e == env and (c := value_of(rd, label, env, split, metric))), None)
        row.cells.append(cell.value if cell else None)
        row.counts.append(cell.num_tasks if cell else None)
        row.sources.append(cell.summary if cell else None)
    row.method = row_name(method, model_opt_ins([s for s in row.sources if s], label) + (labels or []))
    return row if any(v is not None for v in row.cells) else None


def family_of(run: Run) -> str | None:
    if run.env:
        return run.env
    for path in sorted(run.main.eval.glob(f"*/*/{EVAL_SUMMARY}")) if run.main.eval.is_dir() else []:
        env = load_json(path).get("env")
        if env in ENV_TITLES:
            return env
    return None


def mains(runs: list[Run]) -> list[tuple[str, RunDir]]:
    return [(env, r.main) for r in runs if (env := family_of(r))]


def variant_runs(runs: list[Run], name: str) -> list[tuple[str, RunDir]]:
    return [(env, r.variants[name]) for r in runs if name in r.variants and (env := family_of(r))]


def in_table(table: str) -> list[Variant]:
    return [v for v in VARIANTS.values() if v.table == table]


def paper(table: str, columns: list[tuple[str, str]], titles: dict[str, str] | None = None) -> list[TRow]:
    """The paper's rows of `table` over `columns` (Table 1's STeCa row under the title `titles` gives it)."""
    rows = []
    for p in PAPER_ROWS:
        title = (titles or {}).get(p.method) if p.table == "Table 1" else None
        if p.table == table or title:
            cells = [p.cells[COLUMNS.index(c)] for c in columns]
            method = title or (p.method if table != "Table 2" else f"{p.method}, {p.backbone}")
            rows.append(TRow(method, f"paper {p.table}", cells))
    return rows


# ---- Table 1's variant rows -------------------------------------------------------------------------------

def table1_variant_rows(specs: list[str], metric: str, backbone: str) -> tuple[list[Row], list[dict[str, Any]]]:
    """Rows in report.py's Table 1 for the Table 1 variants that ran, and their cells' provenance."""
    runs = find_runs(specs)
    rows, cells = [], []
    for v in in_table("Table 1"):
        row = our_row(f"{v.title} (ours)", variant_runs(runs, v.name), "steca", list(COLUMNS), metric)
        if row:
            rows.append(Row(row.method, backbone, "ours", row.cells, mean_of(row.cells)))
            cells += [{"variant": v.name, "column": f"{env}/{split}", "value": value, "num_tasks": n, "summary": s}
                      for (env, split), value, n, s in zip(COLUMNS, row.cells, row.counts, row.sources) if s]
    return rows, cells


# ---- Tables 2, 3, 6, 7 ------------------------------------------------------------------------------------

def calibrated_steps(runs: list[tuple[str, RunDir]]) -> dict[str, str] | None:
    """{family: which explored steps its data collection calibrated (the digest its summary records)}; None when
    a run does not say."""
    found = {}
    for env, rd in runs:
        path = rd.collection_summary
        digest = (load_json(path).get("deviation") or {}).get("calibrated_digest") if path.is_file() else None
        if digest is None:
            return None
        found[env] = digest
    return found or None


def variants_table(key: str, table: str, title: str, caption: str, runs: list[Run], metric: str,
                   columns: list[tuple[str, str]], main_title: str, paper_titles: dict[str, str],
                   same_steps: bool = False) -> Table:
    """STeCa of the main run and of each variant of `table`, then the paper's rows. `same_steps`: a row whose
    runs calibrated the same steps as an earlier row's says so (Table 7: thresholds that select the same
    deviations at the run's N train on the same data)."""
    rows, before = [], []
    for method, run_list in [(main_title, mains(runs))] + [(v.title, variant_runs(runs, v.name)) for v in in_table(table)]:
        steps = calibrated_steps(run_list) if same_steps else None
        same = next((m for m, s in before if steps and steps.items() <= s.items()), None)  # in each of its families
        labels = [f"same calibrated steps as {same}"] if same else []
        before += [(method, steps)] if steps else []
        row = our_row(f"{method} (ours)", run_list, "steca", columns, metric, labels)
        rows += [row] if row else []
    return Table(key, title, caption, [f"{ENV_TITLES[e]} {s}" for e, s in columns],
                 rows + paper(table, columns, paper_titles))


def table2(runs: list[Run], metric: str, backbone: str) -> Table:
    columns = [c for c in COLUMNS if c[0] == "alfworld"]
    rows = []
    for name, run_list in [(backbone, mains(runs))] + [(v.title, variant_runs(runs, v.name)) for v in in_table("Table 2")]:
        for label in ("sft", "steca"):
            row = our_row(f"{OUR_LABELS[label]} (ours), {name}", run_list, label, columns, metric)
            rows += [row] if row else []
    return Table("table2", "Table 2: other backbones (ALFWorld)",
                 "SFT and STeCa from other base models, the whole run repeated (variants mistral_7b, llama3_8b).",
                 [f"{ENV_TITLES[e]} {s}" for e, s in columns], rows + paper("Table 2", columns))


def delta_table(runs: list[Run], metric: str) -> Table:
    t = variants_table("table7", "Table 7", "Table 7: the deviation threshold delta",
                       "STeCa with deviations detected at other thresholds: deviated when r(explored t) <= "
                       "r(expert t-1) + delta. The paper: delta = 0 is best, the others slightly lower (their values "
                       "were not recovered).", runs, metric, list(COLUMNS), "delta = 0",
                       {"STeCa": "delta = 0 (STeCa)"}, same_steps=True)
    t.rows += [TRow(v.title, "paper Table 7", [None] * len(COLUMNS)) for v in in_table("Table 7")]
    return t


# ---- Table 9 ----------------------------------------------------------------------------------------------

def length_bin(steps: int) -> int:
    return 0 if steps <= 7 else 1 if steps <= 13 else 2


def table9(runs: list[Run]) -> Table:
    """Average reward by the expert program's length, over the per-task files of both test splits."""
    rows = []
    for env, rd in mains(runs):
        if env != "virtualhome":
            continue
        for label in ("sft", "steca"):
            rewards: list[list[float]] = [[], [], []]
            files: list[str] = []
            for split in SPLITS:
                folder = rd.evaluation(label, split) / "tasks"
                for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                    record = load_json(path)
                    program = (record.get("meta") or {}).get("program")
                    if not isinstance(program, list) or not isinstance(record.get("reward"), (int, float, type(None))):
                        raise SystemExit(f"error: {path}: field 'meta.program' (the expert program) missing or not a "
                                         "list, or 'reward' not a number")
                    rewards[length_bin(len(program))].append(record.get("reward") or 0.0)
                files.append(str(folder))
            if any(rewards):
                rows.append(TRow(row_name(f"{OUR_LABELS[label]} (ours)", run_opt_ins(rd, label)), "ours",
                                 [100 * sum(r) / len(r) if r else None for r in rewards],
                                 [len(r) for r in rewards], [", ".join(files)] * 3))
    rows += [TRow(method, "paper Table 9", list(cells)) for method, cells in PAPER_BY_LENGTH.items()]
    return Table("table9", "Table 9: VirtualHome by task length",
                 "Average final reward ×100 by the expert trajectory's length in steps (<= 7, 8-13, >= 14), both test "
                 "splits pooled; n: tasks in the group. The paper does not give its group sizes.",
                 [f"{b} steps" for b in LENGTH_BINS], rows)


# ---- Figure 4 ---------------------------------------------------------------------------------------------

def figure4(runs: list[Run]) -> Table:
    columns = [f"{s}: {c}" for s in SPLITS for c in ("deviated", "clean")]
    rows = []
    for env, rd in mains(runs):
        for label in ("sft", "steca"):
            row = TRow(row_name(f"{OUR_LABELS[label]} (ours), {ENV_TITLES[env]}", run_opt_ins(rd, label)), "ours",
                       [], [], [])
            for split in SPLITS:
                path = rd.calibration(label, split) / EVAL_SUMMARY
                summary = load_json(path) if path.is_file() else None
                for condition in ("deviated", "clean"):
                    share = (summary or {}).get(condition) or {}
                    n = summary.get("scored") if summary else None
                    row.cells.append(100 * share["k"] / n if n and "k" in share else None)
                    row.counts.append(n)
                    row.sources.append(str(path) if summary else None)
            rows += [row] if any(v is not None for v in row.cells) or any(row.sources) else []
    rows += [TRow(f"{m}, {ENV_TITLES[e]}", "paper Figure 4", [None] * 4) for e in ENV_TITLES for m in ("SFT", "STeCa")]
    return Table("figure4", "Figure 4: calibration ability",
                 "Success ×100 when the model continues from histories holding a deviated step and from the same "
                 "histories without it (eval.calibration); n: histories whose two replays were exact. The paper's bar "
                 "values were not recovered.", columns, rows)


def build(specs: list[str], metric: str, backbone: str, paper_tables: list[str] | None = None) -> list[Table]:
    """The tables with any row; the paper's rows only of `paper_tables` (numbers; None: all, as eval.report)."""
    runs = find_runs(specs)
    columns = list(COLUMNS)
    steca = {"STeCa": "STeCa (GPT-4o reflection, MC step rewards)"}
    tables = [
        table2(runs, metric, backbone),
        variants_table("table3", "Table 3", "Table 3: reflection and step-reward sources",
                       "STeCa with reflections by the SFT model itself and with step rewards scored by an LLM instead "
                       "of Monte-Carlo rollouts.", runs, metric, columns, "STeCa", steca),
        variants_table("table6", "Table 6", "Table 6: training without one of D_c, D_e, D_s",
                       "STeCa trained without the calibrated trajectories (D_c), the successful explored ones (D_e, the "
                       "paper's exploration loss) or the expert sub-trajectories (D_s).", runs, metric, columns,
                       "STeCa", {"STeCa": "STeCa"}),
        delta_table(runs, metric),
        table9(runs),
        figure4(runs),
    ]
    for t in tables:
        t.rows = [r for r in t.rows if r.source == "ours" or paper_tables is None or r.source.split()[-1] in paper_tables]
    return [t for t in tables if t.rows]


# ---- output -----------------------------------------------------------------------------------------------

def cell_text(row: TRow, i: int) -> str:
    text = fmt(row.cells[i])
    if row.source == "ours" and row.counts and row.counts[i] is not None:
        text += f" (n {row.counts[i]})"
    return text


def to_markdown(tables: list[Table]) -> str:
    lines = []
    for t in tables:
        lines += [f"## {t.title}", "", t.caption + f" {MISSING}: not available.", "",
                  "| " + " | ".join(["Method", *t.columns, "Source"]) + " |",
                  "|---|" + "---:|" * len(t.columns) + "---|"]
        lines += ["| " + " | ".join([r.method, *(cell_text(r, i) for i in range(len(t.columns))), r.source]) + " |"
                  for r in t.rows]
        lines.append("")
    return "\n".join(lines)


def to_latex(tables: list[Table]) -> str:
    out = []
    for t in tables:
        lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{l{'r' * len(t.columns)}}}",
                 r"\toprule", " & ".join(latex_escape(x) for x in ["Method", *t.columns]) + r" \\"]
        group = None
        for r in t.rows:
            if r.source != group:
                group = r.source
                title = "Ours" if group == "ours" else f"Paper, {group.removeprefix('paper ')}"
                lines += [r"\midrule", rf"\multicolumn{{{len(t.columns) + 1}}}{{l}}{{\textit{{{latex_escape(title)}}}}} \\"]
            lines.append(" & ".join(latex_escape(x) for x in [r.method, *map(fmt, r.cells)]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(t.title + '. ' + t.caption)}}}",
                  rf"\label{{tab:steca-{t.key}}}", r"\end{table}", ""]
        out.append("\n".join(lines))
    return "\n".join(out)


def plot(tables: list[Table], path: Path) -> bool:
    """One panel per table: grouped bars per column, our rows plain, the paper's hatched; missing cells no bar.
    False when there is no table to draw."""
    if not tables:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(11, 3.6 * len(tables)), squeeze=False)
    for ax, t in zip(axes[:, 0], tables):
        series = [r for r in t.rows if any(v is not None for v in r.cells)]
        width = 0.85 / max(len(series), 1)
        for i, r in enumerate(series):
            offset = (i - (len(series) - 1) / 2) * width
            bars = [(g + offset, v) for g, v in enumerate(r.cells) if v is not None]
            label = r.method if r.source == "ours" else f"{r.method} ({r.source})"
            ax.bar([x for x, _ in bars], [v for _, v in bars], width, label=label,
                   hatch=None if r.source == "ours" else "//", edgecolor="white", linewidth=0.5)
        ax.set_xticks(range(len(t.columns)), t.columns, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(t.title, fontsize=10)
        if series:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    return True


def to_json(tables: list[Table]) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(t, default=lambda o: o.__dict__)) for t in tables]
