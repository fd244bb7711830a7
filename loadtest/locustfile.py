"""Locust users that behave like phone calls into a chroma-serve cluster.

Each user is one line of a telephony backend: it opens a session in the shared cloned voice, then for a few
turns sends the caller's utterance as G.711 mu-law 8 kHz (what a phone line carries), streams the reply back
as mu-law 8 kHz, "plays" it in real time, pauses like a caller thinking, and speaks again; sometimes the caller
barges in and hangs up on the reply halfway. Then it hangs up (deletes the session) and the next call starts.

Besides Locust's per-request rows it reports, per turn:
  TTFA       end of the upload -> first reply audio byte (ms)
  turn       end of the upload -> last reply byte (ms); response_length = reply bytes
  underrun   a turn whose audio ran dry while played in real time behind a 200 ms jitter buffer (a failure)
  REFUSED    a turn or session refused (503, 429): counted apart, and tried again after Retry-After with jitter
             (loadtest/refusals.py)

    chroma-serve up
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless --users 8 --spawn-rate 1 --run-time 2m

The API key comes from CHROMA_API_KEY, else the local cluster's generated key. Caller audio is synthetic
speech-like noise (the tiny checkpoint's weights are RANDOM anyway): timings only.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local.supervisor import client_api_key  # noqa: E402
from loadtest.refusals import MAX_ATTEMPTS, REFUSED_STATUSES, error_code, report_refusal, retry_delay_s  # noqa: E402
from model.processing.audio import encode_mulaw, encode_wav, resample
from model.testing.speech import synthetic_speech  # noqa: E402

MULAW_RATE = 8000
BARGE_IN_PROBABILITY = 0.1
PLAYOUT_DELAY_S = 0.2  # the caller's jitter buffer: playback starts this long after the first byte
UTTERANCES = [encode_mulaw(resample(synthetic_speech(16000, seconds, seed), 16000, MULAW_RATE))
              for seed, seconds in enumerate((1.0, 1.5, 2.0, 2.5, 3.0))]
VOICE_CLIP = encode_wav(synthetic_speech(24000, 3.0, seed=99), 24000)
_voice_id: str | None = None  # one cloned voice per Locust process, shared by its calls


class PhoneCall(HttpUser):
    wait_time = between(0.5, 2.0)  # between one call's hang-up and the next call

    def on_start(self) -> None:
        global _voice_id
        self.client.headers["Authorization"] = f"Bearer {client_api_key()}"
        if _voice_id is None:
            reply = self.client.post(
                "/v1/voices", files={"audio": ("voice.wav", VOICE_CLIP, "audio/wav")},
                data={"transcript": "This is the voice every caller hears.", "name": "locust"},
            )
            reply.raise_for_status()
            _voice_id = reply.json()["id"]

    @task
    def call(self) -> None:
        for attempt in itertools.count():
            with self.client.post("/v1/sessions", json={"voice_id": _voice_id, "output_format": "mulaw_8k"},
                                  catch_response=True) as created:
                if created.status_code == 201:
                    break
                if not self.refused(created, "session", attempt):
                    created.failure(f"session: HTTP {created.status_code} {created.text[:200]}")
                    return
        session_id = created.json()["id"]
        try:
            for _ in range(random.randint(2, 4)):
                if not self.turn(session_id):
                    break  # the caller barged in and hung up, or the turn failed
                time.sleep(random.uniform(0.3, 1.2))  # the caller thinks, then speaks again
        finally:
            self.client.delete(f"/v1/sessions/{session_id}", name="/v1/sessions/[id]")

    def turn(self, session_id: str) -> bool:
        """One caller utterance and the streamed reply; False when the call ends here."""
        barge_in = random.random() < BARGE_IN_PROBABILITY
        headers = {"Content-Type": "audio/basic", "Accept": "audio/basic"}
        utterance = random.choice(UTTERANCES)
        for attempt in itertools.count():
            sent = time.perf_counter()
            with self.client.post(f"/v1/sessions/{session_id}/turns", data=utterance, headers=headers, stream=True,
                                  name="/v1/sessions/[id]/turns", catch_response=True) as reply:
                if reply.status_code == 200:
                    return self.streamed(reply, sent, barge_in)
                if not self.refused(reply, "turn", attempt):
                    reply.failure(f"HTTP {reply.status_code} {reply.text[:200]}")
                    return False

    def refused(self, response, what: str, attempt: int) -> bool:
        """A refusal to try again (counted apart, then a wait of Retry-After with jitter); False: a failure."""
        if response.status_code not in REFUSED_STATUSES or attempt == MAX_ATTEMPTS - 1:
            return False
        response.success()
        report_refusal(self.environment, what, error_code(response.text))
        time.sleep(retry_delay_s(response.headers.get("Retry-After")))
        return True

    def streamed(self, reply, sent: float, barge_in: bool) -> bool:
        """The reply streamed and played in real time; False when the caller barged in and hung up."""
        events = self.environment.events.request
        first = None
        received = 0
        underrun = False
        for chunk in reply.iter_content(chunk_size=None):
            now = time.perf_counter()
            if first is None:
                first = now
                events.fire(request_type="TTFA", name="first audio", response_time=1000 * (now - sent),
                            response_length=len(chunk), exception=None, context={})
            elif now > first + PLAYOUT_DELAY_S + received / MULAW_RATE:  # mu-law: one byte per sample
                underrun = True
            received += len(chunk)
            if barge_in and received >= MULAW_RATE:  # one second in, the caller talks over the reply
                reply.success()
                return False
        reply.success()
        done = time.perf_counter()
        events.fire(request_type="TURN", name="whole reply", response_time=1000 * (done - sent),
                    response_length=received, exception=None, context={})
        if underrun:
            events.fire(request_type="UNDERRUN", name="reply ran dry", response_time=0, response_length=0,
                        exception=RuntimeError("the reply audio ran dry during real-time playback"), context={})
        if first is not None:  # let the rest of the reply play out before the caller answers
            time.sleep(max(0.0, first + PLAYOUT_DELAY_S + received / MULAW_RATE - done))
        return True
