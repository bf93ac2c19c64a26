"""The run directory: where every stage of one run reads and writes. This is the only place the layout is
spelled out; stages take `--run_dir` and ask a `RunDir` for their paths (an explicit path still overrides).

    RUN_DIR/
      expert/<split>/trajectories.jsonl   expert trajectories (stage 1 data); config.json beside them
      sft/model/                     the SFT model; sft/config.json its run card
      sampling/steps_<kind>.jsonl    step records (stage 2a); sampling/config.json
      sampling/mc/rollouts_<kind>.jsonl   Monte-Carlo rollouts (stage 2b); sampling/mc/config.json
      data_collection/               step rewards, deviations, D_c / D_e / D_s, train.jsonl (stage 3)
      steca/model/                   the STeCa model (stage 4); steca/config.json
      eval/<label>/<split>/          one evaluation (stage 5): tasks/, summary.json, config.json
      eval/<label>/<split>/step_accuracy/   the model's greedy step against the expert's (eval.step_accuracy)
      pipeline/<stage>.done          the pipeline's record of a completed stage and the fingerprints it ran with
      tracking.json                  the experiment tracker of the run (eval_agent.tracking)
      servers/endpoints.txt          the base URLs of the model server the running stage uses (BACKEND=vllm|serve_hf)
      servers/logs/<label>/          its logs, per model served (base | sft | steca)

Beside every output: its fingerprint (`fingerprint_path`) and, while a stage writes it, its lock (`lock_path`).

A pipeline run over several task families keeps one RUN_DIR per family under RUN_ROOT (`run_dir_of`),
and the report beside them (`report_dir`).

    python -m eval_agent.layout --run_dir RUN_DIR sft_model       # prints a path, for shell scripts
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

EVAL_SUMMARY = "summary.json"  # what an evaluation folder (RUN_DIR/eval/<label>/<split>/ or any --out) ends with
FINGERPRINT_FILE = "fingerprint.json"  # the settings an output folder's results were made with (eval_agent/guard.py)

@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # stage 1: expert data and SFT
    def expert_data(self, split: str = "train") -> Path:
        return self.root / "expert" / split / "trajectories.jsonl"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def sft_model(self) -> Path:
        return self.sft / "model"

    # stage 2: step records and Monte-Carlo rollouts
    @property
    def sampling(self) -> Path:
        return self.root / "sampling"

    @property
    def mc(self) -> Path:
        return self.sampling / "mc"

    def steps(self, kind: str, num_shards: int = 1, shard_id: int = 0) -> Path:
        return self.sampling / _sharded(f"steps_{kind}", num_shards, shard_id)

    def rollouts(self, kind: str, num_shards: int = 1, shard_id: int = 0) -> Path:
        return self.mc / _sharded(f"rollouts_{kind}", num_shards, shard_id)

    # stage 3: data collection
    @property
    def data_collection(self) -> Path:
        return self.root / "data_collection"

    @property
    def train_set(self) -> Path:
        return self.data_collection / "train.jsonl"

    @property
    def collection_summary(self) -> Path:
        return self.data_collection / "summary.json"

    # stage 4: reinforced training
    @property
    def steca(self) -> Path:
        return self.root / "steca"

    @property
    def steca_model(self) -> Path:
        return self.steca / "model"

    # stage 5: evaluation
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def evaluation(self, label: str, split: str) -> Path:
        return self.eval / label / split

    def eval_summary(self, label: str, split: str) -> Path:
        return self.evaluation(label, split) / EVAL_SUMMARY

    def step_accuracy(self, label: str, split: str) -> Path:
        """eval.step_accuracy's folder, inside the evaluation of the same model and split."""
        return self.evaluation(label, split) / "step_accuracy"

    # the tracker the training stages chose (eval_agent.tracking), for the stages without a Trainer
    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    # the pipeline's stage markers
    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    def marker(self, stage: str) -> Path:
        return self.pipeline / f"{stage}.done"

    # the model servers the pipeline starts for a stage (scripts/serve_lib.sh)
    @property
    def servers(self) -> Path:
        return self.root / "servers"

    @property
    def server_endpoints(self) -> Path:
        return self.servers / "endpoints.txt"

    def server_logs(self, label: str) -> Path:
        return self.servers / "logs" / label


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


def card_dir(model_dir: str | Path) -> Path:
    """Where a training stage writes its run card: beside the model folder, never into the model's own config.json."""
    return Path(model_dir).parent


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
    print(path)
    return str(path)


if __name__ == "__main__":
    main()
