"""The Serve application: Ingress -> Codec -> SpeechStack -> Reasoner.

`build_app` is the import path the Serve config (cluster/, helm/) names, e.g.
`serve run deployments.app:build_app checkpoint=/models/chroma-4b`. Replica resources and autoscaling come from
the Serve config; `replica_cpus` overrides the CPU share of every replica for a small local cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from deployments.codec import CodecDeployment
from deployments.ingress import IngressDeployment
from deployments.reasoner import ReasonerDeployment
from deployments.speech import SpeechStackDeployment


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    thinker: str | None = None  # the thinker-only directory vLLM loads; split next to the checkpoint if absent
    reasoner_engine: Literal["vllm", "hf"] = "vllm"
    reasoner_kwargs: dict = {}
    speech_engine: dict = {}  # SpeechEngineSettings fields
    codec_max_streams: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    redis_url: str | None = None
    redis_url_env: str | None = None  # an env var holding the URL with its password; wins over redis_url
    api_keys_path: str | None = None  # JSON {"api-key": "tenant"}, or a file holding it
    max_tokens: int = 256
    max_frames: int = 750
    replica_cpus: float | None = None


def build_app(args: dict):
    app = AppArgs.model_validate(args)
    thinker = app.thinker or str(Path(app.checkpoint) / "thinker")
    if not (Path(thinker) / "config.json").is_file():
        from model.checkpoint import split_thinker

        split_thinker(app.checkpoint, thinker)
    redis_url = (os.environ.get(app.redis_url_env) if app.redis_url_env else None) or app.redis_url
    options = {"ray_actor_options": {"num_cpus": app.replica_cpus}} if app.replica_cpus is not None else {}

    reasoner = ReasonerDeployment.options(**options).bind(thinker, app.reasoner_engine, app.reasoner_kwargs)
    speech = SpeechStackDeployment.options(**options).bind(app.checkpoint, reasoner, app.speech_engine, app.dtype, app.device)
    codec = CodecDeployment.options(**options).bind(app.checkpoint, speech, app.codec_max_streams, 2, app.dtype, app.device)
    return IngressDeployment.options(**options).bind(codec, app.checkpoint, redis_url, app.api_keys_path, app.max_tokens, app.max_frames)
