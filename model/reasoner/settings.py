"""The Reasoner's settings, and the one place that builds a Reasoner from them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.engines.realtime import StepRtf
from model.reasoner.base import Reasoner


class VLLMSettings(BaseModel):
    """vLLM engine settings (vLLM's own names; see `VLLMReasoner`)."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1, description="conversations vLLM batches at once")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens per engine step (prefill chunking)")
    max_model_len: int | None = Field(None, ge=1, description="context; default: the checkpoint's")
    block_size: int | None = Field(
        None, ge=1, description="KV-cache block (prefix caching reuses whole blocks); default: vLLM's for the device "
        "(128 on CPU, which takes multiples of 32)",
    )
    max_audios_per_prompt: int = Field(32, ge=1, description="caller utterances a conversation may hold")
    max_audio_seconds: float = Field(60.0, gt=0, description="longest single audio; sizes the encoder cache")
    enforce_eager: bool = False
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    cpu_kvcache_gib: int | None = Field(None, ge=1, description="KV cache on CPU (VLLM_CPU_KVCACHE_SPACE)")
    max_step_rtf: StepRtf = 0.8
    row_timeout_s: float = Field(120.0, gt=0, description="wait for a hidden-state row before failing the turn")


class ReasonerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm, or transformers (the reference, no batching)")
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)


def build_reasoner(settings: ReasonerSettings, path: str | Path, dtype: str = "float32", device: str = "cpu") -> Reasoner:
    """`path`: the Reasoner directory (`chroma-serve checkpoint split`); the transformers engine also takes a full
    checkpoint. A vLLM engine starts processes: call this under `if __name__ == "__main__":` or in a server."""
    if settings.engine == "vllm":
        from model.reasoner.vllm.engine import VLLMReasoner

        return VLLMReasoner(path, settings.vllm, dtype=dtype)
    from model.chroma.checkpoint import resolve_dtype
    from model.reasoner.hf import HFReasoner

    return HFReasoner.from_pretrained(path, resolve_dtype(dtype), device)
