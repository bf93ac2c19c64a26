"""The run directory: where every stage of one run reads and writes. This is the only place the layout is
spelled out; stages take `--run_dir` and ask a `RunDir` for their paths (an explicit path still overrides).

    RUN_DIR/
      expert/<split>/trajectories.jsonl   expert trajectories (stage 1 data); config.json beside them
      sft/model/                     the SFT model, with its run card run_card.json and tensorboard/ in it
      sampling/steps_<kind>.jsonl    step records (stage 2a); sampling/config.json
      sampling/mc/rollouts_<kind>.jsonl   Monte-Carlo rollouts (stage 2b); sampling/mc/config.json
      data_collection/               step rewards, deviations, D_c / D_e / D_s, train.jsonl (stage 3)
      steca/model/                   the STeCa model (stage 4), likewise
      eval/<label>/<split>/          one evaluation (stage 5): tasks/, summary.json, config.json
      eval/<label>/<split>/step_accuracy/   the model's greedy step against the expert's (eval.step_accuracy)
      pipeline/<stage>.done          the pipeline's record of a completed stage and the fingerprints it ran with
      tracking.json                  the experiment tracker of the run (eval_agent.tracking)
      servers/endpoints.txt          the base URLs of the model server the running stage uses (BACKEND=vllm|serve_hf)
      servers/logs/<label>/          its logs, per model served (base | sft | steca)
      servers/shard<i>of<n>/         a sampling shard's own servers (endpoints.txt, logs/) in a Slurm array task
      eval/<label>/<split>/calibration/     the model run from deviated and clean histories (eval.calibration)
      eval/<label>/<split>/calibration_next_action/   its next step after each deviated history (--probe next_action)
      variants/<name>/               a variant of this run (eval_agent/variants.py): a run directory of its own

A variant's folder holds `variant.json`, naming its base run (`base`, relative to the variant's folder) and the
pipeline stages it shares with it (`shares`). The paths of a shared stage are the base run's, so every stage reads
the base run's results where the variant shares them and writes its own results into the variant's folder; the
evaluations of the models a variant shares (base and SFT when it shares SFT) are the base run's too.

Beside every output: its fingerprint (`fingerprint_path`) and, while a stage writes it, its lock (`lock_path`).

A pipeline run over several task families keeps one RUN_DIR per family under RUN_ROOT (`run_dir_of`),
and the report beside them (`report_dir`).

    python -m eval_agent.layout --run_dir RUN_DIR sft_model       # prints a path, for shell scripts
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from eval_agent.cli import run_main

EVAL_SUMMARY = "summary.json"  # what an evaluation folder (RUN_DIR/eval/<label>/<split>/ or any --out) ends with
FINGERPRINT_FILE = "fingerprint.json"  # the settings an output folder's results were made with (eval_agent/guard.py)
RUN_CARD = "config.json"  # a stage's run card (eval_agent/run_card.py), beside or in its output
TRAINING_CARD = "run_card.json"  # a training stage's, in its model folder (whose config.json is the model's)
TRACKING_DIR = "tensorboard"  # TensorBoard's event files, in or beside a stage's output (eval_agent/tracking.py)
VARIANT_FILE = "variant.json"  # in a variant's folder: its base run and the stages it shares with it
# The pipeline's stages, in order (scripts/run_pipeline.sh; RUN_DIR/pipeline/<stage>.done).
STAGES = ("expert_data", "sft", "steps", "mc", "data_collection", "steca", "eval")
LABELS = ("base", "sft", "steca")  # the models a run evaluates
MODEL_STAGE = {"base": "sft", "sft": "sft", "steca": "steca"}  # a label's evaluation is shared with its model's stage


@dataclass(frozen=True)
class RunDir:
    root: Path
    base: "RunDir | None" = field(default=None, compare=False)  # a variant's base run
    shares: frozenset[str] = frozenset()  # the stages a variant shares with its base run

    def __init__(self, root: str | Path):
        root = Path(root)
        object.__setattr__(self, "root", root)
        base, shares = None, frozenset()
        spec = root / VARIANT_FILE
        if spec.is_file():
            try:
                data = json.loads(spec.read_text())
                base, shares = RunDir(os.path.normpath(root / data["base"])), frozenset(data["shares"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"error: {spec}: not a variant description ({e}); "
                                 "`python -m eval_agent.variants init` writes it") from None
            unknown = shares - set(STAGES)
            if unknown:
                raise SystemExit(f"error: {spec}: field 'shares' names no stage: {sorted(unknown)} (stages: {STAGES})")
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "shares", shares)

    def _of(self, stage: str) -> "RunDir":
        """The run whose results a stage's paths point at: the base run's for a stage the variant shares."""
        return self.base._of(stage) if self.base is not None and stage in self.shares else self

    def shared_with(self, stage: str) -> Path | None:
        """The run directory a variant shares `stage` with (None: the stage is its own)."""
        run = self._of(stage)
        return None if run is self else run.root

    def _evaluation_run(self, label: str) -> "RunDir":
        """The run whose evaluation of `label` this is: a variant's of the models it shares are the base run's,
        unless the variant shares every training stage (it diverges at the evaluation itself)."""
        if self.base is None or label not in MODEL_STAGE or "steca" in self.shares:
            return self
        return self._of(MODEL_STAGE[label])

    @property
    def eval_labels(self) -> list[str]:
        """The models whose evaluations are this run's own (a variant shares those of the models it shares)."""
        return [label for label in LABELS if self._evaluation_run(label) is self]

    # stage 1: expert data and SFT
    def expert_data(self, split: str = "train") -> Path:
        return self._of("expert_data").root / "expert" / split / "trajectories.jsonl"

    @property
    def sft(self) -> Path:
        return self._of("sft").root / "sft"

    @property
    def sft_model(self) -> Path:
        return self.sft / "model"

    # stage 2: step records and Monte-Carlo rollouts
    @property
    def sampling(self) -> Path:
        return self._of("steps").root / "sampling"

    @property
    def mc(self) -> Path:
        return self._of("mc").root / "sampling" / "mc"

    def steps(self, kind: str, num_shards: int = 1, shard_id: int = 0) -> Path:
        return self.sampling / _sharded(f"steps_{kind}", num_shards, shard_id)

    def rollouts(self, kind: str, num_shards: int = 1, shard_id: int = 0) -> Path:
        return self.mc / _sharded(f"rollouts_{kind}", num_shards, shard_id)

    # stage 3: data collection
    @property
    def data_collection(self) -> Path:
        return self._of("data_collection").root / "data_collection"

    @property
    def train_set(self) -> Path:
        return self.data_collection / "train.jsonl"

    @property
    def collection_summary(self) -> Path:
        return self.data_collection / "summary.json"

    # stage 4: reinforced training
    @property
    def steca(self) -> Path:
        return self._of("steca").root / "steca"

    @property
    def steca_model(self) -> Path:
        return self.steca / "model"

    # stage 5: evaluation
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def evaluation(self, label: str, split: str) -> Path:
        """A variant's evaluation of a model it shares (base and SFT, when it shares SFT) is the base run's."""
        return self._evaluation_run(label).eval / label / split

    def eval_summary(self, label: str, split: str) -> Path:
        return self.evaluation(label, split) / EVAL_SUMMARY

    def step_accuracy(self, label: str, split: str) -> Path:
        """eval.step_accuracy's folder, inside the evaluation of the same model and split."""
        return self.evaluation(label, split) / "step_accuracy"

    def calibration(self, label: str, split: str, probe: str = "episode") -> Path:
        """eval.calibration's folder: the model run from deviated and clean histories of the split (Figure 4), or
        (probe next_action) its next step after each deviated history."""
        return self.evaluation(label, split) / ("calibration" if probe == "episode" else f"calibration_{probe}")

    # the tracker the training stages chose (eval_agent.tracking), for the stages without a Trainer
    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    # the pipeline's stage markers
    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    def marker(self, stage: str) -> Path:
        """A shared stage's marker is the base run's: the variant never runs that stage itself."""
        return self._of(stage).pipeline / f"{stage}.done"

    # variants of this run (eval_agent/variants.py)
    @property
    def variants(self) -> Path:
        return self.root / "variants"

    def variant(self, name: str) -> Path:
        return self.variants / name

    # the model servers the pipeline starts for a stage (scripts/serve_lib.sh)
    @property
    def servers(self) -> Path:
        return self.root / "servers"

    @property
    def server_endpoints(self) -> Path:
        return self.servers / "endpoints.txt"

    def server_logs(self, label: str) -> Path:
        return self.servers / "logs" / label

    def shard_servers(self, num_shards: int, shard_id: int) -> Path:
        """The servers of one sampling shard run apart (scripts/slurm/mc_array.sbatch): their endpoints and logs."""
        return self.servers / f"shard{shard_id}of{num_shards}"


def _sharded(stem: str, num_shards: int, shard_id: int) -> str:
    """<stem>.jsonl, or <stem>.shard<i>of<n>.jsonl for one shard of a sharded run."""
    return f"{stem}.shard{shard_id}of{num_shards}.jsonl" if num_shards > 1 else f"{stem}.jsonl"


def run_dir_of(run_root: str | Path, task_family: str) -> RunDir:
    """The run directory of one task family in a pipeline run over several."""
    return RunDir(Path(run_root) / task_family)


def report_dir(run_root: str | Path) -> Path:
    return Path(run_root) / "report"


def fingerprint_path(output: str | Path, folder: bool) -> Path:
    """Where the settings an output was made with are recorded: inside an output folder, beside an output file
    (`steps_expert.jsonl.fingerprint.json`), so they move aside together with the results."""
    output = Path(output)
    return output / FINGERPRINT_FILE if folder else output.with_name(f"{output.name}.fingerprint.json")


def lock_path(output: str | Path) -> Path:
    """The lock of an output's one writer: beside it (`sft/model.lock`, `steps_expert.jsonl.lock`), so that
    moving the output aside leaves the lock where the next writer looks."""
    output = Path(output)
    return output.with_name(f"{output.name}.lock")


def main(argv: list[str] | None = None) -> str:
    """Print one path of the layout, for shell scripts (which never spell a path out themselves)."""
    p = argparse.ArgumentParser(description="Print a path of the run directory layout.")
    p.add_argument("--run_root", help="with --task_family: the run directory of that family; alone: the report folder")
    p.add_argument("--task_family")
    p.add_argument("--run_dir", help="with WHAT: a path of this run directory")
    p.add_argument("what", nargs="?", help="a RunDir property or method, e.g. sft_model, marker, evaluation")
    p.add_argument("args", nargs="*", help="the method's arguments, e.g. `evaluation sft seen`")
    a = p.parse_args(argv)
    if a.run_root:
        path = run_dir_of(a.run_root, a.task_family).root if a.task_family else report_dir(a.run_root)
    else:
        attr = getattr(RunDir(a.run_dir or "."), a.what or "", None)
        if not a.run_dir or attr is None or a.what.startswith("_"):
            raise SystemExit(f"error: the run directory has no {a.what!r} (or no --run_dir given)")
        path = attr(*a.args) if callable(attr) else attr
    text = " ".join(path) if isinstance(path, list) else "" if path is None else str(path)
    print(text)
    return text


if __name__ == "__main__":
    run_main(main)
