"""The Chroma Reasoner inside vLLM (0.32.x): model class, audio processing and the hidden-state tap.

Imported by vLLM through the plugin (model/reasoner/vllm/plugin.py) in its own processes; it imports vLLM at module level,
so nothing else in the project imports it.

Why not a subclass of vLLM's `Qwen2_5OmniThinkerForConditionalGeneration`: in vLLM 0.32 that module imports
vLLM's Qwen2-VL code, which imports transformers' torchvision-backed `Qwen2VLImageProcessor` at module level, so it
cannot even be imported without torchvision, and the CPU stack must leave torchvision out (PyPI's wheels are built
for the CUDA torch). `ChromaReasonerForConditionalGeneration` is therefore the audio + text thinker assembled from
the same parts vLLM's class uses: transformers' `Qwen2_5OmniAudioEncoder` as the audio tower and vLLM's
`Qwen2ForCausalLM` as the language model (M-RoPE, paged attention, torch.compile), with the thinker's weight names.
Vision weights in the checkpoint are skipped (Chroma takes speech, not images).

- Audio input: vLLM's multimodal pipeline, modality "audio". A request carries, per user audio, one
  `<|AUDIO|>` id in its prompt and either a 16 kHz waveform (what the Reasoner sends: featurised here exactly like
  `ChromaProcessor`, one audio at a time; vLLM's processor cache keeps the result under the audio's
  `multi_modal_uuids` id, so a request may send None for an audio it sent before) or the Whisper features
  (`input_audio_features` [128, frames] concatenated over the request's audios + `audio_feature_lengths`). The
  processor expands each `<|AUDIO|>`
  to the audio encoder's output length; the model runs the tower in vLLM's encoder step and merges the rows into
  the placeholder positions. Positions: with audio and text only, Qwen2.5-Omni's 3-D rope index is the sequence
  index on all three axes (`get_mrope_input_positions`).
- Hidden states: `forward` notes, from the attention metadata of the step, every batched request's sequence
  length (its last scheduled position is `seq_lens[i] - 1`); `compute_logits` receives exactly the rows being
  sampled after the final norm (= transformers' `hidden_states[-1]` at those positions) and keeps them. Both run
  outside the compiled region (vLLM compiles the inner Qwen2 stack only).
- `HiddenStateTap` is a vLLM logits processor (`EngineArgs.logits_processors`). vLLM tells it which request sits
  at which batch index (`update_state`); `apply`, which runs right after `compute_logits` in the same step, pairs
  the kept rows with requests tagged in `SamplingParams.extra_args`, drops rows of prefill chunks that end
  before the prompt's last position (chunked prefill) and steps without forward metadata (warm-up / profiling
  dummies), and pushes the rest to the front end over the side channel of model/reasoner/vllm/channel.py. It never
  changes logits; `is_argmax_invariant()` is False only because vLLM skips argmax-invariant processors for
  greedy requests.

Known limits: one KV-cache group and no micro-batching (DBO), pipeline parallelism or speculative decoding (rows
are then not attributed and the front end times out with a clear error). On GPU, vLLM defaults to Model Runner V2,
whose logits-processor calls differ: smoke-test there before relying on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import BatchFeature
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor
from transformers.processing_utils import ProcessorMixin
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMRoPE,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo
from vllm.multimodal.processing.processor import PromptReplacement, PromptUpdate
from vllm.sequence import IntermediateTensors
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from model.reasoner.vllm.channel import CHANNEL_CONFIG_KEY, REQUEST_TAG_KEY, encode_rows
from model.processing.audio import REASONER_RATE
from model.processing.processor import SPECIAL_TOKENS, audio_token_count, whisper_features
from model.reasoner.vllm.plugin import MAX_AUDIO_SECONDS_KEY

log = logging.getLogger(__name__)

DEFAULT_MAX_AUDIO_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------------------------
# Processing (front end and engine core)


class ChromaThinkerHFProcessor(Qwen2_5OmniProcessor):
    """Qwen2_5OmniProcessor without the video processor (that one needs torchvision). vLLM asks the processing
    info for an HF processor (token strings, processor kwargs); audio is featurised by `_whisper_features`."""

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None):
        ProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer, chat_template=chat_template)
        for name in (
            "image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
            "audio_bos_token", "audio_eos_token",
        ):
            setattr(self, name, getattr(self.tokenizer, name))


def _whisper_features(feature_extractor, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid log-mel frames of each 16 kHz wave concatenated along time [128, sum], and the lengths [n]: each wave
    featurised alone, exactly as `ChromaProcessor` does (model.processing.processor.whisper_features)."""
    features = [whisper_features(feature_extractor, w) for w in waves]
    lengths = np.array([f.shape[1] for f in features], dtype=np.int64)
    return torch.from_numpy(np.concatenate(features, axis=1)), torch.from_numpy(lengths)


def _audio_fields(hf_inputs: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    lengths = hf_inputs.get("audio_feature_lengths", torch.empty((0,), dtype=torch.long)).flatten()
    return dict(
        input_audio_features=MultiModalFieldConfig.flat_from_sizes("audio", lengths, dim=1),
        audio_feature_lengths=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
    )


class ChromaAudioDataParser(MultiModalDataParser):
    embedding_fields = {"audio": {"input_audio_features": "values", "audio_feature_lengths": "metadata"}}

    def _parse_audio_data(self, data):
        if isinstance(data, dict):
            required, optional = self.embedding_field_sets("audio")
            data = dict(data)
            if "audio_feature_lengths" in data:
                data["audio_feature_lengths"] = torch.as_tensor(data["audio_feature_lengths"]).flatten()
            return DictEmbeddingItems(
                data, modality="audio", required_fields=required, optional_fields=optional, fields_factory=_audio_fields
            )
        return super()._parse_audio_data(data)


class ChromaThinkerProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self):
        config = self.ctx.get_hf_config()
        return getattr(config, "thinker_config", config)

    def get_hf_processor(self, **kwargs: object) -> ChromaThinkerHFProcessor:
        return self.ctx.get_hf_processor(ChromaThinkerHFProcessor, **kwargs)

    def get_feature_extractor(self):
        return self.get_hf_processor().feature_extractor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def get_data_parser(self):
        return ChromaAudioDataParser(
            target_sr=REASONER_RATE,
            target_channels=1,
            audio_resample_method="soxr",  # torchaudio (vLLM's default) is not part of the CPU stack
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def max_audio_seconds(self) -> float:
        return float(getattr(self.ctx.get_hf_config(), MAX_AUDIO_SECONDS_KEY, DEFAULT_MAX_AUDIO_SECONDS))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int] | None = None) -> Mapping[str, int]:
        if not (mm_counts or {}).get("audio", 0):
            return {}
        fe = self.get_feature_extractor()
        frames = int(self.max_audio_seconds() * REASONER_RATE) // fe.hop_length + 1
        return {"audio": audio_token_count(frames)}


class ChromaDummyInputsBuilder(BaseDummyInputsBuilder[ChromaThinkerProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        one = SPECIAL_TOKENS["audio_bos"] + SPECIAL_TOKENS["audio"] + SPECIAL_TOKENS["audio_eos"]
        return one * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        return {
            "audio": self._get_dummy_audios(
                length=int(self.info.max_audio_seconds() * REASONER_RATE),
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio") if mm_options else None,
            )
        }


class ChromaThinkerMultiModalProcessor(BaseMultiModalProcessor[ChromaThinkerProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        waves = hf_data.get("audio") or []
        if not waves:
            return BatchFeature()
        features, lengths = _whisper_features(self.info.get_feature_extractor(), list(waves))
        return BatchFeature({"input_audio_features": features, "audio_feature_lengths": lengths})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return _audio_fields(hf_inputs)

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        audio_id = self.info.get_hf_config().audio_token_index
        lengths = out_mm_kwargs.get_data().get("audio_feature_lengths")
        counts = [] if lengths is None else [audio_token_count(int(n)) for n in torch.as_tensor(lengths).flatten()]

        def replacement(item_idx: int) -> list[int]:
            if counts[item_idx] < 1:
                raise ValueError(f"audio {item_idx} is too short to encode")
            return [audio_id] * counts[item_idx]

        return [PromptReplacement(modality="audio", target=[audio_id], replacement=replacement)]


# ---------------------------------------------------------------------------------------------------------------
# The model (engine core)


class _StepRows:
    """Rows kept by compute_logits for the tap (one model per vLLM worker process); each step replaces the last."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None
        self.ready = None  # CUDA event of the device-to-host copy
        self.pending_positions: torch.Tensor | None = None


_STEP = _StepRows()


def _last_positions_of_step() -> torch.Tensor | None:
    """Per request in batch order, the last position scheduled in this step (seq_len - 1), from the attention
    metadata of the running forward; None outside a real step (dummy/profile runs) or with micro-batching."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None
    for layer_metadata in metadata.values():
        seq_lens = getattr(layer_metadata, "seq_lens", None)
        if isinstance(seq_lens, torch.Tensor):
            return seq_lens.to("cpu", torch.long, copy=True) - 1
    return None


@MULTIMODAL_REGISTRY.register_processor(
    ChromaThinkerMultiModalProcessor, info=ChromaThinkerProcessingInfo, dummy_inputs=ChromaDummyInputsBuilder
)
class ChromaReasonerForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE, SupportsPP):
    """Qwen2.5-Omni thinker (audio + text) for vLLM, keeping the sampled rows' final-normed hidden states."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "thinker.lm_head.": "language_model.lm_head.",
            "thinker.model.": "language_model.model.",
            "thinker.visual.": None,
            "thinker.audio_tower.": "audio_tower.",
            "lm_head.": "language_model.lm_head.",
            "model.": "language_model.model.",
            "visual.": None,
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return SPECIAL_TOKENS["audio_bos"] + SPECIAL_TOKENS["audio"] + SPECIAL_TOKENS["audio_eos"]
        raise ValueError("the Chroma Reasoner takes audio and text only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        thinker_config = getattr(hf_config, "thinker_config", hf_config)
        self.config = thinker_config
        self.vllm_config = vllm_config
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_tower = Qwen2_5OmniAudioEncoder(thinker_config.audio_config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                prefix=maybe_prefix(prefix, "language_model"),
                hf_config=thinker_config.text_config,
                architectures=["Qwen2ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # -- audio --------------------------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        features = kwargs.get("input_audio_features")
        lengths = kwargs.get("audio_feature_lengths")
        if features is None:
            return []
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(f.shape[-2], -1) for f in features], dim=1)
        if isinstance(lengths, (list, tuple)):
            lengths = torch.cat([torch.as_tensor(n).flatten() for n in lengths])
        lengths = torch.as_tensor(lengths).flatten().to(device=features.device, dtype=torch.long)
        if features.dim() == 3:  # padded batch [n, mels, frames]
            features = torch.cat([f[:, :n] for f, n in zip(features, lengths.tolist())], dim=1)
        after_cnn, output_lengths = self.audio_tower._get_feat_extract_output_lengths(lengths)
        out = self.audio_tower(features.to(self.audio_tower.dtype), feature_lens=lengths, aftercnn_lens=after_cnn)
        return out.last_hidden_state.split(output_lengths.tolist())

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Qwen2.5-Omni's rope index for audio + text: audio positions run on from the text before them, so all
        three axes carry the sequence index and the decode delta is 0."""
        if any(f.modality != "audio" for f in mm_features):
            raise ValueError("the Chroma Reasoner takes audio and text only")
        positions = torch.arange(len(input_tokens), dtype=torch.long)
        return positions.unsqueeze(0).expand(3, -1).clone(), 0

    # -- language model -----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        _STEP.pending_positions = _last_positions_of_step()
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        positions, _STEP.pending_positions = _STEP.pending_positions, None
        if positions is None or positions.shape[0] < hidden_states.shape[0]:
            _STEP.rows = _STEP.last_positions = _STEP.ready = None
        else:
            if hidden_states.is_cuda:
                # Copy to pinned host memory without stalling the stream; the tap waits on the event.
                rows = torch.empty(hidden_states.shape, dtype=torch.float32, pin_memory=True)
                rows.copy_(hidden_states.detach().float(), non_blocking=True)
                _STEP.ready = torch.cuda.Event()
                _STEP.ready.record()
            else:
                rows = hidden_states.detach().to(torch.float32, copy=True)
                _STEP.ready = None
            _STEP.rows, _STEP.last_positions = rows, positions[: hidden_states.shape[0]]
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


# ---------------------------------------------------------------------------------------------------------------
# The tap (engine core)


def _take_step_rows() -> tuple[torch.Tensor, torch.Tensor] | None:
    rows, positions, ready = _STEP.rows, _STEP.last_positions, _STEP.ready
    _STEP.rows = _STEP.last_positions = _STEP.ready = None
    if rows is None:
        return None
    if ready is not None:
        ready.synchronize()
    return rows, positions


class HiddenStateTap(LogitsProcessor):
    """Sends each tagged request's sampled-row hidden state to the front end (see the module docstring)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self._address = (vllm_config.additional_config or {}).get(CHANNEL_CONFIG_KEY)
        self._socket = None
        self._requests: dict[int, tuple[str, int]] = {}  # batch index -> (tag, prompt length)
        self._warned = False

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        tag = (sampling_params.extra_args or {}).get(REQUEST_TAG_KEY)
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f"extra_args[{REQUEST_TAG_KEY!r}] must be a string")

    def is_argmax_invariant(self) -> bool:
        return False  # it does not change logits; False keeps vLLM from skipping it for greedy requests

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._requests.pop(index, None)
        for index, params, prompt_ids, _output_ids in batch_update.added:
            tag = (getattr(params, "extra_args", None) or {}).get(REQUEST_TAG_KEY)
            if tag is None or prompt_ids is None:
                self._requests.pop(index, None)
            else:
                self._requests[index] = (tag, len(prompt_ids))
        for a, b, direction in batch_update.moved:
            entry_a = self._requests.pop(a, None)
            entry_b = self._requests.pop(b, None)
            if direction == MoveDirectionality.SWAP and entry_b is not None:
                self._requests[a] = entry_b
            if entry_a is not None:
                self._requests[b] = entry_a

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        step = _take_step_rows()
        if step is None or not self._requests or self._address is None:
            return logits
        rows, last_positions = step
        if rows.shape[0] != logits.shape[0]:
            if not self._warned:
                self._warned = True
                log.warning("hidden-state tap: %d rows for %d logits rows; step skipped", rows.shape[0], logits.shape[0])
            return logits
        tags, positions, picked = [], [], []
        for index, (tag, prompt_len) in self._requests.items():
            if index >= rows.shape[0]:
                continue
            position = int(last_positions[index])
            if position < prompt_len - 1:
                continue  # a prefill chunk that does not reach the end of the prompt
            tags.append(tag)
            positions.append(position)
            picked.append(index)
        if picked:
            self._send(encode_rows(tags, positions, rows[picked].numpy()))
        return logits

    def _send(self, frames: list[bytes]) -> None:
        import zmq

        if self._socket is None:
            self._socket = zmq.Context.instance().socket(zmq.PUSH)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, 100_000)
            self._socket.connect(self._address)
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.error("hidden-state channel is full (front end not reading?); rows dropped")
