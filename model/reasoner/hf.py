"""The Reasoner on transformers: the reference implementation, and the fallback where vLLM is absent.

`ReasonerSession` is one conversation on the transformers thinker module (prefill, then one token per step,
yielding (token id, last-layer hidden state after the final norm)); the offline generator uses it directly.
`HFReasoner` serves many conversations on one shared module: each has its own KV cache, forward passes are
serialised by a lock and run in a worker thread, so the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model.chroma.turn import ReasonerPair
from model.engines.realtime import Headroom
from model.processing.processor import ChromaProcessor, Conversation, ReasonerInputs
from model.reasoner.base import (
    PromptStats,
    ReasonerEngineError,
    ReasonerStats,
    check_reasoner_dir,
    encode_for_reasoner,
    load_reasoner_processor,
    token_budget,
)


class ReasonerSession:
    """One conversation on the transformers thinker module. Rotary positions are passed explicitly (prefill: Qwen2.5-Omni's 3D
    rope index; then cache length + that conversation's rope delta), so the module keeps no per-conversation
    state and several sessions can share one thinker."""

    def __init__(self, thinker):
        from transformers import DynamicCache

        self.thinker = thinker
        self.cache = DynamicCache(config=thinker.config.text_config)
        self.length = 0
        self.rope_delta = 0

    @torch.inference_mode()
    def prefill(self, inputs: ReasonerInputs) -> ReasonerPair:
        device = self.thinker.device
        input_ids = inputs.input_ids.to(device)
        attention_mask = inputs.attention_mask.to(device)
        audio_lengths = None
        if inputs.feature_attention_mask is not None:
            audio_lengths = inputs.feature_attention_mask.sum(-1).to(device)
        position_ids, rope_deltas = self.thinker.get_rope_index(
            input_ids, None, None, attention_mask, False, audio_lengths
        )
        self.rope_delta = int(rope_deltas.reshape(-1)[0])
        out = self.thinker(
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_features=None if inputs.input_features is None else inputs.input_features.to(device, self.thinker.dtype),
            feature_attention_mask=None if inputs.feature_attention_mask is None else inputs.feature_attention_mask.to(device),
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.length = input_ids.shape[1]
        return self._pick(out)

    @torch.inference_mode()
    def step(self, token: int) -> ReasonerPair:
        device = self.thinker.device
        position = torch.full((3, 1, 1), self.length + self.rope_delta, device=device, dtype=torch.long)
        out = self.thinker(
            input_ids=torch.tensor([[token]], device=device),
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.length += 1
        return self._pick(out)

    @staticmethod
    def _pick(out) -> ReasonerPair:
        # The reference thinker is always greedy.
        return int(out.logits[0, -1].argmax()), out.hidden_states[-1][0, -1]


def load_hf_thinker(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' Qwen2.5-Omni thinker from a Reasoner directory or a full Chroma checkpoint, strictly loaded."""
    path = check_reasoner_dir(path)
    config = json.loads((path / "config.json").read_text())
    if "thinker_config" in config:
        from model.chroma.checkpoint import load_component

        return load_component(path, "thinker", dtype=dtype, device=device)
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.initialization import no_init_weights

    from model.chroma.checkpoint import TIED_KEYS, load_into

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file, device=device))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    head, embed = (key[len("thinker."):] for key in TIED_KEYS[0])
    if head not in state and embed in state:
        state[head] = state[embed]
    with no_init_weights(), torch.device(device):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(
            AutoConfig.from_pretrained(path, local_files_only=True), dtype=dtype
        )
    load_into(thinker, state, "", "thinker")
    return thinker.eval()


class HFReasoner:
    """The Reasoner on transformers (see the module docstring)."""

    max_audios = None  # caller utterances one conversation may hold: no bound

    def __init__(self, thinker, processor: ChromaProcessor):
        self.thinker = thinker
        self.processor = processor
        text_config = thinker.config.get_text_config()
        self.hidden_size = text_config.hidden_size
        self.context = text_config.max_position_embeddings
        self._lock = threading.Lock()  # one forward at a time through the shared module
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-reasoner")
        self._live = 0
        self._closed = False

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> HFReasoner:
        path = check_reasoner_dir(path)
        return cls(load_hf_thinker(path, dtype, device), load_reasoner_processor(path))

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def holds_audio(self, audio_id: str) -> bool:
        return False  # the reference: it encodes every audio of every conversation afresh

    def warm(self, conversation: Conversation) -> None:
        """No prefix cache across requests: nothing to warm."""

    async def stream(
        self, conversation: Conversation, max_tokens: int, on_prompt: Callable[[PromptStats], None] | None = None
    ) -> AsyncIterator[ReasonerPair]:
        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(None, encode_for_reasoner, self.processor, conversation, self.context)
        budget = token_budget(max_tokens, inputs.input_ids.shape[1], self.context)
        if on_prompt is not None:
            on_prompt(PromptStats(inputs.input_ids.shape[1]))
        session = ReasonerSession(self.thinker)
        im_end = self.processor.special_ids.im_end
        self._live += 1
        try:
            token, hidden = await loop.run_in_executor(self._executor, self._locked, session.prefill, inputs)
            for produced in range(1, budget + 1):
                # A copy: the row is a view into the step's full hidden-state output.
                yield token, hidden.detach().to("cpu", torch.float32, copy=True)
                if token == im_end or produced == budget:
                    return
                token, hidden = await loop.run_in_executor(self._executor, self._locked, session.step, token)
        finally:
            self._live -= 1
            session.cache = None  # the KV cache goes with the request, even if a step is still finishing

    def num_unfinished_requests(self) -> int:
        return self._live

    def headroom(self) -> Headroom:
        return Headroom(None)  # conversations take turns on one module: no batch to measure, no slots to run out of

    async def calibrate(self) -> None:
        """Nothing to measure (`headroom` sets no bound)."""

    def stats(self) -> ReasonerStats:
        return ReasonerStats(self._live, realtime_streams=None, step_ms_by_batch={}, calibration_s=None)

    async def check_health(self) -> None:
        if self._closed:
            raise ReasonerEngineError("the transformers Reasoner was closed")

    async def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
