"""The engines' settings: plain pydantic that imports nothing heavy (no torch, no vLLM), so that parsing a config
loads no engine. The engines take their settings from here; `cluster.settings.AppConfig` nests them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_FRAMES = 750  # 60 s of reply audio
DEFAULT_MAX_TOKENS = 256  # Reasoner tokens per reply; the frame budget usually bounds them first
DEFAULT_CHUNK_FRAMES = 2  # 160 ms of audio per streamed codec chunk

# How a batched step runs (model/engines/graphs.py), and the torch.compile backend of the compiled modes.
StepMode = Literal["auto", "eager", "padded", "cuda_graphs", "compiled", "compiled_graphs"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]

# The engines' `max_step_rtf` setting (model/engines/realtime.py).
StepRtf = Annotated[
    Annotated[float, Field(gt=0, le=1)] | None,
    Field(description="a replica takes as many turns as keep its measured step time within this fraction of the "
          "audio a step makes (0.8: 80 ms of audio in at most 64 ms); null: its slots alone bound it"),
]


class StepSettings(BaseModel):
    """How an engine runs its batched step (a speech frame, a codec chunk) and how many turns it batches."""

    model_config = ConfigDict(extra="forbid")

    step_mode: StepMode = Field(
        "auto", description='how the batched step runs: "auto" (CUDA graphs on a GPU, eager elsewhere), "eager", '
        '"padded" (the graphs\' bucket shapes, eagerly), "cuda_graphs", "compiled" (torch.compile), '
        '"compiled_graphs" (compiled, then captured): model/engines/graphs.py',
    )
    compile_backend: CompileBackend = Field("inductor", description="torch.compile backend of the compiled step modes")
    max_step_rtf: StepRtf = 0.8  # of the audio one batched step makes


class SpeechEngineSettings(StepSettings):
    max_slots: int = Field(16, ge=1, description="live turns per device")
    max_queue: int = Field(48, ge=0, description="turns waiting for a slot before submit refuses")
    voice_cache_mb: float = Field(256.0, ge=0, description="memory bound of the voice-prompt KV cache (LRU)")
    max_frames: int = Field(DEFAULT_MAX_FRAMES, ge=1, description="frame limit per turn (60 s at 12.5 frames/s)")
    prefill_voices: int = Field(
        8, ge=1, description="voice prompts prefilled in one forward: turns in new voices that arrive together share it",
    )
    cpu_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads of the engine thread when the model is on a CPU (null: torch's "
        "count). 1: a step of a small model is many small ops, which more threads only slow down from a second "
        "thread (model/engines/cpu_threads.py); raise it for a large model on a CPU with cores to spare",
    )


class CodecSettings(StepSettings):
    max_streams: int = Field(64, ge=1, description="replies decoding at once per replica")
    chunk_frames: int = Field(DEFAULT_CHUNK_FRAMES, ge=1, description="frames per streamed audio chunk (2 = 160 ms)")


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
