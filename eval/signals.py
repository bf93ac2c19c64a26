"""The report's second part: signals that move at small scale, and a plain-language reading of them.

A 135M model on a handful of tasks solves next to none, so the paper's metric alone cannot say whether SFT
or STeCa training changed anything. Beside it (never in its place), per environment, split and model:
- success as a count k/n with its Wilson 95% interval (from eval.evaluate's summary.json);
- step accuracy and the valid-action share, counts with intervals (eval.step_accuracy's summary.json);
and per environment, from the data-collection stage (RUN_DIR/data_collection/summary.json): deviations
found, calibrated rows, the mean step reward of expert against explored steps. docs/metrics.md defines each.

The reading compares base -> SFT and SFT -> STeCa on each signal: a change is real when the 95% interval
of the difference (Newcombe's, from the two Wilson intervals) excludes 0, else it is "no difference we can
tell". Everything it says is computed from the numbers shown. A missing input is shown as missing, never an error; a present
but malformed one is an error naming the file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from eval.formatting import ENV_TITLES, MISSING, OUR_LABELS, SPLIT_NAMES, label_order, latex_escape, save_png
from eval.paper_results import COLUMNS, PAPER_ROWS
from eval.summaries import fail, load_json
from eval_agent.layout import EVAL_SUMMARY, RunDir
from eval_agent.opt_ins import model_opt_ins, row_name, run_opt_ins
from eval_agent.stats import difference_interval, format_share, wilson_interval

COMPARED = (("base", "sft", "SFT"), ("sft", "steca", "STeCa training"))  # (before, after, what changed it)
METRIC_NAMES = {"success": "success", "step_accuracy": "step accuracy", "valid": "the valid-action share"}


@dataclass
class Count:
    """k of n, with its share and Wilson 95% interval."""

    k: int
    n: int

    @property
    def share(self) -> float:
        return self.k / self.n

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def text(self) -> str:
        """`3/12 = 0.25 [0.09, 0.53]`, in the tables and the reading alike."""
        return format_share(self.k, self.n)


@dataclass
class Signals:
    """One model on one environment and split."""

    label: str
    env: str
    split: str
    success: Count | None = None
    step_accuracy: Count | None = None
    valid: Count | None = None
    no_action: int | None = None  # replies without an `Action:` among the scored steps
    model: str | None = None  # the model the step-accuracy summary records
    sources: dict[str, str] = field(default_factory=dict)  # signal -> file it came from
    opt_ins: list[str] = field(default_factory=list)  # what the runs that made the model opted into (opt_ins.py)

    def add_opt_ins(self, labels: list[str]) -> None:
        self.opt_ins += [x for x in labels if x not in self.opt_ins]

    @property
    def title(self) -> str:
        """`STeCa`, `STeCa [self-reflection]`: the model's name and the labels Table 1's row carries too."""
        return row_name(method(self.label), self.opt_ins)

    def get(self, metric: str) -> Count | None:
        return getattr(self, metric)


@dataclass
class Collection:
    """What the data-collection stage of one environment found."""

    env: str
    source: str
    explored_steps: int
    judged: int
    deviated: int
    calibrated_rows: int
    calibrated_kept: int
    train_rows: int
    train_by_set: dict[str, int]
    expert_reward: float | None  # mean MC step reward of the expert's steps
    expert_steps: int
    explored_reward: float | None  # ... of the SFT policy's own (explored) steps
    explored_steps_with_reward: int
    plots: list[str]


# ---- reading the inputs -------------------------------------------------------------------------------


def _count(path: Path, summary: dict[str, Any], k_field: str, n_field: str) -> Count:
    k, n = summary.get(k_field), summary.get(n_field)
    for name, v in ((k_field, k), (n_field, n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            fail(path, f"field {name!r} is {v!r}, expected a count")
    if k > n:
        fail(path, f"field {k_field!r} is {k}, more than {n_field!r} ({n})")
    return Count(k, n)


def read_step_accuracy(path: Path) -> tuple[str, str, Count | None, Count | None, int, str | None]:
    """(env, split, step accuracy, valid share, replies without an action, model) from eval.step_accuracy's
    summary.json; the counts are None when no step was scored."""
    summary = load_json(path)
    for name in ("env", "split", "steps", "match", "valid"):
        if name not in summary:
            fail(path, f"missing field {name!r} (not a summary.json of eval.step_accuracy?)")
    if summary["env"] not in ENV_TITLES:
        fail(path, f"field 'env' is {summary['env']!r}; the table has {sorted(ENV_TITLES)}")
    if summary["split"] not in SPLIT_NAMES:
        fail(path, f"field 'split' is {summary['split']!r}; the table has the test splits seen and unseen")
    match, valid = _count(path, summary, "match", "steps"), _count(path, summary, "valid", "steps")
    if match.k > valid.k:
        fail(path, f"field 'match' is {match.k}, more than 'valid' ({valid.k}): a match is always a valid action")
    scored = match.n > 0
    return (summary["env"], SPLIT_NAMES[summary["split"]], match if scored else None, valid if scored else None,
            int(summary.get("no_action") or 0), summary.get("model"))


def mean_reward(curve: Any, path: Path, kind: str) -> tuple[float | None, int]:
    """The mean step reward over all steps of one kind, from the per-position curve (bin means and counts)."""
    if not isinstance(curve, dict) or not isinstance(curve.get("mean"), list) or not isinstance(curve.get("count"), list):
        fail(path, f"field 'step_reward_by_position.{kind}' needs lists 'mean' and 'count'")
    total = sum(c for c in curve["count"])
    if not total:
        return None, 0
    return sum(m * c for m, c in zip(curve["mean"], curve["count"]) if c) / total, total


def read_collection(path: Path, env: str) -> Collection:
    """The figures of data_collection.build's summary.json."""
    s = load_json(path)
    try:
        dev, sets, train, curves = s["deviation"], s["sets"], s["train"], s["step_reward_by_position"]
        cal = sets["calibration"]
        numbers = (dev["explored_steps"], dev["judged"], dev["deviated"], cal["rows"], cal["kept"], train["rows"])
    except (KeyError, TypeError) as e:
        fail(path, f"missing field {e} (not a summary.json of data_collection.build?)")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in numbers):
        fail(path, f"the counts deviation.explored_steps/judged/deviated, sets.calibration.rows/kept, train.rows must be "
                   f"counts, got {numbers}")
    expert, n_expert = mean_reward(curves.get("expert"), path, "expert")
    explored, n_explored = mean_reward(curves.get("explore"), path, "explore")
    plots = sorted(str(p) for p in (path.parent / "plots").glob("*.png"))
    return Collection(env, str(path), *numbers, dict(train.get("by_set") or {}), expert, n_expert, explored,
                      n_explored, plots)


def step_accuracy_summaries(run_dir: str | Path) -> list[tuple[str, Path]]:
    """(label, summary.json) of every step-accuracy run on a test split in RUN_DIR/eval/."""
    rd = RunDir(run_dir)
    labels = sorted(p.name for p in rd.eval.iterdir() if p.is_dir()) if rd.eval.is_dir() else []
    return [(label, path) for label in labels for split in ("seen", "unseen")
            if (path := rd.step_accuracy(label, split) / EVAL_SUMMARY).is_file()]


def collect(cells: list[Any], runs: list[str], step_accuracy: list[str]) -> tuple[list[Signals], list[Collection]]:
    """Signals of every (label, env, split) the report knows of: success from its cells (eval summaries),
    step accuracy from RUN_DIR/eval/<label>/<split>/step_accuracy/ of each `--run` and from `--step_accuracy
    LABEL=PATH`; data collection from RUN_DIR/data_collection/ of each `--run`."""
    table: dict[tuple[str, str, str], Signals] = {}

    def at(label: str, env: str, split: str) -> Signals:
        return table.setdefault((label, env, split), Signals(label, env, split))

    for c in cells:
        k = round(c.success_rate * c.num_tasks)
        row = at(c.label, c.env, c.split)
        row.success, row.sources["success"] = Count(k, c.num_tasks), c.summary
        row.add_opt_ins(model_opt_ins([c.summary], c.label))

    def add_step_accuracy(label: str, path: Path, run: RunDir | None = None) -> None:
        env, split, match, valid, no_action, model = read_step_accuracy(path)
        row = at(label, env, split)
        row.add_opt_ins(run_opt_ins(run, label) if run else [])
        if "step_accuracy" in row.sources:
            fail(path, f"a second step-accuracy summary for {label} {env}/{split} "
                       f"(the first: {row.sources['step_accuracy']})")
        row.step_accuracy, row.valid, row.no_action, row.model = match, valid, no_action, model
        row.sources["step_accuracy"] = str(path)

    collections = []
    for run in runs:
        env, _, folder = run.rpartition("=")
        rd = RunDir(folder)
        for label, path in step_accuracy_summaries(folder):
            add_step_accuracy(label, path, rd)
        summary = rd.collection_summary
        card = summary.with_name("config.json")  # the stage's run card beside its summary
        args = (load_json(card).get("args") if card.is_file() else None) or {}
        family = env or (args.get("task_family") if isinstance(args, dict) else None)
        if summary.is_file() and family in ENV_TITLES:
            collections.append(read_collection(summary, family))
    for spec in step_accuracy:
        label, sep, where = spec.partition("=")
        if not sep or not label or not where:
            raise SystemExit(f"error: --step_accuracy {spec}: expected LABEL=PATH")
        path = Path(where) / EVAL_SUMMARY if Path(where).is_dir() else Path(where)
        if not path.is_file():
            raise SystemExit(f"error: --step_accuracy {spec}: {path} not found")
        add_step_accuracy(label, path)

    envs = {env for _, env, _ in table}
    for env, split in COLUMNS:  # base, SFT and STeCa always have their rows, missing cells and all
        if env in envs:
            for label in OUR_LABELS:
                at(label, env, split)
    order = {col: i for i, col in enumerate(COLUMNS)}
    rows = sorted(table.values(), key=lambda r: (order[(r.env, r.split)], label_order(r.label)))
    return rows, sorted(collections, key=lambda c: list(ENV_TITLES).index(c.env))


# ---- tables -------------------------------------------------------------------------------------------

CAPTION = ("Signals at small scale (docs/metrics.md). Success: tasks solved, k/n = share [Wilson 95% interval]. "
           "Step accuracy: on the expert trajectories of the split, the share of steps where the model's greedy "
           "action after the expert's prefix is the expert's action (and the environment accepts it). Valid actions: "
           f"the share of those steps where the environment accepted the model's action. {MISSING}: not measured.")
COLLECTION_CAPTION = ("Data collection (stage 3). Deviations: explored steps judged deviated, of those judged. "
                      "Calibrated rows: D_c rows written (kept in training). Mean step reward: the mean Monte-Carlo "
                      "success after a step, over the expert's steps and over the SFT policy's own explored steps "
                      "(n steps each).")


def method(label: str) -> str:
    return OUR_LABELS.get(label, label)


def cell(c: Count | None) -> str:
    return c.text() if c else MISSING


def reward_text(mean: float | None, n: int) -> str:
    return f"{mean:.2f} (n={n})" if mean is not None else MISSING


def collection_cells(c: Collection) -> list[str]:
    return [ENV_TITLES[c.env], f"{c.deviated}/{c.judged}", f"{c.calibrated_rows} ({c.calibrated_kept})",
            str(c.train_rows), reward_text(c.expert_reward, c.expert_steps),
            reward_text(c.explored_reward, c.explored_steps_with_reward)]


def to_markdown(rows: list[Signals], collections: list[Collection]) -> str:
    lines = ["## Signals at small scale", "", CAPTION, ""]
    if rows:
        lines += ["| Environment | Split | Model | Success | Step accuracy | Valid actions |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {ENV_TITLES[r.env]} | {r.split} | {r.title} | {cell(r.success)} | {cell(r.step_accuracy)} "
                  f"| {cell(r.valid)} |" for r in rows]
    else:
        lines.append("No evaluation or step-accuracy summary found.")
    lines += ["", "## Data collection", "", COLLECTION_CAPTION, ""]
    if collections:
        lines += ["| Environment | Deviations | Calibrated rows (kept) | Training rows | Mean step reward, expert "
                  "| Mean step reward, explored |", "|---|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(collection_cells(c)) + " |" for c in collections]
    else:
        lines.append(f"{MISSING} (no RUN_DIR/data_collection/summary.json found)")
    return "\n".join(lines) + "\n"


def to_latex(rows: list[Signals], collections: list[Collection]) -> str:
    def tex(text: str) -> str:
        return latex_escape(text).replace("[", "{[}").replace("]", "{]}")

    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{lllrrr}", r"\toprule",
             r"Environment & Split & Model & Success & Step accuracy & Valid actions \\", r"\midrule"]
    lines += [" & ".join(tex(x) for x in [ENV_TITLES[r.env], r.split, r.title, cell(r.success),
                                          cell(r.step_accuracy), cell(r.valid)]) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex(CAPTION)}}}", r"\label{tab:steca-signals}",
              r"\end{table}"]
    if collections:
        lines += ["", r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{lrrrrr}", r"\toprule",
                  r"Environment & Deviations & Calibrated (kept) & Training rows & Step reward, expert & "
                  r"Step reward, explored \\", r"\midrule"]
        lines += [" & ".join(tex(x) for x in collection_cells(c)) + r" \\" for c in collections]
        lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex(COLLECTION_CAPTION)}}}",
                  r"\label{tab:steca-data-collection}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_json(rows: list[Signals], collections: list[Collection], reading_text: str) -> dict[str, Any]:
    def count(c: Count | None) -> dict[str, Any] | None:
        return None if c is None else {"k": c.k, "n": c.n, "share": c.share, "ci95": list(c.ci)}

    return {"rows": [{"label": r.label, "env": r.env, "split": r.split, "success": count(r.success),
                      "step_accuracy": count(r.step_accuracy), "valid": count(r.valid), "no_action": r.no_action,
                      "opt_ins": r.opt_ins, "sources": r.sources} for r in rows],
            "data_collection": [asdict(c) for c in collections], "reading": reading_text}


def plot(rows: list[Signals], path: Path) -> bool:
    """Success, step accuracy and valid share with their intervals, one panel each; False when nothing to draw."""
    metrics = [m for m in ("success", "step_accuracy", "valid") if any(r.get(m) for r in rows)]
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [col for col in COLUMNS if any((r.env, r.split) == col for r in rows)]
    labels = sorted({r.label for r in rows}, key=label_order)
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, label in enumerate(labels):
            xs, ys, err = [], [], [[], []]
            for g, (env, split) in enumerate(groups):
                c = next((r.get(metric) for r in rows if (r.label, r.env, r.split) == (label, env, split)), None)
                if c:
                    lo, hi = c.ci
                    xs.append(g + (i - (len(labels) - 1) / 2) * width)
                    ys.append(c.share)
                    err[0].append(c.share - lo)
                    err[1].append(hi - c.share)
            ax.bar(xs, ys, width, yerr=err, capsize=3, color=f"C{i}", ecolor=f"C{i}", label=method(label))
        ax.set_xticks(range(len(groups)), [f"{ENV_TITLES[e]}\n{s}" for e, s in groups], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(METRIC_NAMES[metric].removeprefix("the ").capitalize(), fontsize=10)
    axes[0][0].set_ylabel("share, with Wilson 95% interval")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=130)
    return True


# ---- the reading --------------------------------------------------------------------------------------


def missing(rows: list[Signals]) -> list[str]:
    """Per environment and split, the signals of base, SFT and STeCa that were not measured."""
    out = []
    for env, split in COLUMNS:
        ours = [r for r in rows if (r.env, r.split) == (env, split) and r.label in OUR_LABELS]
        parts = []
        for metric, name in (("success", "success"), ("step_accuracy", "step accuracy")):
            models = [method(r.label) for r in ours if r.get(metric) is None]
            if models:
                parts.append(f"{name} of {', '.join(models)}" if len(models) < len(OUR_LABELS) else f"{name} of any model")
        if ours and parts:
            out.append(f"{ENV_TITLES[env]} {split}: " + "; ".join(parts))
    return out


def comparisons(rows: list[Signals]) -> tuple[list[str], list[str]]:
    """(what moved, what did not), one sentence each, over the pairs where both sides were measured."""
    by_key = {(r.label, r.env, r.split): r for r in rows}
    moved, still = [], []
    for env, split in COLUMNS:
        where = f"{ENV_TITLES[env]} {split}"
        for before, after, cause in COMPARED:
            a, b = by_key.get((before, env, split)), by_key.get((after, env, split))
            for metric, name in METRIC_NAMES.items():
                ca, cb = a.get(metric) if a else None, b.get(metric) if b else None
                if ca is None or cb is None:
                    continue
                lo, hi = difference_interval(cb.k, cb.n, ca.k, ca.n)
                diff = f"difference {cb.share - ca.share:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                if lo > 0 or hi < 0:
                    verb = "raised" if lo > 0 else "lowered"
                    moved.append(f"{cause} {verb} {name} on {where} from {ca.text()} to {cb.text()} ({diff}).")
                else:
                    still.append(f"{name} on {where}, {method(before)} {ca.text()} vs {method(after)} {cb.text()}: "
                                 f"no difference we can tell ({diff} holds 0).")
    return moved, still


def collection_sentences(collections: list[Collection]) -> list[str]:
    out = []
    for c in collections:
        text = (f"{ENV_TITLES[c.env]}: data collection judged {c.judged} of {c.explored_steps} explored steps and found "
                f"{c.deviated} deviations; {c.calibrated_rows} calibrated rows were written ({c.calibrated_kept} kept), "
                f"and STeCa trained on {c.train_rows} rows")
        text += f" ({', '.join(f'{k} {v}' for k, v in sorted(c.train_by_set.items()))})." if c.train_by_set else "."
        if c.expert_reward is not None and c.explored_reward is not None:
            text += (f" Mean step reward: {c.expert_reward:.2f} after the expert's steps (n={c.expert_steps}) against "
                     f"{c.explored_reward:.2f} after the SFT policy's own (n={c.explored_steps_with_reward})")
            if c.expert_reward > c.explored_reward:
                text += ": the expert's steps led to success more often, the gap calibration learns from."
            elif c.expert_reward == c.explored_reward == 0:
                text += ": no rollout succeeded from either, so no step reward could tell a good step from a bad one."
            else:
                text += ": the policy's own steps did as well as the expert's, so there was little to correct."
        else:
            text += " No mean step reward (no Monte-Carlo rollout was scored)."
        if c.calibrated_kept == 0:
            text += " With no calibrated row, STeCa's training could differ from SFT only through its other rows."
        out.append(text)
    return out


def scale_sentences(rows: list[Signals], backbone: str) -> list[str]:
    """Why these numbers cannot be the paper's: the model, and how little a few tasks can tell."""
    paper = next(p for p in PAPER_ROWS if p.table == "Table 1" and p.method == "STeCa")
    out = [f"Our backbone is {backbone}; the paper's is {paper.backbone}, trained and evaluated on every task of the "
           "splits."]
    with_success = [r for r in rows if r.success]
    if with_success:
        widest = max(with_success, key=lambda r: r.success.ci[1] - r.success.ci[0])
        lo, hi = widest.success.ci
        out.append(f"Each success cell rests on {count_range([r.success.n for r in with_success])} tasks: "
                   f"{widest.success.k}/{widest.success.n} ({method(widest.label)}, {ENV_TITLES[widest.env]} "
                   f"{widest.split}) is consistent with any success rate from {lo:.2f} to {hi:.2f}.")
        steca = {(r.env, r.split): r.success for r in with_success if r.label == "steca"}
        below, above, inside = [], [], []
        for (env, split), value in zip(COLUMNS, paper.cells):
            c = steca.get((env, split))
            if c is None or value is None:
                continue
            text = f"{ENV_TITLES[env]} {split} (paper {value:.1f}, ours {c.text()})"
            (below if c.ci[1] < value / 100 else above if c.ci[0] > value / 100 else inside).append(text)
        if below:
            out.append("The paper's STeCa success lies above our interval on " + "; ".join(below) + ".")
        if above:
            out.append("The paper's STeCa success lies below our interval on " + "; ".join(above) + ".")
        if inside:
            out.append("Our interval still holds the paper's STeCa success on " + "; ".join(inside)
                       + ": too few tasks to tell our numbers from the paper's.")
    steps = [r.step_accuracy.n for r in rows if r.step_accuracy]
    if steps and with_success:
        out.append(f"Step accuracy scores every step of the expert trajectories ({count_range(steps)} steps a cell, "
                   f"against {count_range([r.success.n for r in with_success])} tasks for success), so its intervals "
                   "are narrower and it moves before success does.")
    return out


def base_models(rows: list[Signals]) -> str:
    """The base model's name as the step-accuracy summaries record it (when no evaluation says it)."""
    return ", ".join(sorted({Path(r.model).name for r in rows if r.label == "base" and r.model})) or MISSING


def reading(rows: list[Signals], collections: list[Collection], backbone: str, figures: Iterable[str],
            paired: Iterable[str] = ()) -> str:
    """The plain-language reading of the signals table, from its numbers; `paired`: eval.compare's sentences, the
    models compared item by item on the items they share."""
    moved, still = comparisons(rows)
    lines = ["## Reading", ""]
    if paired := list(paired):
        lines += ["Paired comparison, item by item on the same items (eval.compare):"] + [f"- {s}" for s in paired]
        lines += [""]
    if moved or still:
        lines += ["What moved (the 95% interval of the difference excludes 0):"]
        lines += [f"- {s}" for s in moved] or ["- nothing: no signal changed by more than its intervals allow."]
        lines += ["", "What did not move:"]
        lines += [f"- {s[0].upper()}{s[1:]}" for s in still] or ["- nothing: every comparison made found a difference."]
    else:
        lines += ["Nothing to compare: no signal was measured for two of base, SFT and STeCa on the same environment "
                  "and split."]
    if gaps := missing(rows):
        lines += ["", "Not measured, so not compared:"] + [f"- {s}." for s in gaps]
    lines += ["", "Data collection:"]
    lines += [f"- {s}" for s in collection_sentences(collections)] or [f"- {MISSING} (not found)."]
    lines += ["", "Why this cannot show the paper's numbers:"] + [f"- {s}" for s in scale_sentences(rows, backbone)]
    figures = list(figures)
    if figures:
        lines += ["", "Charts and plots: " + ", ".join(figures) + "."]
    return "\n".join(lines) + "\n"


def count_range(counts: list[int]) -> str:
    """'106 to 114', or '12' when every cell has the same count."""
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo} to {hi}"
