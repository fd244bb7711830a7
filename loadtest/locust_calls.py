"""Locust users that hold live calls: `RealtimeCall` over /v1/realtime (OpenAI Realtime protocol) and `TwilioCall`
over /v1/telephony/twilio, playing Twilio's side (20 ms mu-law frames in real time, marks echoed at playback time).

Each user is a caller: it dials in, speaks in real time (like a microphone), listens to the reply on a real-time
playback clock, pauses like a person thinking, speaks again, barges in on the reply 10 % of the time, and hangs
up after a few turns. Besides the connection it reports, per turn:
  V2V        end of the caller's speech -> first reply audio (ms, the turn detector's silence window included)
  BARGE_IN   the caller starts talking over the reply -> the reply stops (`response.done` cancelled)
  UNDERRUN   a reply whose audio ran dry while played in real time behind a 200 ms jitter buffer (a failure)
  REFUSED    a call refused at its handshake (503/429; Twilio: closed 1013) or a reply refused in-band (no reply
             place within the queue's budget): counted apart, and tried again after Retry-After with jitter
             (loadtest/refusals.py); V2V then includes the wait

    chroma-serve up
    locust -f loadtest/locust_calls.py --host http://127.0.0.1:8000 --headless --users 4 --spawn-rate 1 --run-time 2m
    locust -f loadtest/locust_calls.py TwilioCall --host http://127.0.0.1:8000 --headless --users 4 ...   # one kind

Every call runs the asyncio call client (cluster/clients/realtime.py) in its own event loop, in a real thread of
gevent's thread pool (greenlets share one thread, so their loops would collide).
The API key comes from CHROMA_API_KEY, else the local cluster's generated key. Caller speech is espeak-ng's; the
tiny checkpoint's weights are RANDOM anyway: timings only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from pathlib import Path

import gevent
import websockets
from locust import User, between, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local.supervisor import client_api_key  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from cluster.clients.realtime import RealtimeCaller  # noqa: E402
from cluster.clients.phone import LINE_RATE, CarrierCall  # noqa: E402
from loadtest.refusals import REFUSED_STATUSES, Refused, error_code, retrying  # noqa: E402
from model.processing.audio import CODEC_RATE, encode_wav  # noqa: E402
from model.testing.speech import speak, speak_at  # noqa: E402

BARGE_IN_PROBABILITY = 0.1
REFUSAL_WAIT_S = 0.5


# Synthesised once, here: espeak-ng runs as a subprocess, which gevent cannot start from the calls' threads.
UTTERANCES = [speak_at(t, CODEC_RATE) for t in ("Hello, I would like to check my order.", "Can you say that again, please?",
                                 "What time do you open tomorrow?", "Thank you, that is all.")]
INTERRUPTION = speak_at("Wait, stop.", CODEC_RATE)
VOICE_TEXT = "This is the voice every caller hears."
VOICE_CLIP = encode_wav(*speak(VOICE_TEXT))
_voice_id: str | None = None  # one cloned voice per Locust process, shared by its calls


class Caller(User):
    abstract = True
    wait_time = between(0.5, 2.0)  # between one call's hang-up and the next call

    def on_start(self) -> None:
        global _voice_id
        if _voice_id is None:
            reply = httpx.post(f"{self.host}/v1/voices", headers={"Authorization": f"Bearer {client_api_key()}"},
                               files={"audio": ("voice.wav", VOICE_CLIP, "audio/wav")},
                               data={"transcript": VOICE_TEXT, "name": "locust"})
            reply.raise_for_status()
            _voice_id = reply.json()["id"]

    @task
    def call(self) -> None:
        started = time.perf_counter()
        try:
            # Greenlets share one thread, and so would their asyncio loops: each call gets a real thread.
            gevent.get_hub().threadpool.spawn(asyncio.run, self._call()).get()
        except Exception as error:  # a refused or broken call is a failed request
            self._report("CALL", self.name, started, error)
            return
        self._report("CALL", self.name, started)

    def _report(self, kind: str, name: str, since: float, error: Exception | None = None, at: float | None = None) -> None:
        clock = time.perf_counter if kind == "CALL" else time.monotonic
        elapsed = ((at if at is not None else clock()) - since) * 1000
        self.environment.events.request.fire(request_type=kind, name=name, response_time=elapsed, response_length=0,
                                             exception=error, context={})


class RealtimeCall(Caller):
    name = "realtime call"

    async def _call(self) -> None:
        call = await retrying(self.environment, self._dial)
        try:
            await call.configure(_voice_id, "Be brief.")
            for _ in range(random.randint(2, 4)):
                if not await self._turn(call):
                    return  # barged in and hung up
                await asyncio.sleep(random.uniform(0.3, 1.2))
        finally:
            await call.__aexit__(None, None, None)

    async def _dial(self) -> RealtimeCaller:
        call = RealtimeCaller(self.host, client_api_key())
        try:
            return await call.__aenter__()
        except websockets.exceptions.InvalidStatus as refused:
            response = refused.response
            if response.status_code not in REFUSED_STATUSES:
                raise
            raise Refused("realtime call", error_code(response.body), response.headers.get("Retry-After")) from None

    async def _first_audio(self, call: RealtimeCaller) -> dict:
        """The reply's first audio delta. A reply refused in-band (no reply place freed up in time) is asked for
        again after the wait: the caller's turn is still there to be answered."""
        asked, after = False, len(call.events)

        async def attempt() -> dict:
            nonlocal asked, after
            if asked:
                after = len(call.events)
                await call.send({"type": "response.create"})
            asked = True
            found = await call.wait_for(("response.output_audio.delta", "response.done"), timeout_s=60, after=after)
            if found["type"] == "response.done":
                error = (found["response"].get("status_details") or {}).get("error") or {}
                if error.get("code") == "over_capacity":
                    await call.next_reply(timeout_s=5)  # the refused reply is taken: the next one is the retry's
                    raise Refused("realtime reply", "over_capacity")
                raise RuntimeError(f"the reply ended {found['response']['status']} before any audio: {error}")
            return found

        return await retrying(self.environment, attempt)

    async def _turn(self, call: RealtimeCaller) -> bool:
        await call.say(random.choice(UTTERANCES))
        listening = asyncio.create_task(call.say(np.zeros(60 * CODEC_RATE, np.float32)))
        try:
            first = await self._first_audio(call)
            self._report("V2V", "voice-to-voice", call.speech_ended_at, at=first["_at"])
            if random.random() < BARGE_IN_PROBABILITY:
                await asyncio.sleep(1.0)
                listening.cancel()
                interrupted = time.monotonic()
                barge = asyncio.create_task(call.say(INTERRUPTION, trailing_silence_s=0.5))
                reply = await call.next_reply(timeout_s=60)
                self._report("BARGE_IN", "to silence", interrupted, at=reply.done_at)
                await barge
                return False
            reply = await call.next_reply(timeout_s=120)
        finally:
            listening.cancel()
        if reply.underruns():
            self._report("UNDERRUN", "reply ran dry", time.monotonic(),
                         RuntimeError(f"{reply.underruns()} gaps in real-time playback"))
        await asyncio.sleep(max(0.0, reply.first_audio_at + 0.2 + reply.audio_ms / 1000 - time.monotonic()))  # it plays out
        return True


class TwilioCall(Caller):
    name = "twilio call"

    async def _call(self) -> None:
        call = await retrying(self.environment, self._dial)
        try:
            for _ in range(random.randint(2, 4)):
                if not await self._turn(call):
                    return
                await asyncio.sleep(random.uniform(0.3, 1.2))
            underruns = call.received.underruns
            if underruns:
                self._report("UNDERRUN", "line went quiet", time.monotonic(), RuntimeError(f"{underruns} gaps"))
        finally:
            await call.hang_up()

    async def _dial(self) -> CarrierCall:
        """A started stream. The server admits the call at `start` and refuses it by closing with 1013 (try again
        later) within milliseconds, so a stream still open after REFUSAL_WAIT_S was taken."""
        call = CarrierCall(self.host, {"api_key": client_api_key(), "voice_id": _voice_id})
        await call.__aenter__()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(call.closed.wait(), REFUSAL_WAIT_S)
        if call.closed.is_set():
            await call.hang_up()
            if call.close_code == 1013:
                raise Refused("twilio call", call.ws.close_reason)
            raise RuntimeError(f"the call was closed at its start: {call.close_code} {call.ws.close_reason}")
        return call

    async def _turn(self, call: CarrierCall) -> bool:
        before = len(call.received.media)
        await call.say(random.choice(UTTERANCES), CODEC_RATE)
        listening = asyncio.create_task(call.say(np.zeros(60 * LINE_RATE, np.float32), LINE_RATE))
        try:
            await call.wait(lambda r: len(r.media) > before, timeout_s=60)
            self._report("V2V", "voice-to-voice (twilio)", call.speech_ended_at, at=call.received.media[before][0])
            if random.random() < BARGE_IN_PROBABILITY:
                await asyncio.sleep(1.0)
                listening.cancel()
                clears, interrupted = len(call.received.clears), time.monotonic()
                await call.say(INTERRUPTION, CODEC_RATE)
                await call.wait(lambda r: len(r.clears) > clears, timeout_s=30)
                self._report("BARGE_IN", "to clear", interrupted, at=call.received.clears[clears])
                return False
            await call.reply_over()
        finally:
            listening.cancel()
        return True
