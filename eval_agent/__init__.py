"""Core library of the STeCa reproduction: environments, LLM backends, prompts, chat formats,
trajectories, the batched episode runner and resumable JSONL I/O. Every stage imports from here."""
