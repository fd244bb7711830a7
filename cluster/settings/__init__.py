"""The application's configuration as one typed tree: the Serve app's arguments (`deployments.app:build_app`),
the profiles in cluster/local/profiles and the Helm chart's serveConfigV2 all validate against `AppConfig`.

Each concern has its settings model in a module of this package (the engines' in `model.settings`); `AppConfig`
nests them and checks the rules that span stages. Unknown keys are errors everywhere (extra="forbid"). Settings
import nothing heavy (no torch, Ray, Redis client or web framework), so any process may parse a config: what
needs more imports it in the method that uses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.settings.admission import AdmissionSettings
from cluster.settings.api import ApiSettings
from cluster.settings.calls import CallSettings, TelephonySettings
from cluster.settings.state import StateSettings
from cluster.settings.tenants import TenantSettings
from cluster.settings.turns import HistorySettings, TurnSettings
from model.settings import CodecSettings, ReasonerSettings, SpeechEngineSettings


class CheckpointSettings(BaseModel):
    """Which checkpoint, and where its components run."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the Chroma checkpoint directory (official layout)")
    reasoner_dir: str | None = Field(
        None, description="the Reasoner's directory (the thinker alone, `chroma-serve checkpoint split`), split there on "
        "first start if missing; default for vLLM: <path>/thinker, split on first start, or on a read-only checkpoint "
        "once on the Reasoner's node under ~/.cache/chroma-serve/thinkers; the transformers engine reads the checkpoint",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description='"cpu" or "cuda"')


def _node_thinker_dir(checkpoint: str) -> Path:
    """This node's place for the thinker split out of `checkpoint` (under the tools' home, ~/.cache/chroma-serve:
    kept across restarts on a host, the container's own in a pod), named after the checkpoint's path and its files'
    sizes and times, so a changed checkpoint is split again."""
    from model.testing.tiny import CHROMA_SERVE_HOME

    root = Path(checkpoint).resolve()
    stamp = [str(root)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                           for f in sorted(root.glob("*")) if f.suffix in (".json", ".safetensors")]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return CHROMA_SERVE_HOME / "thinkers" / f"{root.name}-{digest}"


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: CheckpointSettings
    reasoner: ReasonerSettings = Field(default_factory=ReasonerSettings)
    speech: SpeechEngineSettings = Field(default_factory=SpeechEngineSettings)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    turns: TurnSettings = Field(default_factory=TurnSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    tenants: TenantSettings = Field(default_factory=TenantSettings)
    calls: CallSettings = Field(default_factory=CallSettings)
    telephony: TelephonySettings = Field(default_factory=TelephonySettings)
    replica_cpus: float | None = Field(None, gt=0, description="CPU share of every replica (small local clusters)")

    def reasoner_path(self) -> str:
        """Where the Reasoner loads from, on the node that asks (the Reasoner's: not necessarily the one the app was
        built on). vLLM loads the thinker alone: `reasoner_dir`, else `<path>/thinker`, split out on first use;
        where the checkpoint is read-only (the Helm chart mounts it so), split once into this node's own place."""
        model = self.checkpoint
        if self.reasoner.engine == "hf":
            return model.reasoner_dir or model.path
        from model.chroma.checkpoint import split_thinker_once

        if model.reasoner_dir:
            return str(split_thinker_once(model.path, model.reasoner_dir))
        try:
            return str(split_thinker_once(model.path, Path(model.path) / "thinker"))
        except OSError:  # nothing can be written beside it
            return str(split_thinker_once(model.path, _node_thinker_dir(model.path)))

    def reasoner_context(self) -> int:
        """The Reasoner's context in positions: vLLM's max_model_len where set, else the thinker's own."""
        if self.reasoner.engine == "vllm" and self.reasoner.vllm.max_model_len is not None:
            return self.reasoner.vllm.max_model_len
        config = json.loads((Path(self.checkpoint.path) / "config.json").read_text())
        return config["thinker_config"]["text_config"]["max_position_embeddings"]

    def reasoner_max_audios(self) -> int | None:
        """The most caller utterances one prompt may hold (vLLM's limit_mm_per_prompt; none on transformers)."""
        return self.reasoner.vllm.max_audios_per_prompt if self.reasoner.engine == "vllm" else None

    def longest_turn_s(self) -> float:
        """The longest an admitted turn may last: its start timeout, then its longest reply at real time (admitted
        turns run faster than that). Replicas wait this long for their turns before shutting down."""
        from model.chroma.turn import FRAME_SECONDS

        return self.admission.start_timeout_s + self.turns.max_frames * FRAME_SECONDS

    @model_validator(mode="after")
    def _stages_fit_together(self) -> AppConfig:
        speech, codec = self.speech, self.codec
        if codec.max_streams < speech.max_slots + speech.max_queue:
            raise ValueError(
                f"codec.max_streams ({codec.max_streams}) must be at least speech.max_slots + speech.max_queue "
                f"({speech.max_slots} + {speech.max_queue}): every turn the speech stack takes needs a codec stream"
            )
        if self.turns.max_frames > speech.max_frames:
            raise ValueError(
                f"turns.max_frames ({self.turns.max_frames}) exceeds the speech engine's limit speech.max_frames "
                f"({speech.max_frames})"
            )
        if self.reasoner.engine == "vllm" and self.api.max_audio_seconds > self.reasoner.vllm.max_audio_seconds:
            raise ValueError(
                f"api.max_audio_seconds ({self.api.max_audio_seconds}) exceeds what the Reasoner is sized for, "
                f"reasoner.vllm.max_audio_seconds ({self.reasoner.vllm.max_audio_seconds})"
            )
        return self
