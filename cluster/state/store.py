"""Cluster state in Redis: voices and sessions, per tenant (plain Python; no Ray, no HTTP).

Layout, for key prefix `chroma` and tenant `acme` (every key names its tenant, so another tenant's ids are simply
not there; the braces are Redis Cluster hash tags that keep each transaction's keys in one slot):
  chroma:{acme}:voices                     set of the tenant's voice ids
  chroma:{acme}:voice:voice_<hex>          hash: `meta` (Voice JSON without codes), `codes` (int16 LE bytes [F, K])
  chroma:acme:session:{sess_<hex>}         string: Session JSON (settings + turn history without audio)
  chroma:acme:session:{sess_<hex>}:audio   hash: message id -> the caller's audio of that user turn, 16 kHz PCM16
                                           as FLAC (lossless: it decodes to the very samples the Reasoner heard)
Voices never expire; both session keys share the session TTL, refreshed whenever the session is read or written.
The history holds what the Reasoner's context holds: messages dropped by the session's truncation (or deleted by
the client) leave the document and their audio leaves the hash, so a session's state is bounded by the context.

Durability comes from Redis itself: a voice or a committed turn is acknowledged only once it is on disk. Redis
answers a write after fsyncing it when it runs with `appendonly yes` and `appendfsync always` (WAITAOF, which
could make single writes durable on an `everysec` server, needs Redis 7.2); the store checks that the server
runs so (CONFIG GET, once a minute) before it writes a voice or a turn, and refuses with 503 `state_not_durable`
when it does not. `cluster.state.redis_server` and the Helm chart run redis-server that way.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import redis
import redis.asyncio
import soundfile
from pydantic import BaseModel, Field, model_validator
from redis.exceptions import WatchError

from cluster.settings.state import StateSettings
from cluster.state.history import DroppedHistory, HistoryDrop, Truncation
from model.chroma.sampling import SamplingParams
from model.errors import Conflict, NotFound, StateUnavailable
from model.processing.audio import REASONER_RATE, ReplyFormat


class VersionConflict(Conflict):
    """The session changed after the caller read it (another turn committed first); nothing was written."""

    def __init__(self, session_id: str, expected: int, found: int | None = None):
        found_text = "changed meanwhile" if found is None else f"is at version {found}"
        super().__init__(f"session {session_id!r} {found_text}, the turn expected version {expected}")
        self.session_id = session_id


class Voice(BaseModel):
    id: str
    tenant: str
    name: str
    transcript: str
    transcript_ids: list[int]
    num_frames: int
    num_codebooks: int
    valid_frames: int  # reference frames past this are padding (see model.chroma.turn.VoicePrompt)
    created_at: datetime
    # Mimi codes [num_frames, num_codebooks] as little-endian int16; left out of dumps (API bodies, the meta JSON).
    codes: bytes = Field(exclude=True, repr=False)

    @classmethod
    def new(cls, tenant: str, name: str, transcript: str, transcript_ids, codes, valid_frames: int) -> Voice:
        """A fresh voice with a new id. `codes`: the reference audio's Mimi codes, a CPU torch tensor or numpy
        array [F, K] of integers. ValueError names what is wrong with them."""
        array = np.asarray(codes)
        if array.ndim != 2 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"voice codes must be a non-empty integer array [frames, codebooks], got {array.shape}")
        if array.min() < 0 or array.max() > _INT16.max:
            raise ValueError(f"voice codes must lie in 0..{_INT16.max}")
        if not 0 < valid_frames <= array.shape[0]:
            raise ValueError(f"valid_frames must be in 1..{array.shape[0]}, got {valid_frames}")
        return cls(
            id=f"voice_{uuid.uuid4().hex}", tenant=tenant, name=name, transcript=transcript,
            transcript_ids=[int(t) for t in transcript_ids], num_frames=array.shape[0], num_codebooks=array.shape[1],
            valid_frames=valid_frames, created_at=_now(), codes=array.astype("<i2").tobytes(),
        )

    def codes_array(self) -> np.ndarray:
        """[num_frames, num_codebooks] int64, as the speech stack takes them."""
        return np.frombuffer(self.codes, dtype="<i2").reshape(self.num_frames, self.num_codebooks).astype(np.int64)


class SessionSampling(SamplingParams):
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class HistoryMessage(BaseModel):
    """One message of the conversation: a side of a committed turn (the caller's audio, kept beside the document, or
    the reply text), or a text message a live call's client put in (`append_message`)."""

    id: str = ""  # the message's item id (a live call's item ids; item_<hex> for HTTP turns)
    role: Literal["user", "assistant", "system"]
    text: str | None = None  # the reply, a typed user message, or a client's system or assistant message
    audio_bytes: int = 0  # a spoken user message: size of its 16 kHz PCM16 audio kept beside the document
    audio_id: str | None = None  # that audio's content digest (`audio_digest`): engines cache what they compute by it
    positions: int | None = None  # what it takes of the Reasoner's context (None: not counted yet)
    transcript: str | None = None  # a spoken user message, as transcribed (a live call's input transcription); the
    # Reasoner reads its audio, never this

    @property
    def audio_samples(self) -> int:
        return self.audio_bytes // 2


def audio_digest(pcm16: bytes) -> str:
    """A name for a caller utterance's content: the same samples, the same id, so what the Reasoner computed for
    them (vLLM's processor and prefix caches) is found again at every later turn."""
    return "aud_" + hashlib.blake2b(pcm16, digest_size=16).hexdigest()


def _flac(pcm16: bytes) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.frombuffer(pcm16, dtype="<i2"), REASONER_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _pcm16(stored: bytes) -> bytes:
    """PCM16 bytes of stored caller audio (FLAC; raw PCM16 from before FLAC)."""
    if not stored.startswith(b"fLaC"):
        return stored
    samples, _ = soundfile.read(io.BytesIO(stored), dtype="int16")
    return samples.astype("<i2").tobytes()


class KeyPress(BaseModel):
    """A DTMF digit the caller pressed during a live call (for a backend's menus)."""

    digit: str
    at: datetime


MAX_KEY_PRESSES = 64  # a session keeps the latest ones
WRITE_ATTEMPTS = 3  # reads of a session between our read and our write (they refresh its TTL) make us read again


class Session(BaseModel):
    id: str
    tenant: str
    voice_id: str
    system_prompt: str = ""
    output_format: ReplyFormat = ReplyFormat.PCM16_24K
    sampling: SessionSampling = Field(default_factory=SessionSampling)
    truncation: Truncation = "auto"
    history: list[HistoryMessage] = Field(default_factory=list)
    dropped: DroppedHistory = Field(default_factory=DroppedHistory)
    version: int = 0  # committed turns; `append_turn` takes it back to refuse a turn built on a stale history
    key_presses: list[KeyPress] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime

    @model_validator(mode="after")
    def _name_old_messages(self) -> Session:
        """Sessions stored before messages had ids kept their audio under the message's index: that is its id."""
        for index, message in enumerate(self.history):
            message.id = message.id or str(index)
        return self


_VOICE_ID = re.compile(r"voice_[0-9a-f]{32}")
_SESSION_ID = re.compile(r"sess_[0-9a-f]{32}")
_INT16 = np.iinfo(np.int16)


def _now() -> datetime:
    return datetime.now(UTC)


def redis_client(settings: StateSettings) -> redis.asyncio.Redis:
    """Binary-safe client (no response decoding: codes and audio are raw bytes).

    Retries on connection errors: after Redis restarts (or fails over) every pooled connection is stale, and
    redis-py's asyncio client does not retry by default, so the first requests would fail for nothing."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    return redis.asyncio.Redis.from_url(
        settings.url(),
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), settings.connection_retries),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


class StateStore:
    """Voices and sessions of every tenant. `client` must not decode responses (see `redis_client`)."""

    DURABILITY_RECHECK_S = 60.0

    def __init__(self, client: redis.asyncio.Redis, settings: StateSettings | None = None):
        self.redis = client
        self.settings = settings or StateSettings()
        self._durable_until = 0.0

    async def _require_durable(self) -> None:
        """StateUnavailable unless the server acknowledges writes only once they are fsynced."""
        if not self.settings.require_fsync or time.monotonic() < self._durable_until:
            return
        config = await self.redis.config_get("append*")
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            raise StateUnavailable(
                "the state store does not write every change to disk before acknowledging it (Redis needs appendonly "
                "yes and appendfsync always), so voices and turns are not accepted",
                code="state_not_durable",
            )
        self._durable_until = time.monotonic() + self.DURABILITY_RECHECK_S

    # keys
    def _voices_key(self, tenant: str) -> str:
        return f"{self.settings.key_prefix}:{{{tenant}}}:voices"

    def _voice_key(self, tenant: str, voice_id: str) -> str:
        return f"{self.settings.key_prefix}:{{{tenant}}}:voice:{voice_id}"

    def _session_keys(self, tenant: str, session_id: str) -> tuple[str, str]:
        key = f"{self.settings.key_prefix}:{tenant}:session:{{{session_id}}}"
        return key, key + ":audio"

    # voices
    async def create_voice(
        self, tenant: str, name: str, transcript: str, transcript_ids: list[int], codes, valid_frames: int
    ) -> Voice:
        """`codes`: the reference audio's Mimi codes, a CPU torch tensor or numpy array [F, K] of integers."""
        voice = Voice.new(tenant, name, transcript, transcript_ids, codes, valid_frames)
        await self._require_durable()
        async with self.redis.pipeline(transaction=True) as pipe:
            fields = {"meta": voice.model_dump_json(), "codes": voice.codes}
            pipe.hset(self._voice_key(tenant, voice.id), mapping=fields)
            pipe.sadd(self._voices_key(tenant), voice.id)
            await pipe.execute()
        return voice

    async def get_voice(self, tenant: str, voice_id: str) -> Voice:
        if _VOICE_ID.fullmatch(voice_id):
            meta, codes = await self.redis.hmget(self._voice_key(tenant, voice_id), ["meta", "codes"])
            if meta is not None:
                return Voice.model_validate({**json.loads(meta), "codes": codes})
        raise NotFound("voice", voice_id)

    async def list_voices(self, tenant: str) -> list[Voice]:
        ids = [v.decode() for v in await self.redis.smembers(self._voices_key(tenant))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for voice_id in ids:
                pipe.hmget(self._voice_key(tenant, voice_id), ["meta", "codes"])
            rows = await pipe.execute()
        voices = [Voice.model_validate({**json.loads(m), "codes": c}) for m, c in rows if m is not None]
        return sorted(voices, key=lambda v: (v.created_at, v.id))

    async def delete_voice(self, tenant: str, voice_id: str) -> None:
        """Sessions that still name the voice stay; their next turn fails on `get_voice` with NotFound("voice")."""
        if _VOICE_ID.fullmatch(voice_id):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._voice_key(tenant, voice_id))
                pipe.srem(self._voices_key(tenant), voice_id)
                deleted, _ = await pipe.execute()
            if deleted:
                return
        raise NotFound("voice", voice_id)

    # sessions
    async def create_session(
        self, tenant: str, voice_id: str, system_prompt: str = "",
        output_format: ReplyFormat = ReplyFormat.PCM16_24K, sampling: SessionSampling | None = None,
        truncation: Truncation = "auto",
    ) -> Session:
        await self.get_voice(tenant, voice_id)  # NotFound for a missing voice or another tenant's
        now = _now()
        session = Session(
            id=f"sess_{uuid.uuid4().hex}", tenant=tenant, voice_id=voice_id, system_prompt=system_prompt,
            output_format=output_format, sampling=sampling or SessionSampling(), truncation=truncation,
            created_at=now, updated_at=now,
        )
        key, _ = self._session_keys(tenant, session.id)
        await self.redis.set(key, session.model_dump_json(), ex=self.settings.session_ttl_s)
        return session

    async def get_session(self, tenant: str, session_id: str) -> Session:
        """Reading a session counts as using it: the TTL starts again."""
        if _SESSION_ID.fullmatch(session_id):
            key, audio_key = self._session_keys(tenant, session_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.getex(key, ex=self.settings.session_ttl_s)
                pipe.expire(audio_key, self.settings.session_ttl_s)
                raw, _ = await pipe.execute()
            if raw is not None:
                return Session.model_validate_json(raw)
        raise NotFound("session", session_id)

    async def delete_session(self, tenant: str, session_id: str) -> None:
        if _SESSION_ID.fullmatch(session_id):
            key, audio_key = self._session_keys(tenant, session_id)
            deleted = await self.redis.delete(key, audio_key)
            if deleted:
                return
        raise NotFound("session", session_id)

    async def append_turn(
        self, tenant: str, session_id: str, user_audio_16k: bytes | None, assistant_text: str, expected_version: int,
        *, user_text: str | None = None, ids: tuple[str | None, str] | None = None,
        positions: tuple[int | None, int | None] = (None, None), drop: HistoryDrop | None = None,
    ) -> Session:
        """Commit one finished turn (the caller's 16 kHz PCM16 audio, or a typed user message, and the reply text)
        all at once, or nothing. With neither audio nor text the reply answered the conversation as it stood (a
        realtime response.create with no new input): only the reply is committed.

        A failed or cancelled turn simply never calls this. `expected_version` is the version the turn was built
        on; if another turn committed since, this raises VersionConflict instead of interleaving histories.
        `ids`: the user and reply messages' item ids (default: new ones); `positions`: what each takes of the
        Reasoner's context; `drop`: what the turn's history policy took out of the history (by id: what the client
        deleted meanwhile is simply gone already).
        """
        if user_audio_16k is not None and (not user_audio_16k or len(user_audio_16k) % 2):
            raise ValueError(f"user audio must be non-empty 16-bit PCM, got {len(user_audio_16k)} bytes")
        user_id, reply_id = ids or (_message_id(), _message_id())
        stored_audio = None if user_audio_16k is None else _flac(user_audio_16k)
        spoke = user_audio_16k is not None or bool(user_text)

        def add_turn(session: Session, pipe) -> None:
            _, audio_key = self._session_keys(tenant, session_id)
            if drop:
                self._drop(session, drop, pipe)
            if stored_audio is not None:
                pipe.hset(audio_key, user_id, stored_audio)
                pipe.expire(audio_key, self.settings.session_ttl_s)
            if spoke:
                session.history.append(HistoryMessage(
                    id=user_id, role="user", text=user_text, audio_bytes=len(user_audio_16k or b""),
                    audio_id=None if user_audio_16k is None else audio_digest(user_audio_16k), positions=positions[0]))
            session.history.append(HistoryMessage(id=reply_id, role="assistant", text=assistant_text,
                                                  positions=positions[1]))
            session.version += 1

        return await self._update_session(tenant, session_id, expected_version, add_turn)

    def _drop(self, session: Session, drop: HistoryDrop, pipe) -> None:
        """Take `drop` out of the history (and its audio out of Redis), and record it."""
        removed = [m.id for m in session.history if m.id in drop.messages]
        audio_gone = []
        for message in session.history:
            if message.audio_bytes and (message.id in removed or message.id in drop.audio):
                audio_gone.append(message.id)
                message.audio_bytes, message.audio_id, message.positions = 0, None, None
        session.history = [m for m in session.history if m.id not in removed]
        session.dropped.record(removed, audio=len(audio_gone))
        if audio_gone:
            pipe.hdel(self._session_keys(session.tenant, session.id)[1], *audio_gone)

    async def delete_item(self, tenant: str, session_id: str, item_id: str) -> Session:
        """Remove one message from the history (a client's `conversation.item.delete`); NotFound if it is not there.
        No version: the turns committed stay committed, and a turn in flight commits on top."""

        def delete(session: Session, pipe) -> None:
            message = next((m for m in session.history if m.id == item_id), None)
            if message is None:
                raise NotFound("item", item_id)
            session.history = [m for m in session.history if m is not message]
            session.dropped.record([item_id], deleted=True)
            if message.audio_bytes:
                pipe.hdel(self._session_keys(tenant, session_id)[1], item_id)

        return await self._update_session(tenant, session_id, None, delete)

    async def append_message(self, tenant: str, session_id: str, message: HistoryMessage) -> Session:
        """Add a text message at the end of the history (a live call's client-created system or assistant item). No
        version, like a delete: a turn in flight commits on top, after it."""
        if message.audio_bytes or not message.text:
            raise ValueError("append_message takes a text message; turns commit with append_turn")

        def append(session: Session, pipe) -> None:
            session.history.append(message)

        return await self._update_session(tenant, session_id, None, append)

    async def set_transcript(self, tenant: str, session_id: str, item_id: str, transcript: str) -> Session:
        """Record what the caller said in a spoken user message (its input transcription, which finishes beside the
        reply, before or after the turn commits); NotFound if the message is not there. No version, like a delete."""

        def transcribe(session: Session, pipe) -> None:
            message = next((m for m in session.history if m.id == item_id and m.role == "user"), None)
            if message is None:
                raise NotFound("item", item_id)
            message.transcript = transcript

        return await self._update_session(tenant, session_id, None, transcribe)

    async def revise_reply(
        self, tenant: str, session_id: str, version: int, item_id: str, assistant_text: str,
        positions: int | None = None,
    ) -> Session:
        """Replace the text of reply `item_id`, which `version` committed (the caller heard less of it than was sent,
        e.g. a live call's truncated reply). VersionConflict once a later turn has committed; NotFound once the
        reply left the history."""

        def revise(session: Session, pipe) -> None:
            message = next((m for m in session.history if m.id == item_id and m.role == "assistant"), None)
            if message is None:
                raise NotFound("item", item_id)
            message.text, message.positions = assistant_text, positions

        return await self._update_session(tenant, session_id, version, revise)

    async def update_settings(
        self, tenant: str, session: Session, *, system_prompt: str | None = None, voice_id: str | None = None,
        truncation: Truncation | None = None,
    ) -> Session:
        """Change a session's system prompt, voice or truncation (a live call's session.update, or PATCH); the
        history stays."""
        if voice_id is not None:
            await self.get_voice(tenant, voice_id)  # NotFound for a missing voice or another tenant's

        def change(current: Session, pipe) -> None:
            current.system_prompt = current.system_prompt if system_prompt is None else system_prompt
            current.voice_id = voice_id or current.voice_id
            current.truncation = current.truncation if truncation is None else truncation

        return await self._update_session(tenant, session.id, session.version, change)

    async def record_key_press(self, tenant: str, session_id: str, digit: str) -> Session:
        """A DTMF digit from a live call; it changes no turn, so it never conflicts with one."""

        def press(session: Session, pipe) -> None:
            session.key_presses = [*session.key_presses, KeyPress(digit=digit, at=_now())][-MAX_KEY_PRESSES:]

        return await self._update_session(tenant, session_id, None, press)

    async def _update_session(self, tenant: str, session_id: str, expected_version: int | None, change) -> Session:
        """Read the session, apply `change(session, pipe)` (which may queue more commands on `pipe`) and write it
        back in one transaction, if it is still at `expected_version` (None: whatever its version).

        WATCH makes EXEC fail when anything touched the key between our read and our commit, a read refreshing its
        TTL included: then read again, and the version decides whether that was a conflicting write."""
        if not _SESSION_ID.fullmatch(session_id):
            raise NotFound("session", session_id)
        key, _ = self._session_keys(tenant, session_id)
        await self._require_durable()
        for attempt in range(WRITE_ATTEMPTS):
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None:
                    raise NotFound("session", session_id)
                session = Session.model_validate_json(raw)
                if expected_version is not None and session.version != expected_version:
                    raise VersionConflict(session_id, expected_version, session.version)
                pipe.multi()
                change(session, pipe)
                session.updated_at = _now()
                pipe.set(key, session.model_dump_json(), ex=self.settings.session_ttl_s)
                try:
                    await pipe.execute()
                    return session
                except WatchError:
                    if attempt == WRITE_ATTEMPTS - 1:
                        raise VersionConflict(session_id, expected_version) from None

    async def load_history_audio(self, session: Session) -> list[bytes | None]:
        """The caller audio (16 kHz PCM16) of each message in `session.history` (None for messages without)."""
        spoken = [m.id for m in session.history if m.role == "user" and m.audio_bytes]
        audio = await self.load_audio(session.tenant, session.id, spoken)
        return [audio.get(m.id) for m in session.history]

    async def load_audio(self, tenant: str, session_id: str, item_ids: list[str]) -> dict[str, bytes]:
        """The caller audio (16 kHz PCM16) of these user messages; NotFound if one is gone (the session expired or
        was deleted, or the client deleted the message)."""
        if not item_ids:
            return {}
        _, audio_key = self._session_keys(tenant, session_id)
        values = await self.redis.hmget(audio_key, item_ids)
        if any(v is None for v in values):
            raise NotFound("session", session_id)
        return {item_id: _pcm16(value) for item_id, value in zip(item_ids, values)}


def _message_id() -> str:
    return f"item_{uuid.uuid4().hex[:24]}"
