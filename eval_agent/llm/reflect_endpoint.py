"""The reflection endpoint's key and URL (GPT-4o in the paper): its own variables first, so that a local
model server can never be mistaken for it (scripts/serve_vllm.sh exports ENDPOINTS, never OPENAI_BASE_URL)."""
from __future__ import annotations

import os


def reflection_endpoint() -> tuple[str | None, str | None]:
    """(API key, base URL) from REFLECT_API_KEY / REFLECT_BASE_URL, each falling back to OPENAI_*; None when unset."""
    key = os.environ.get("REFLECT_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
    url = os.environ.get("REFLECT_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or None
    return key, url
