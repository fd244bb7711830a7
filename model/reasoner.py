"""The Reasoner: the Qwen2.5-Omni thinker as a streaming service of (text token, hidden state) pairs.

`Reasoner` is the interface both engines implement:

    async for token, hidden in reasoner.stream(conversation, max_tokens):
        ...  # token: int id; hidden: [hidden_size] float32 CPU tensor, the thinker's last-layer state after the
             # final norm at the position that produced `token` (what the speech Backbone consumes)

The stream is greedy (the reference thinker always is), yields one pair per generated token in order, stops after
im_end (which is yielded) or after `max_tokens` pairs, and stops early at the end of the thinker's context.
Closing the iterator (`aclose()`) or cancelling the task that iterates it releases the request at once.

- `HFReasoner` (here): transformers, reusing `model.generate.ThinkerSession`; the reference and the fallback where
  vLLM is absent. One module is shared by all conversations: each has its own KV cache, forward passes are
  serialised by a lock and run in a worker thread, so the event loop is never blocked.
- `VLLMReasoner` (model/vllm_reasoner.py): vLLM's async engine, continuous batching and prefix caching.

Both take a `model.processor.Conversation` and encode it with `ChromaProcessor`, so they see the same ids and
the same Whisper features.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from model.processor import SPECIAL_TOKENS, ChromaProcessor, Conversation, SpecialIds, ThinkerInputs


class ReasonerError(ValueError):
    """A conversation the Reasoner cannot take (too long for its context, empty, malformed)."""


@runtime_checkable
class Reasoner(Protocol):
    processor: ChromaProcessor

    def stream(self, conversation: Conversation, max_tokens: int) -> AsyncIterator[tuple[int, torch.Tensor]]:
        """(token id, hidden state [hidden] float32 CPU) per generated token; see the module docstring."""
        ...

    def num_unfinished_requests(self) -> int:
        """Streams the engine still holds (a cancelled one must leave at once)."""
        ...

    async def close(self) -> None:
        """Release the engine."""
        ...


def check_thinker_dir(path: str | Path) -> Path:
    """A thinker directory (from `chroma-serve checkpoint split`) or a full Chroma checkpoint; clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"thinker directory {path} does not exist (make one with `chroma-serve checkpoint split`)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing; {path} is not a thinker directory")
    return path


def _thinker_config_dict(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return config["thinker_config"] if "thinker_config" in config else config


def load_thinker_processor(path: str | Path) -> ChromaProcessor:
    """`ChromaProcessor` for a thinker directory or a full Chroma checkpoint.

    A thinker directory's config.json is the thinker's own config, which names the audio ids but not Chroma's
    text_start/text_end (voice-prompt ids the Reasoner never uses); those are read from the tokenizer."""
    path = check_thinker_dir(path)
    config = json.loads((path / "config.json").read_text())
    if "thinker_config" in config:
        return ChromaProcessor.from_pretrained(path)
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; the processor needs it")
    tokenizer = Qwen2Tokenizer.from_pretrained(path, local_files_only=True)
    try:
        special_ids = SpecialIds(
            audio=config["audio_token_index"],
            audio_bos=config["audio_start_token_id"],
            audio_eos=config["audio_end_token_id"],
            text_start=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["text_start"]),
            text_end=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["text_end"]),
            im_end=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"]),
        )
    except KeyError as exc:
        raise ValueError(f"{path / 'config.json'} lacks {exc.args[0]!r}") from exc
    feature_extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
    return ChromaProcessor(tokenizer, feature_extractor, special_ids)


def encode_for_reasoner(processor: ChromaProcessor, conversation: Conversation, context: int) -> ThinkerInputs:
    """Encode and check that the prompt leaves room for at least one generated token in `context` positions."""
    if not isinstance(conversation, Conversation):
        raise ReasonerError(f"expected a model.processor.Conversation, got {type(conversation).__name__}")
    if not conversation.turns:  # Conversation refuses this on construction; guard against later mutation
        raise ReasonerError("conversation has no turns")
    inputs = processor.encode_conversation(conversation)
    prompt_len = inputs.input_ids.shape[1]
    if prompt_len >= context:
        raise ReasonerError(
            f"conversation takes {prompt_len} positions (audio and text), more than the Reasoner's context of "
            f"{context} minus one for the reply: shorten the audio or drop earlier turns"
        )
    return inputs


def token_budget(max_tokens: int, prompt_len: int, context: int) -> int:
    if max_tokens < 1:
        raise ReasonerError(f"max_tokens must be >= 1, got {max_tokens}")
    return min(max_tokens, context - prompt_len)


def load_hf_thinker(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' Qwen2.5-Omni thinker from a thinker directory or a full Chroma checkpoint, strictly loaded."""
    path = check_thinker_dir(path)
    config = json.loads((path / "config.json").read_text())
    if "thinker_config" in config:
        from model.checkpoint import load_component

        return load_component(path, "thinker", dtype=dtype, device=device)
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.initialization import no_init_weights

    from model.checkpoint import TIED_KEYS, load_into

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

    def __init__(self, thinker, processor: ChromaProcessor):
        self.thinker = thinker
        self.processor = processor
        text_config = thinker.config.get_text_config()
        self.hidden_size = text_config.hidden_size
        self.context = text_config.max_position_embeddings
        self._lock = threading.Lock()  # one forward at a time through the shared module
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-reasoner")
        self._live = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> HFReasoner:
        path = check_thinker_dir(path)
        return cls(load_hf_thinker(path, dtype, device), load_thinker_processor(path))

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def stream(self, conversation: Conversation, max_tokens: int) -> AsyncIterator[tuple[int, torch.Tensor]]:
        from model.generate import ThinkerSession

        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(None, encode_for_reasoner, self.processor, conversation, self.context)
        budget = token_budget(max_tokens, inputs.input_ids.shape[1], self.context)
        session = ThinkerSession(self.thinker)
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

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
