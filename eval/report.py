"""Stage 5 report: the paper's Table 1 layout (VirtualHome seen / unseen, ALFWorld seen / unseen, Average)
built from evaluation summaries, our rows above the paper's published rows (eval/paper_results.py), as
Markdown, LaTeX, a PNG bar chart and report.json (every number with the file it came from). Below it, the
signals that move at small scale and their plain-language reading (eval/signals.py, docs/metrics.md):
success counts, step accuracy and valid actions with Wilson 95% intervals, and the data-collection figures.
Between them, the paper's other tables (2, 3, 6, 7, 9) and Figure 4 from the variants of each `--run` found in
RUN_DIR/variants/ (eval/tables.py, docs/variants.md), with Table 1's variants as rows of Table 1 (tables.png).
Last, the paired comparison of each run's models (and its variants' STeCa models) on the items they share, with
its sentences at the head of the reading (eval/compare.py).

    python -m eval.report --run alfworld=outputs/alfworld --run virtualhome=outputs/virtualhome --out outputs/report
    python -m eval.report --summary base=outputs/eval/alfworld-unseen-smollm2-base --out outputs/report

Inputs:
- `--run [ENV=]RUN_DIR` finds RUN_DIR/eval/<label>/<split>/summary.json (RUN_DIR/<label>/<split>/ when
  RUN_DIR has no eval/ folder); with ENV, every summary found must be of that environment.
- `--summary LABEL=PATH` adds one summary (a summary.json or the folder holding it); its environment and
  split are read from the file.
- step accuracy: RUN_DIR/eval/<label>/<split>/step_accuracy/summary.json of each `--run`, and
  `--step_accuracy LABEL=PATH`; data collection: RUN_DIR/data_collection/summary.json of each `--run`.
The labels base, sft and steca are shown as "Base model (ours)", "SFT (ours)", "STeCa (ours)", others as
given, each followed by what its runs opted into (`[generated data, self-reflection]`, in Table 1 and the signals
alike); a Table 7 row whose data collection calibrated the same steps as an earlier row's says so
(`[same calibrated steps as delta = 0]`). Our rows' backbone is `--backbone`, else the model name the `base`
summaries record.

Metric: average final reward ×100, the paper's (`--metric success_rate` for the success rate; the reward
is 1 for a solved task and 0 otherwise in both environments, so the two agree). Average: the mean of the
four columns, only when all four are present, as the paper computes it. A missing cell is "–".

Bad input: a summary that is not JSON or lacks a field of eval.evaluate's summary.json, a value out of
range, two summaries for one cell, an ENV that does not match, a label its policy does not match (base, sft or
steca made by the built-in expert) -> an error naming the file. A summary whose model changed after it was made
(its fingerprint records the model's identity) is shown with a warning naming what changed. Skipped, counted
and listed in report.json: a label folder with no <split>/summary.json, a split other than seen / unseen.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval import compare, manifest, signals, tables
from eval.formatting import (ENV_TITLES, MISSING, OUR_LABELS, SPLIT_NAMES, Row, fmt, label_order, latex_escape, mean_of,
                             save_png)
from eval.paper_results import COLUMNS, PAPER_ROWS
from eval.summaries import Cell, fail, read_summary
from eval_agent.cli import run_main
from eval_agent.layout import EVAL_SUMMARY, RunDir
from eval_agent.opt_ins import model_opt_ins, row_name
from eval_agent.store import BadRecord, write_atomic, write_json

log = logging.getLogger("report")

METRICS = {"avg_reward": "Average final reward", "success_rate": "Success rate"}
COLUMN_TITLES = [f"{ENV_TITLES[env]} {split}" for env, split in COLUMNS]


def discover(run: str) -> tuple[str | None, list[tuple[str, Path]], list[dict[str, str]]]:
    """(ENV or None, [(label, summary path)], skipped) for one `--run [ENV=]RUN_DIR`."""
    env, _, folder = run.rpartition("=")
    if env and env not in ENV_TITLES:
        raise SystemExit(f"error: --run {run}: unknown environment {env!r}; choose from {sorted(ENV_TITLES)}")
    root = Path(folder)
    evals = RunDir(root).eval if RunDir(root).eval.is_dir() else root
    if not evals.is_dir():
        raise SystemExit(f"error: --run {run}: {root} is not a folder")
    found, skipped = [], []
    for label_dir in sorted(p for p in evals.iterdir() if p.is_dir()):
        summaries = sorted(label_dir.glob(f"*/{EVAL_SUMMARY}"))
        if not summaries:
            hint = " (it holds a summary.json itself: pass it as --summary LABEL=DIR)" \
                if (label_dir / EVAL_SUMMARY).is_file() else ""
            skipped.append({"path": str(label_dir), "reason": f"no <split>/summary.json{hint}"})
        for path in summaries:
            if path.parent.name in SPLIT_NAMES:
                found.append((label_dir.name, path))
            else:
                skipped.append({"path": str(path), "reason": f"split {path.parent.name!r} is not a column"})
    if not found and not signals.step_accuracy_summaries(root) and not RunDir(root).collection_summary.is_file():
        raise SystemExit(f"error: --run {run}: no <label>/<split>/summary.json under {evals}")
    return env or None, found, skipped


def collect(runs: list[str], summaries: list[str], metric: str) -> tuple[list[Cell], list[dict[str, str]]]:
    """Every cell from `--run` and `--summary`, each (label, env, split) once."""
    cells: dict[tuple[str, str, str], Cell] = {}
    skipped: list[dict[str, str]] = []

    def add(cell: Cell) -> None:
        key = (cell.label, cell.env, cell.split)
        if key in cells:
            fail(cell.summary, f"a second summary for {cell.label} {cell.env}/{cell.split} "
                               f"(the first: {cells[key].summary})")
        cells[key] = cell

    for run in runs:
        env, found, run_skipped = discover(run)
        skipped += run_skipped
        for label, path in found:
            cell = read_summary(path, label, metric)
            if env and cell.env != env:
                fail(path, f"field 'env' is {cell.env!r}, but --run says {env!r}")
            if cell.split != SPLIT_NAMES[path.parent.name]:
                fail(path, f"field 'split' says {cell.split!r}, its folder {path.parent.name!r}")
            add(cell)
    for spec in summaries:
        label, sep, where = spec.partition("=")
        if not sep or not label or not where:
            raise SystemExit(f"error: --summary {spec}: expected LABEL=PATH")
        path = Path(where) / EVAL_SUMMARY if Path(where).is_dir() else Path(where)
        if not path.is_file():
            raise SystemExit(f"error: --summary {spec}: {path} not found")
        add(read_summary(path, label, metric))
    return list(cells.values()), skipped


def default_backbone(cells: list[Cell]) -> str:
    """The model name the `base` summaries record."""
    return ", ".join(sorted({Path(c.model).name for c in cells if c.label == "base" and c.model})) or MISSING


def our_rows(cells: list[Cell], backbone: str | None) -> list[Row]:
    backbone = backbone or default_backbone(cells)
    by_key = {(c.label, c.env, c.split): c for c in cells}
    rows = []
    for label in sorted({c.label for c in cells}, key=label_order):
        values = [by_key[(label, *col)].value if (label, *col) in by_key else None for col in COLUMNS]
        expert = all(c.policy == "expert" for c in cells if c.label == label)
        opt_ins = model_opt_ins([c.summary for c in cells if c.label == label], label)  # e.g. self-reflection
        rows.append(Row(row_name(f"{OUR_LABELS.get(label, label)} (ours)", opt_ins),
                        "expert policy" if expert else backbone, "ours", values, mean_of(values)))
    return rows


def paper_rows(tables: list[str] | None) -> list[Row]:
    rows = []
    for p in PAPER_ROWS:
        if tables is not None and p.table.split()[-1] not in tables:
            continue
        cells = list(p.cells)
        computed = p.avg is None and mean_of(cells) is not None
        rows.append(Row(p.method, p.backbone, f"paper {p.table}", cells, p.avg if p.avg is not None else mean_of(cells),
                        computed))
    return rows


def caption(metric: str, rows: list[Row]) -> str:
    text = (f"{METRICS[metric]} ×100 on the seen / unseen test splits (reward 1 for a solved task, else 0, in both "
            "environments). Average: the mean of the four columns, only where all four are present, as the paper "
            f"computes it. {MISSING}: not available. Paper rows: Wang et al. (2025), transcribed in "
            "eval/paper_results.py.")
    if any(r.average_computed for r in rows):
        text += " †: Average computed here from the paper's four cells (the paper prints none)."
    return text


def to_markdown(rows: list[Row], cells: list[Cell], metric: str, skipped: list[dict[str, str]]) -> str:
    header = ["Method", "Backbone", *COLUMN_TITLES, "Average", "Source"]
    lines = ["# STeCa reproduction: results in the layout of the paper's Table 1", "", caption(metric, rows), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * 5 + "---|"]
    for r in rows:
        avg = fmt(r.average) + (" †" if r.average_computed else "")
        lines.append("| " + " | ".join([r.method, r.backbone, *map(fmt, r.cells), avg, r.source]) + " |")
    if cells:
        lines += ["", "## Where our numbers come from", "",
                  "| Row | Environment | Split | Tasks | Success % | Avg reward % | Model | Summary |",
                  "|---|---|---|---:|---:|---:|---|---|"]
        for c in sorted(cells, key=lambda c: (label_order(c.label), COLUMNS.index((c.env, c.split)))):
            model = c.model or ("expert policy" if c.policy == "expert" else MISSING)
            lines.append(f"| {c.label} | {ENV_TITLES[c.env]} | {c.split} | {c.num_tasks} | {100 * c.success_rate:.1f} "
                         f"| {100 * c.avg_reward:.1f} | {model} | {c.summary} |")
    changed = [c for c in cells if c.model_changed]
    if changed:
        lines += ["", f"Warning: {len(changed)} summaries were made with a model that changed since (evaluate it again "
                  "to report it as it is now):", ""] + [f"- {c.summary}: {c.model_changed}" for c in changed]
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}):", ""] + [f"- {s['path']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def to_latex(rows: list[Row], metric: str) -> str:
    """A booktabs table: our rows, then the paper's, grouped by the paper table they come from."""
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{llrrrrr}", r"\toprule",
             r" & & \multicolumn{2}{c}{VirtualHome} & \multicolumn{2}{c}{ALFWorld} & \\",
             r"\cmidrule(lr){3-4} \cmidrule(lr){5-6}",
             r"Method & Backbone & Seen & Unseen & Seen & Unseen & Average \\"]
    group = None
    for r in rows:
        if r.source != group:
            group = r.source
            title = "Ours" if group == "ours" else f"Paper, {group.removeprefix('paper ')}"
            lines += [r"\midrule", rf"\multicolumn{{7}}{{l}}{{\textit{{{latex_escape(title)}}}}} \\"]
        avg = fmt(r.average) + ("†" if r.average_computed else "")
        lines.append(" & ".join(latex_escape(x) for x in [r.method, r.backbone, *map(fmt, r.cells), avg]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption(metric, rows))}}}",
              r"\label{tab:steca-results}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], metric: str, path: Path) -> None:
    """Grouped bars per column (and Average): our rows and the paper's Table 1 rows; missing cells have no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [r for r in rows if r.source in ("ours", "paper Table 1")]
    groups = COLUMN_TITLES + ["Average"]
    width = 0.85 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, r in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        bars = [(g + offset, v) for g, v in enumerate(r.cells + [r.average]) if v is not None]
        label = r.method if r.source == "ours" else f"{r.method} (paper, {r.backbone})"
        drawn = ax.bar([x for x, _ in bars], [v for _, v in bars], width, label=label,
                       hatch=None if r.source == "ours" else "//", edgecolor="white", linewidth=0.5)
        ax.bar_label(drawn, fmt="%.1f", fontsize=6, padding=1, rotation=90 if len(series) > 6 else 0)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"{METRICS[metric]} ×100")
    ax.set_title("STeCa reproduction vs. the paper's Table 1")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_png(fig, path, dpi=150)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="[ENV=]RUN_DIR",
                   help="find RUN_DIR/eval/<label>/<split>/summary.json (repeatable)")
    p.add_argument("--summary", action="append", default=[], metavar="LABEL=PATH",
                   help="one summary.json or the folder holding it (repeatable)")
    p.add_argument("--metric", choices=sorted(METRICS), default="avg_reward", help="the paper's: avg_reward")
    p.add_argument("--backbone", help="our rows' base model name (default: the model the base summaries record)")
    p.add_argument("--paper_tables", nargs="*", metavar="N",
                   help="which of the paper's tables to show rows of (default: all transcribed; none: no paper rows)")
    p.add_argument("--step_accuracy", action="append", default=[], metavar="LABEL=PATH",
                   help="one eval.step_accuracy summary.json or its folder (repeatable; --run finds them itself)")
    p.add_argument("--out", required=True,
                   help="folder for report.md, report.tex, report.png, tables.png, signals.png, reading.md, report.json")
    p.add_argument("--reading", action="store_true", help="also print the plain-language reading of the signals")
    p.add_argument("--allow_different_manifests", action="store_true",
                   help="put side by side evaluations that ran other task lists or environment versions (eval/manifest.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cells, skipped = collect(args.run, args.summary, args.metric)
    for s in skipped:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    for c in cells:
        if c.model_changed:
            log.warning("%s: its model changed since the summary was made (%s)", c.summary, c.model_changed)
    backbone = args.backbone or default_backbone(cells)
    variant_rows, variant_cells = tables.table1_variant_rows(args.run, args.metric, backbone)
    rows = our_rows(cells, args.backbone) + variant_rows + paper_rows(args.paper_tables)
    others = tables.build(args.run, args.metric, backbone, args.paper_tables)
    small, collections = signals.collect(cells, args.run, args.step_accuracy)
    try:
        comparisons = compare.from_runs(args.run)
    except BadRecord as e:
        raise SystemExit(f"error: {e}") from None
    different = manifest.check_side_by_side(  # every evaluation summary behind a number of ours
        [c.summary for c in cells] + [c["summary"] for c in variant_cells] + [s for t in others for r in t.rows
        for s in r.sources if s] + [r.sources["step_accuracy"] for r in small if "step_accuracy" in r.sources],
        args.allow_different_manifests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.metric, out / "report.png")
    figures = [str(out / "report.png")]
    if tables.plot(others, out / "tables.png"):
        figures.append(str(out / "tables.png"))
    if signals.plot(small, out / "signals.png"):
        figures.append(str(out / "signals.png"))
    figures += [p for c in collections for p in c.plots]
    reading = signals.reading(small, collections, signals.base_models(small) if backbone == MISSING else backbone,
                              figures, compare.reading(comparisons))
    write_atomic(out / "report.md", "\n".join([to_markdown(rows, cells, args.metric, skipped),
                                               *([manifest.to_markdown(different)] if different else []),
                                               tables.to_markdown(others), signals.to_markdown(small, collections),
                                               compare.to_markdown(comparisons),
                                               reading]))
    write_atomic(out / "report.tex", "\n".join([to_latex(rows, args.metric), tables.to_latex(others),
                                               signals.to_latex(small, collections)]))
    write_atomic(out / "reading.md", reading)
    report = {"metric": args.metric, "scale": 100, "columns": [f"{env}/{split}" for env, split in COLUMNS],
              "caption": caption(args.metric, rows), "rows": [asdict(r) for r in rows],
              "cells": [asdict(c) for c in cells], "variant_cells": variant_cells, "skipped": skipped,
              "tables": tables.to_json(others), "different_manifests": different,
              "signals": signals.to_json(small, collections, reading),
              "comparison": compare.to_json(comparisons)}
    write_json(out / "report.json", report)
    log.info("%d summaries, %d skipped -> %s/report.{md,tex,png,json}, tables.png, signals.png, reading.md", len(cells),
             len(skipped), out)
    if args.reading:
        print(reading, end="")
    return report


if __name__ == "__main__":
    run_main(main)
