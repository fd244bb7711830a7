"""Engine stats are frozen dataclasses. Where they are rendered as JSON (`chroma-serve status --json`, the fault
agent's `stats`) `dataclasses.asdict` gives the keys they always had, and the fault agent reads them back typed."""

import json

from cluster.local import faults
from model.chroma.checkpoint import Checkpoint, load_codec
from model.engines.codec import CodecEngine
from model.engines.speech import SpeechEngine, SpeechEngineSettings
from model.reasoner.vllm.engine import VLLMReasonerStats

STEP_KEYS = {"cuda_graphs", "eager_fallback_buckets", "eager_fallback_steps", "graph_capture_s", "graph_pool_mb",
             "sdpa_backends"}
SPEECH_KEYS = STEP_KEYS | {
    "live_slots", "free_slots", "queued", "steps", "frames", "steps_per_s", "step_ms_p50", "step_ms_p95",
    "slot_cache_bytes_in_use", "voice_cache_entries", "voice_cache_bytes", "step_mode", "voice_prefill",
    "step_ms_by_batch", "steps_by_batch", "calibration_s", "realtime_slots"}
CODEC_KEYS = STEP_KEYS | {
    "open_streams", "max_streams", "pending_frames", "state_bytes", "state_bytes_per_stream", "kv_positions_per_stream",
    "decode_mode", "decode_ms_by_batch", "calibration_s", "realtime_streams"}
VLLM_KEYS = {"unfinished_requests", "realtime_streams", "step_ms_by_batch", "calibration_s", "prompt_tokens",
             "cached_tokens", "prefix_cache_hit_rate", "warmed_prompts"}


def test_engine_stats_keep_their_json_keys_and_come_back_typed(chroma, tiny_checkpoint, monkeypatch):
    checkpoint = Checkpoint(tiny_checkpoint)
    codec = CodecEngine(load_codec(checkpoint), checkpoint.config, max_streams=2, max_step_rtf=0.8)
    codec.calibrate()
    engines = {
        "Reasoner": VLLMReasonerStats(0, 4, {1: 2.5}, 0.6, prompt_tokens=10, cached_tokens=8,
                                      prefix_cache_hit_rate=0.8, warmed_prompts=1),
        "SpeechStack": SpeechEngine(chroma.speech, SpeechEngineSettings(max_slots=2)).stats(),
        "Codec": codec.stats(),
    }
    monkeypatch.setattr(faults, "connected_engine_stats", lambda: engines)
    sent = json.loads(json.dumps(faults.answer("stats")))  # as the agent writes it
    assert set(sent["SpeechStack"]) == SPEECH_KEYS and set(sent["Codec"]) == CODEC_KEYS
    assert set(sent["SpeechStack"]["voice_prefill"]) == STEP_KEYS | {"voices", "forwards"}
    assert set(sent["Reasoner"]) == VLLM_KEYS
    assert faults.read_engine_stats(sent) == engines
