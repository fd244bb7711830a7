"""The Serve application: Ingress -> Codec -> SpeechStack -> Reasoner.

`build_app` is the import path the Serve config (cluster/ops/profiles, helm/) names, e.g.
`serve run deployments.app:build_app checkpoint='{path: /models/chroma-4b}'`. Its arguments are one
`cluster.config.AppConfig`; replica resources and autoscaling come from the Serve config, and
`replica_cpus` overrides the CPU share of every replica for a small local cluster.
"""

from __future__ import annotations

from cluster.config import AppConfig
from deployments.codec import CodecDeployment
from deployments.ingress import IngressDeployment
from deployments.reasoner import ReasonerDeployment
from deployments.speech import SpeechStackDeployment


def build_app(args: dict):
    config = AppConfig.model_validate(args)
    config.reasoner_path()  # split the thinker out once, here, rather than racing in several replicas
    options = {"ray_actor_options": {"num_cpus": config.replica_cpus}} if config.replica_cpus is not None else {}

    reasoner = ReasonerDeployment.options(**options).bind(config=config)
    speech = SpeechStackDeployment.options(**options).bind(config=config, reasoner=reasoner)
    codec = CodecDeployment.options(**options).bind(config=config, speech=speech)
    return IngressDeployment.options(**options).bind(config=config, codec=codec)
