"""The pre-flight check: one test per failure class, the whole report at once, and the README's paper
command with a batch / NPROC mismatch stopped by scripts/run_pipeline.sh in seconds, before any stage."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from eval_agent import preflight
from eval_agent.preflight import Hub, Report, batch_problem, check_batches, check_disk, check_model, check_reflection
from eval_agent.variants import resolve
from helpers import fake_nvidia_smi, fake_python_env

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"


def run(env: dict[str, str], families=("alfworld",), gpus: int = 0, tmp: Path | None = None) -> Report:
    base = {"PRESET": "tiny", "BASE_MODEL": str(SMOLLM2), "HF_HUB_OFFLINE": "1"}
    return preflight.preflight({**base, **env}, list(families), str(tmp or REPO / "outputs"), gpus=gpus)


def only(report: Report, needle: str) -> str:
    hits = [p for p in report.problems if needle in p]
    assert len(hits) == 1, report.text("test")
    return hits[0]


def test_tiny_defaults_pass(smollm2_dir):
    report = run({}, families=("alfworld", "virtualhome"))
    assert report.problems == [], report.text("test")


def test_paper_on_the_generated_data_is_an_error(smollm2_dir):
    report = run({"PRESET": "paper"}, families=("alfworld", "virtualhome"))
    alf = only(report, "alfworld data under")
    assert "train 24" in alf and "PRESET=paper needs the official sets (train 3553, valid_seen 140, valid_unseen 134)" in alf
    assert "ALFWORLD_DATA=data/official/alfworld" in alf
    assert "seen 247, unseen 247" in only(report, "virtualhome data under")


def test_missing_data(tmp_path, smollm2_dir):
    assert "no json_2.1.1 folder" in only(run({"ALFWORLD_DATA": str(tmp_path)}), "alfworld data")


def test_unreadable_published_inputs_are_named(tmp_path, smollm2_dir):
    (tmp_path / "sft.json").write_text(json.dumps([{"id": "a", "conversations": [{"role": "user"}]}]))
    (tmp_path / "inst.txt").write_text("")
    report = run({"EXPERT_SOURCE": str(tmp_path / "sft.json"), "INSTRUCTION_FROM": str(tmp_path / "inst.txt"),
                  "ICL_FROM": str(tmp_path / "none.json")})
    assert "sft.json: row 0: turn 0 has no field 'value'" in only(report, "EXPERT_SOURCE=")
    assert "the instruction file is empty" in only(report, "INSTRUCTION_FROM=")
    assert "No such file" in only(report, "ICL_FROM=")


def test_expert_file_with_both_families(smollm2_dir):
    report = run({"EXPERT_SOURCE": str(REPO / "data" / "virtualhome" / "vh_train_trajectories.jsonl")},
                 families=("alfworld", "virtualhome"))
    assert "run the families one at a time" in only(report, "TASK_FAMILY=both")


def test_base_model_unreachable(tmp_path, smollm2_dir):
    assert "no such model folder" in only(run({"BASE_MODEL": str(tmp_path / "nope")}), "BASE_MODEL=")
    (tmp_path / "notok").mkdir()
    assert "has no tokenizer" in only(run({"BASE_MODEL": str(tmp_path / "notok")}), "BASE_MODEL=")
    hub = run({"BASE_MODEL": "meta-llama/Not-A-Model-xyz"})
    assert "not in the local hub cache, and HF_HUB_OFFLINE is set" in only(hub, "BASE_MODEL=")
    embedder = run({"EMBEDDER": "bert-cls", "EMBEDDER_PATH": str(tmp_path / "bert")})
    assert "no such model folder" in only(embedder, "EMBEDDER=bert-cls model")


def test_chat_format(tmp_path, smollm2_dir):
    assert "must be one of" in only(run({"CHAT_FORMAT": "chatml"}), "CHAT_FORMAT=")
    plain = tmp_path / "plain"  # a base model whose tokenizer has no chat template
    plain.mkdir()
    (plain / "tokenizer.json").write_text((smollm2_dir / "tokenizer.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    assert "set CHAT_FORMAT=llama-2" in only(run({"BASE_MODEL": str(plain)}), "no chat template")
    assert run({"BASE_MODEL": str(plain), "CHAT_FORMAT": "llama-2"}).problems == []


def test_batch_vs_processes_names_the_nearest_valid_settings():
    assert batch_problem("RFT", "RFT", 15, 1, 5, []) is None
    text = batch_problem("RFT", "RFT", 15, 1, 8, other_ok=[4, 2, 1])
    assert "RFT_BATCH=15 is not a multiple of RFT_MICRO_BATCH=1 x NPROC=8" in text
    assert "nearest valid: RFT_BATCH=8 or RFT_BATCH=16 or NPROC=1" in text  # 5 and 3 divide 15 but not SFT's 16/2
    assert "NPROC=5 or NPROC=3" in batch_problem("RFT", "RFT", 15, 1, 8, other_ok=[5, 3, 1])
    assert "SFT_MICRO_BATCH=1" in batch_problem("SFT", "SFT", 16, 2, 16, other_ok=[])
    report = Report()
    check_batches({"NPROC": "8"}, report)  # the paper's defaults: SFT 16 / micro 2 fits, RFT 15 / micro 1 does not
    assert len(report.problems) == 1 and report.problems[0].startswith("reinforced training")
    report = Report()
    check_batches({"NPROC": "8", "SFT_BATCH": "12", "RFT_BATCH": "16"}, report)
    assert len(report.problems) == 1 and "SFT_BATCH=12" in report.problems[0]


def test_gpus_vs_processes_and_replicas(smollm2_dir):
    report = run({"NPROC": "8", "RFT_BATCH": "16", "BACKEND": "vllm", "NUM_REPLICAS": "3", "TENSOR_PARALLEL": "2",
                  "VLLM_PY": sys.executable}, gpus=4)
    assert "set NPROC<=4" in only(report, "NPROC=8 training processes but 4 GPU(s)")
    assert only(report, "NUM_REPLICAS=3 x TENSOR_PARALLEL=2")
    assert "cannot import vllm" in only(report, "BACKEND=vllm")  # this python has no vLLM
    assert "no GPU visible" in run({"PRESET": "paper"}, gpus=0).text("t")


def test_vllm_environment(smollm2_dir):
    report = run({"BACKEND": "vllm", "VLLM_PY": "/nonexistent/python"})
    assert "/nonexistent/python cannot import vllm" in only(report, "BACKEND=vllm")
    assert "must be hf, openai, vllm or serve_hf" in only(run({"BACKEND": "tgi"}), "BACKEND=tgi")


class _Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer sk-good-SECRET"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def log_message(self, *args):
        pass


@pytest.fixture
def models_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_reflection_endpoint_and_key(models_endpoint):
    def problems(env):
        report = Report()
        check_reflection(env, report, timeout=2)
        return report.problems

    assert problems({"REFLECT_BACKEND": "self"}) == []
    assert "no REFLECT_API_KEY" in problems({"REFLECT_BACKEND": "chat"})[0]
    assert problems({"REFLECT_API_KEY": "sk-good-SECRET", "REFLECT_BASE_URL": models_endpoint}) == []  # auto -> chat
    refused = problems({"REFLECT_API_KEY": "sk-bad-SECRET", "REFLECT_BASE_URL": models_endpoint,
                        "OPENAI_API_KEY": "sk-good-SECRET"})  # the reflection key wins over OPENAI_API_KEY
    assert refused == [f"reflection endpoint {models_endpoint}: the key is refused (401)"]
    down = problems({"REFLECT_BACKEND": "chat", "REFLECT_API_KEY": "sk-x-SECRET", "REFLECT_BASE_URL": "http://127.0.0.1:9/v1"})
    assert "unreachable" in down[0] and "SECRET" not in down[0]


def test_free_disk(tmp_path, smollm2_dir):
    report = Report()
    check_disk(str(tmp_path / "run"), str(smollm2_dir), 2, report, free=10**6)
    assert "free disk under" in report.problems[0] and "the training stages need about" in report.problems[0]
    assert "0.13B parameters (its safetensors files)" in report.notes[0]  # the estimate is printed
    report = Report()
    check_disk(str(tmp_path / "run"), str(smollm2_dir), 2, report, free=10**13)
    assert report.problems == [] and len(report.notes) == 1


def test_disk_estimate_for_hub_names(tmp_path):
    """A hub name: the hub's metadata, else the table of the paper's models; 8 GPUs save bf16 models."""
    def note(name, env=None, hub=Hub(parameters=lambda name, token: None), variants=None):
        report = Report()
        check_disk(str(tmp_path), name, 2, report, free=10**15, env=env or {}, gpus=8, hub=hub, variants=variants)
        return (report.notes or report.warnings)[0]

    llama = note("meta-llama/Llama-2-7b-chat-hf")
    # two families; each keeps two 13.5 GB models; SFT's 3 epochs hold two 80.9 GB checkpoints at once
    assert "6.74B parameters (the table of the paper's models)" in llama and "keeps 27.0 GB" in llama
    assert "about 188.7 GB" in llama and "checkpoint takes 80.9 GB" in llama
    assert "about 377.4 GB" in note("meta-llama/Llama-2-7b-chat-hf", {"KEEP_CHECKPOINTS": "1"})  # the old ~190 a family
    assert "1.00B parameters (the hub's metadata)" in note("org/model", hub=Hub(parameters=lambda n, t: 10**9))
    assert "size of org/unknown is unknown" in note("org/unknown")
    # variants that train their own models: Mistral's SFT and STeCa (2 x 14.5 GB), Llama-3's (2 x 16.1 GB), wo_dc's
    # STeCa from the main run's SFT (13.5 GB); the second family starts with all of the first's, and Llama-3's two
    # SFT checkpoints (2 x 96.4 GB) are the largest peak
    both = note("meta-llama/Llama-2-7b-chat-hf", variants=resolve("table2,wo_dc"))
    assert "keeps 27.0 GB (SFT and STeCa models, 2 bytes a parameter) and 74.6 GB of the variants' own models" in both
    assert "about 350.2 GB" in both
    assert "and 13.5 GB of the variants' own" in note("meta-llama/Llama-2-7b-chat-hf", variants=resolve("wo_rt"))


def test_training_epochs_are_the_stages_defaults():
    from Reinforced_train.train import SteCaTrainingArguments
    from sft.train import SFTTrainingArguments

    assert preflight.TRAINING_EPOCHS == {"SFT": SFTTrainingArguments.num_train_epochs,
                                         "RFT": SteCaTrainingArguments.num_train_epochs}


# ---- the GPU side: a faked nvidia-smi, environments as setup.sh --gpu leaves them, a faked hub --------------

ALLOWED = Hub(access=lambda name, token: None, parameters=lambda name, token: None)  # licence accepted, token set


def paper_command(tmp_path: Path, cuda: str | None = "13.0") -> dict[str, str]:
    """The README's paper command after `setup.sh --gpu` put its environments at VENV and VLLM_VENV, their
    torch built for `cuda` (None: a CPU build)."""
    train = fake_python_env(tmp_path / "venv", torch=("2.13.0", cuda))
    vllm = fake_python_env(tmp_path / "venv-vllm", torch=("2.14.0", cuda), vllm="0.33.0")
    return {"PRESET": "paper", "BASE_MODEL": "meta-llama/Llama-2-7b-chat-hf", "CHAT_FORMAT": "llama-2",
            "BACKEND": "vllm", "NPROC": "8", "RFT_BATCH": "16", "DIST_CONFIG": "sft/configs/fsdp.yaml",
            "VENV": str(train), "VLLM_VENV": str(vllm)}


def gpu_report(tmp_path, monkeypatch, env, hub=ALLOWED, **smi) -> Report:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "smi", **{"gpus": 8, **smi}))
    return preflight.preflight(env, ["alfworld", "virtualhome"], str(tmp_path / "run"), hub=hub)


def gpu_problems(report: Report) -> list[str]:
    """The problems of the GPU side: the vLLM environment, the driver vs the builds, busy GPUs, the hub."""
    return [p for p in report.problems if p.startswith(("BACKEND=vllm", "NVIDIA driver", "the training environment",
                                                        "the vLLM environment", "GPUs in use", "BASE_MODEL=",
                                                        "variant "))]


def test_paper_command_after_setup_gpu_gets_past_the_vllm_and_driver_checks(tmp_path, monkeypatch):
    report = gpu_report(tmp_path, monkeypatch, paper_command(tmp_path))
    assert gpu_problems(report) == [], report.text("test")
    assert any("PRESET=paper needs the official sets" in p for p in report.problems)  # the rest is still checked
    assert "about 188.7 GB" in report.notes[0]


def test_a_cuda_12_driver_refuses_cuda_13_builds_naming_both(tmp_path, monkeypatch):
    report = gpu_report(tmp_path, monkeypatch, paper_command(tmp_path), driver="550.54.15", cuda="12.4")
    refused = gpu_problems(report)
    assert len(refused) == 2, report.text("test")
    for torch, where in (("2.13.0", "training"), ("2.14.0", "vLLM")):
        assert any(f"NVIDIA driver 550.54.15 (CUDA 12.4 at most) cannot run torch {torch} in the {where} environment"
                   in p and "built for CUDA 13.0 (driver >= 580.65.06 needed)" in p for p in refused), refused
    # the builds TORCH_CUDA=cu128 installs run on it
    assert gpu_problems(gpu_report(tmp_path, monkeypatch, paper_command(tmp_path, "12.8"), driver="550.54.15",
                                   cuda="12.4")) == []


def test_a_cpu_torch_with_gpus_visible(tmp_path, monkeypatch):
    refused = gpu_problems(gpu_report(tmp_path, monkeypatch, paper_command(tmp_path, None)))
    assert len(refused) == 2 and all("a CPU build, but 8 GPU(s) are visible" in p for p in refused)


def test_gpus_held_by_another_process(tmp_path, monkeypatch):
    holder = {"pid": os.getpid(), "gpu": 3, "mib": 20480}
    busy = gpu_problems(gpu_report(tmp_path, monkeypatch, paper_command(tmp_path), apps=[holder]))
    assert busy == [f"GPUs in use by other processes: GPU 3: pid {os.getpid()} (python3, 20480 MiB); the training "
                    "stages and vLLM need them free: stop those (kill PID) or set CUDA_VISIBLE_DEVICES"]
    env = {**paper_command(tmp_path), "CUDA_VISIBLE_DEVICES": "0,1", "NPROC": "2", "RFT_BATCH": "16"}
    assert gpu_problems(gpu_report(tmp_path, monkeypatch, env, apps=[holder])) == []  # not on the GPUs used


def test_a_gated_model_without_access_is_refused(tmp_path, monkeypatch):
    """The hub's own answer, without network: huggingface_hub's auth_check replaced by one that refuses a
    gated repository unless a token comes with the request."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    asked = []

    def auth_check(repo_id, token=None, **kwargs):
        asked.append((repo_id, token))
        if token is None:
            response = httpx2.Response(403, request=httpx2.Request("GET", f"https://huggingface.co/{repo_id}"))
            raise GatedRepoError(f"Access to model {repo_id} is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    name = "meta-llama/Llama-2-7b-chat-hf"
    report = Report()
    check_model(name, {}, report)
    assert report.problems == [f"BASE_MODEL={name}: not a folder, not in the local hub cache, and a gated model that "
                               f"these credentials may not read: accept its licence on https://huggingface.co/{name} "
                               "and log in (huggingface-cli login, or HF_TOKEN)"]
    report = Report()
    check_model(name, {"HF_TOKEN": "hf_accepted"}, report)
    assert report.problems == [] and asked[-1] == (name, "hf_accepted")
    # the whole pre-flight of the paper command, refused before any stage
    refused = gpu_problems(gpu_report(tmp_path, monkeypatch, paper_command(tmp_path), hub=Hub()))
    assert len(refused) == 1 and "a gated model that these credentials may not read" in refused[0]


def test_a_variant_s_own_base_model_is_checked_too(tmp_path, monkeypatch):
    """Table 2's backbones are gated on the hub: a variant that could not read its model would stop after the
    main run's hours; the pre-flight names it with the main run's check."""
    readable = {"meta-llama/Llama-2-7b-chat-hf"}
    hub = Hub(access=lambda name, token: None if name in readable else "a gated model that these credentials may "
              "not read", parameters=lambda name, token: None)
    refused = gpu_problems(gpu_report(tmp_path, monkeypatch, {**paper_command(tmp_path), "VARIANT": "table2,wo_dc"},
                                      hub=hub))
    assert [p.split(":")[0] for p in refused] == ["variant mistral_7b", "variant llama3_8b"], refused
    assert refused[0].startswith("variant mistral_7b: BASE_MODEL=mistralai/Mistral-7B-Instruct-v0.2: not a folder")
    readable |= {"mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Meta-Llama-3-8B-Instruct"}
    assert gpu_problems(gpu_report(tmp_path, monkeypatch, {**paper_command(tmp_path), "VARIANT": "table2"},
                                   hub=hub)) == []


def test_doctor_flag_runs_the_same_check(smollm2_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REFLECT_API_KEY")}
    env.update(PRESET="paper", TASK_FAMILY="alfworld", NPROC="8", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "eval_agent.doctor", "--preflight"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "pre-flight (PRESET=paper, alfworld)" in out.stdout
    assert "RFT_BATCH=15 is not a multiple" in out.stdout and "PRESET=paper needs the official sets" in out.stdout


def test_readme_paper_command_stops_before_any_stage(tmp_path, smollm2_dir):
    """The README's recipe with NPROC=8 and the paper's RFT batch of 15: refused before any stage runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REFLECT_API_KEY", "EXPERT_DATA")}
    env.update(TASK_FAMILY="both", PRESET="paper", BASE_MODEL="meta-llama/Llama-2-7b-chat-hf", CHAT_FORMAT="llama-2",
               BACKEND="vllm", NPROC="8", DIST_CONFIG="sft/configs/fsdp.yaml", RUN_ROOT=str(tmp_path / "run"),
               HF_HUB_OFFLINE="1")
    done = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "RFT_BATCH=15 is not a multiple of RFT_MICRO_BATCH=1 x NPROC=8" in done.stdout
    assert "== " not in done.stdout and not (tmp_path / "run").exists()  # no stage started, nothing written


def test_paper_preset_checks_the_published_files_beside_the_data(tmp_path, smollm2_dir):
    alf = tmp_path / "alfworld"
    alf.mkdir()
    (alf / "json_2.1.1").symlink_to(REPO / "data" / "alfworld" / "json_2.1.1")
    (alf / "alfworld_sft.json").write_text('[{"id": "alfworld_0", "conversations": [{"from": "gpt", "value": "x"}]}]')
    report = run({"PRESET": "paper", "ALFWORLD_DATA": str(alf)})
    assert "alfworld_sft.json: row 0: the task turn (a human turn) is missing" in only(report, "EXPERT_SOURCE=")
    assert not any("no published alfworld_sft.json" in w for w in report.warnings)
