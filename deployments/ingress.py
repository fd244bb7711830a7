"""Serve deployment of the HTTP API (cluster/api) over the deployment chain.

`RayTurnBackend` is the API's TurnBackend on Serve handles: a turn is one streaming call to the Codec, which
pulls frames from the SpeechStack, which pulls (token, hidden state) pairs from the Reasoner. Closing the
reply (the caller hung up) cancels that call, and each stage cancels its own upstream. The turn's prompt goes
into Ray's object store once; the Codec and the SpeechStack hand on its reference, the Reasoner reads it. What
each stage received (bytes of its request) goes into the turn's TurnDone.

For admission control it reads every stage's state: each stage's `probe()` (its health check, and the turns
one replica holds at once) through the same handles the turns use, so a stage whose replicas are gone or
restarting does not answer, and the number of live (RUNNING) replicas from the Serve controller.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle

from cluster.admission.stages import StageStatus
from cluster.api.app import build_api
from cluster.pipeline.history import HistoryPolicy, TurnPlan
from cluster.pipeline.turn import STAGES, ReplyEvent, build_turn_request, clone_voice, reply_events
from cluster.settings import AppConfig
from cluster.settings.turns import TurnSettings
from cluster.state.store import Session, StateStore, Voice, redis_client
from cluster.state.tenants import TenantDirectory
from deployments.streams import relay, result, this_replica
from model.chroma.turn import VoicePrompt
from model.engines.realtime import Headroom
from model.processing.processor import ChromaProcessor, VoicePromptInputs

log = logging.getLogger(__name__)


class RayTurnBackend:
    def __init__(
        self, stages: dict[str, DeploymentHandle], processor: ChromaProcessor, turns: TurnSettings,
        history: HistoryPolicy, probe_timeout_s: float, app_name: str,
    ):
        self.codec = stages["Codec"]  # the stage a turn is sent to: it pulls frames from the speech stack
        self.stage_handles = stages
        self.processor = processor
        self.turns = turns
        self.history = history
        self.probe_timeout_s = probe_timeout_s
        self.app_name = app_name
        self._replicas: dict[str, int] = {}  # last known RUNNING replicas per stage
        self._answers: dict[str, dict[str | None, Headroom]] = {name: {} for name in stages}  # latest per replica

    async def stages(self) -> list[StageStatus]:
        names = list(self.stage_handles)
        probes = await asyncio.gather(self._running_replicas(), *(self._probe(n) for n in names))
        replicas = probes[0]
        return [self._status(name, replicas.get(name, 0), answer) for name, answer in zip(names, probes[1:])]

    def _status(self, name: str, replicas: int, answer: tuple[Headroom | None, str]) -> StageStatus:
        """Each reading reaches one replica: the stage's capacity sums the latest answer of each replica heard."""
        headroom, problem = answer
        answers = self._answers[name]
        if headroom is not None:
            answers.pop(headroom.replica, None)  # re-inserted last: the newest answers are the last ones
            answers[headroom.replica] = headroom
        while len(answers) > max(replicas, 1):  # replicas gone (scaled down, replaced): their oldest answers go
            answers.pop(next(iter(answers)))
        # A replica that answered is live even when the controller has not counted it yet.
        return StageStatus.across(name, list(answers.values()), max(replicas, 0 if problem else 1), problem)

    async def _probe(self, name: str) -> tuple[Headroom | None, str]:
        """(one replica's headroom, problem): a replica's answer, or why there was none."""
        response = self.stage_handles[name].probe.remote()
        try:
            return await asyncio.wait_for(result(response, name), self.probe_timeout_s), ""
        except TimeoutError:
            response.cancel()
            return None, "no replica answers"
        except Exception as error:  # StageFailed (the replica is gone) or its health check failed
            log.info("probe of %s failed: %r", name, error)
            return None, "failing its health check"

    async def _running_replicas(self) -> dict[str, int]:
        try:
            details = await asyncio.wait_for(asyncio.to_thread(_serve_details), self.probe_timeout_s)
            deployments = details["applications"][self.app_name]["deployments"]
            self._replicas = {name: sum(r["state"] == "RUNNING" for r in deployments[name]["replicas"])
                              for name in self.stage_handles}
        except Exception as error:  # the controller is away (restarting): keep the last count
            log.warning("reading the Serve controller's status failed: %r", error)
        return self._replicas

    async def clone_voice(self, transcript: str, audio: np.ndarray, sample_rate: int) -> VoicePrompt:
        return await clone_voice(self.processor, self._encode_voice, transcript, audio, sample_rate)

    async def _encode_voice(self, inputs: VoicePromptInputs) -> VoicePrompt:
        return await result(self.codec.encode_voice.remote(inputs), "Codec")

    def run_turn(self, turn_id: str, voice: Voice, session: Session, plan: TurnPlan) -> AsyncIterator[ReplyEvent]:
        request = build_turn_request(turn_id, voice, session, plan, self.turns)
        prompt = request.reasoner.prompt
        # The reference lives in `request` until the reply ends: the stages borrow it, the Reasoner reads it once.
        request.reasoner = replace(request.reasoner, prompt=ray.put(prompt))
        shipped = {"Codec": _size(request), "SpeechStack": _size(request), "Reasoner": _size(prompt)}
        reply = self.codec.options(stream=True).reply
        return reply_events(self.processor, relay(lambda: reply.remote(request, this_replica()), "Codec"), shipped)

    def transcribe(self, audio: bytes) -> AsyncIterator[str]:
        transcribe = self.stage_handles["Reasoner"].options(stream=True).transcribe
        return relay(lambda: transcribe.remote(audio, self.turns.transcript_tokens, this_replica()), "Reasoner")


def _serve_details() -> dict:
    """The Serve controller's instance details as it sends them (what `serve.status()` parses). Read as the plain
    dict: parsing it into `serve.status()`'s models re-pickles every deployment's request router class, about 20 ms
    of CPU under the GIL, which every 0.5 s poll took from this replica's event loop (refusals waited on it)."""
    return _get_global_client().get_serve_details()


def _size(value) -> int:
    """Bytes of `value` as pickled (what Ray ships of it; an object reference counts as its id)."""
    return len(pickle.dumps(value, protocol=5))


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, config: AppConfig, codec: DeploymentHandle, speech: DeploymentHandle, reasoner: DeploymentHandle):
        stages = dict(zip(STAGES, (reasoner, speech, codec), strict=True))
        processor = ChromaProcessor.from_pretrained(config.checkpoint.path)
        history = HistoryPolicy(processor, config.reasoner_context(), config.turns.reply_tokens(),
                                config.reasoner_max_audios(), config.history)
        self.backend = RayTurnBackend(
            stages, processor, config.turns, history, config.admission.probe_timeout_s,
            serve.get_replica_context().app_name,
        )
        self.state = StateStore(redis_client(config.state), config.state)
        self.tenants = TenantDirectory.from_settings(config.tenants)
        self.config = config

    def __serve_build_asgi_app__(self):
        config = self.config
        return build_api(self.state, self.tenants, self.backend, config.api, admission=config.admission,
                         call_settings=config.calls, telephony_settings=config.telephony)
