"""Configuration of the official Chroma checkpoint (`config.json`, model_type `chroma`).

Every value is read from the file; the defaults below are the published Chroma-4B values and only fill
fields an older file may lack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeechTransformerConfig(BaseModel):
    """A Llama-style stack of the speech model (the Backbone or the Decoder)."""

    model_config = ConfigDict(extra="allow")

    vocab_size: int = 2051
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    audio_num_codebooks: int = 8
    rope_parameters: dict[str, Any] = Field(default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0})
    # Decoder only: width of the (shared) audio embedding that its projection maps from.
    audio_embedding_dim: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_rope_fields(cls, data: Any) -> Any:
        # Older transformers wrote `rope_theta` / `rope_scaling` instead of `rope_parameters`.
        if isinstance(data, dict) and "rope_parameters" not in data and "rope_theta" in data:
            rope = dict(data.get("rope_scaling") or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = data["rope_theta"]
            data = {**data, "rope_parameters": rope}
        return data


BACKBONE_DEFAULTS = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
)
DECODER_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, max_position_embeddings=33, audio_embedding_dim=2048,
)


class ChromaConfig(BaseModel):
    """The top level of `config.json`. Thinker and codec configs stay raw dicts: transformers owns them."""

    model_config = ConfigDict(extra="allow")

    model_type: str = "chroma"
    thinker_config: dict[str, Any]
    backbone_config: SpeechTransformerConfig
    decoder_config: SpeechTransformerConfig
    codec_config: dict[str, Any]
    audio_num_codebooks: int = 8
    codebook_pad_token_id: int = 2050
    codebook_eos_token_id: int = 0
    text_start_token_id: int = 151665
    text_end_token_id: int = 151666
    im_end_token_id: int = 151645
    audio_frame_freq: int = 1920

    @model_validator(mode="before")
    @classmethod
    def _fill_speech_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            data["backbone_config"] = {**BACKBONE_DEFAULTS, **(data.get("backbone_config") or {})}
            data["decoder_config"] = {**DECODER_DEFAULTS, **(data.get("decoder_config") or {})}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> "ChromaConfig":
        if self.model_type != "chroma":
            raise ValueError(f"config.json has model_type {self.model_type!r}, expected 'chroma'")
        text_hidden = self.thinker_config.get("text_config", {}).get("hidden_size")
        if text_hidden is not None and text_hidden != self.backbone_config.hidden_size:
            raise ValueError(
                f"thinker hidden size {text_hidden} != backbone hidden size {self.backbone_config.hidden_size}: "
                "thinker states enter the backbone directly, so they must match"
            )
        for name, part in (("backbone", self.backbone_config), ("decoder", self.decoder_config)):
            if part.audio_num_codebooks != self.audio_num_codebooks:
                raise ValueError(f"{name} audio_num_codebooks {part.audio_num_codebooks} != {self.audio_num_codebooks}")
        return self

    @property
    def codebook_vocab_size(self) -> int:
        return self.backbone_config.vocab_size

    @property
    def codec_codebook_size(self) -> int:
        """Codes at or above this id cannot be decoded by Mimi (the speech vocab adds pad/eos ids past it)."""
        return int(self.codec_config.get("codebook_size", 2048))

    @property
    def sample_rate(self) -> int:
        return int(self.codec_config.get("sampling_rate", 24000))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.audio_frame_freq

    def thinker_hf_config(self):
        from transformers import Qwen2_5OmniThinkerConfig

        return Qwen2_5OmniThinkerConfig(**self.thinker_config)

    def codec_hf_config(self):
        from transformers import MimiConfig

        return MimiConfig(**self.codec_config)

    @classmethod
    def from_file(cls, path: str | Path) -> "ChromaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.model_validate(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
