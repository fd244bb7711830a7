"""The Reasoner: its protocol (`base`), its engines (`hf`, `vllm`), and the one place that builds one from its
settings (`model.settings.ReasonerSettings`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.reasoner.base import Reasoner
    from model.settings import ReasonerSettings


def build_reasoner(settings: ReasonerSettings, path: str | Path, dtype: str = "float32", device: str = "cpu") -> Reasoner:
    """`path`: the Reasoner directory (`chroma-serve checkpoint split`); the transformers engine also takes a full
    checkpoint. A vLLM engine starts processes: call this under `if __name__ == "__main__":` or in a server."""
    if settings.engine == "vllm":
        from model.reasoner.vllm.engine import VLLMReasoner

        return VLLMReasoner(path, settings.vllm, dtype=dtype)
    from model.chroma.checkpoint import resolve_dtype
    from model.reasoner.hf import HFReasoner

    return HFReasoner.from_pretrained(path, resolve_dtype(dtype), device)
