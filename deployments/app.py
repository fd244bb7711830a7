"""The Serve application: Ingress -> Codec -> SpeechStack -> Reasoner.

`build_app` is the import path the Serve config (cluster/local/profiles, helm/) names, e.g.
`serve run deployments.app:build_app checkpoint='{path: /models/chroma-4b}'`. Its arguments are one
`cluster.settings.AppConfig`; replica resources and autoscaling come from the Serve config, and
`replica_cpus` overrides the CPU share of every replica for a small local cluster.

Every replica that is scaled down or replaced waits for its live turns to end before it stops: the graceful
shutdown timeout is the longest turn the config allows (`AppConfig.longest_turn_s`) plus a margin, so no
admitted turn is cut off; an Ingress replica, which holds live calls, waits for the longest call.
"""

from __future__ import annotations

from cluster.settings import AppConfig
from deployments.codec import CodecDeployment
from deployments.ingress import IngressDeployment
from deployments.reasoner import ReasonerDeployment
from deployments.speech import SpeechStackDeployment


DRAIN_MARGIN_S = 10.0


def build_app(args: dict):
    config = AppConfig.model_validate(args)
    longest_turn_s = config.longest_turn_s()
    options = {"graceful_shutdown_timeout_s": longest_turn_s + DRAIN_MARGIN_S}
    if config.replica_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": config.replica_cpus}

    reasoner = ReasonerDeployment.options(**options).bind(config=config)
    speech = SpeechStackDeployment.options(**options).bind(config=config, reasoner=reasoner)
    codec = CodecDeployment.options(**options).bind(config=config, speech=speech)
    ingress = {**options, "graceful_shutdown_timeout_s": max(longest_turn_s, config.calls.max_call_s) + DRAIN_MARGIN_S}
    return IngressDeployment.options(**ingress).bind(config=config, codec=codec, speech=speech, reasoner=reasoner)
