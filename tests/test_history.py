"""The history policy: what a turn's prompt holds of a long session under each truncation, counted exactly as the
processor lays the prompt out. Tiny checkpoint's processor; no engines."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from cluster.api.errors import http_status
from cluster.pipeline.history import ContextFull, HistoryPolicy, UserTurn, UtteranceTooLong
from cluster.pipeline.turn import ReasonerPrompt, build_conversation, history_message, next_conversation
from cluster.settings.turns import HistorySettings
from cluster.state.history import RetentionRatio, TokenLimits
from cluster.state.store import HistoryMessage, Session, audio_digest
from model.processing.audio import pcm16_bytes
from model.processing.processor import ChromaProcessor, Conversation
from tests.conftest import speech_like

REPLY_TOKENS = 64


@pytest.fixture(scope="module")
def processor(tiny_checkpoint) -> ChromaProcessor:
    return ChromaProcessor.from_pretrained(tiny_checkpoint)


def policy(processor, context=1000, max_audios=None, **settings) -> HistoryPolicy:
    return HistoryPolicy(processor, context, REPLY_TOKENS, max_audios, HistorySettings(**settings))


def utterance(seconds: float, seed: int) -> bytes:
    return pcm16_bytes(speech_like(16000, seconds, seed=seed))


def session_of(turns: int, truncation="auto", spoken_text: set[int] = frozenset()) -> tuple[Session, list[bytes | None]]:
    """`turns` turns of 1 s caller audio and a short reply; turn n's user message has words too if n in spoken_text."""
    history, audio = [], []
    for n in range(turns):
        pcm = utterance(1.0, n)
        history += [HistoryMessage(id=f"u{n}", role="user", text=f"number {n}" if n in spoken_text else None,
                                   audio_bytes=len(pcm), audio_id=audio_digest(pcm)),
                    HistoryMessage(id=f"a{n}", role="assistant", text=f"Reply number {n}, of course.")]
        audio += [pcm, None]
    now = datetime.now(UTC)
    session = Session(id="sess_" + "0" * 32, tenant="t", voice_id="v", system_prompt="Be brief.", history=history,
                      truncation=truncation, created_at=now, updated_at=now)
    return session, audio


def prompt_length(processor, session, audio, plan) -> int:
    """The prompt the Reasoner would lay out for the planned turn."""
    kept = {m.id for m in plan.history}
    stripped = {m.id for m in plan.history if not m.audio_bytes}
    messages = [m.model_copy(update={"audio_bytes": 0} if m.id in stripped else {}) for m in session.history
                if m.id in kept]
    pcm = {m.id: a for m, a in zip(session.history, audio)}
    reduced = session.model_copy(update={"history": messages})
    conversation = build_conversation(reduced, [pcm[m.id] if m.audio_bytes else None for m in messages],
                                      plan.user.message())
    return processor.layout(conversation).length


def test_a_history_that_fits_is_read_whole_and_counted_exactly(processor):
    session, audio = session_of(3)
    plan = policy(processor).plan(session, UserTurn("new", utterance(2.0, 9)))
    assert not plan.drop and [m.id for m in plan.history] == [m.id for m in session.history]
    assert plan.positions == prompt_length(processor, session, audio, plan)


@pytest.mark.parametrize("truncation", ["auto", RetentionRatio(retention_ratio=0.5)])
def test_the_oldest_go_first_audio_before_text_and_the_prompt_fits_with_room_for_the_reply(processor, truncation):
    session, audio = session_of(20, truncation, spoken_text={1})
    context = 1000
    plan = policy(processor, context).plan(session, UserTurn("new", utterance(2.0, 9)))
    assert plan.positions == prompt_length(processor, session, audio, plan)
    system = len(processor.system_ids("Be brief."))
    ratio = 0.8 if truncation == "auto" else 0.5
    assert plan.positions - system <= ratio * (context - REPLY_TOKENS - system)
    kept = [m.id for m in plan.history]
    # Dropped: a prefix of the history. Caller audio went before any reply text: every kept user message of the
    # dropped span's end keeps no audio older than the oldest kept reply.
    assert plan.drop.messages and set(plan.drop.messages) | set(kept) == {m.id for m in session.history}
    oldest_reply = min(int(i[1:]) for i in kept if i.startswith("a"))
    spoken = [int(m.id[1:]) for m in plan.history if m.role == "user" and m.audio_bytes]
    assert all(n >= oldest_reply for n in spoken)
    assert plan.history[-1].id == "a19"  # the newest turn stays
    # The message with words lost its audio and kept its words (when it is kept at all).
    if "u1" in kept:
        u1 = next(m for m in plan.history if m.id == "u1")
        assert u1.text == "number 1" and u1.audio_bytes == 0 and plan.drop.audio == ["u1"]


def test_a_token_limit_and_the_audio_count_bound_the_prompt_too(processor):
    session, _ = session_of(6, RetentionRatio(retention_ratio=1.0, token_limits=TokenLimits(post_instructions=150)))
    plan = policy(processor).plan(session, UserTurn("new", utterance(1.0, 9)))
    assert plan.positions - len(processor.system_ids("Be brief.")) <= 150 and plan.drop
    session, _ = session_of(6)
    plan = policy(processor, context=100_000, max_audios=3).plan(session, UserTurn("new", utterance(1.0, 9)))
    assert sum(1 for m in plan.history if m.audio_bytes) == 2  # and the new one: three
    assert [i for i in plan.drop.messages if i.startswith("a")] == []  # only audio had to go


def test_disabled_names_the_limit_and_a_long_utterance_is_the_callers(processor):
    session, _ = session_of(20, "disabled")
    with pytest.raises(ContextFull, match="context of 1000.*\"disabled\".*delete earlier items") as full:
        policy(processor).plan(session, UserTurn("new", utterance(2.0, 9)))
    assert http_status(full.value) == 409 and full.value.code == "context_full"
    short, _ = session_of(2, "disabled")
    assert not policy(processor).plan(short, UserTurn("new", utterance(2.0, 9))).drop
    with pytest.raises(UtteranceTooLong, match=r"utterance takes \d+ positions.*context of 1000") as long:
        policy(processor).plan(short, UserTurn("new", utterance(45.0, 9)))
    assert http_status(long.value) == 422 and long.value.code == "utterance_too_long"


def test_the_new_utterance_is_quantised_once_and_named_by_its_samples(processor):
    wave = speech_like(16000, 1.0, seed=3)
    turn = UserTurn.of("item_1", wave)
    assert turn.audio == pcm16_bytes(wave) and turn.audio_id == audio_digest(turn.audio)
    assert UserTurn.of("item_2", wave).audio_id == turn.audio_id  # the same samples, the same id
    message = turn.message()
    assert np.abs(message.audio - wave).max() < 1e-4 and message.audio_id == turn.audio_id
    assert UserTurn.of("item_3", text="hello").audio_id is None


def committed(session: Session, plan, reply: str) -> Session:
    """The session after the planned turn commits, as `StateStore.append_turn` leaves it: the plan's drop taken
    out (messages gone, others' caller audio gone), then the turn's messages with their positions."""
    history = []
    for message in session.history:
        if message.id in plan.drop.messages:
            continue
        if message.id in plan.drop.audio:
            message = message.model_copy(update={"audio_bytes": 0, "audio_id": None, "positions": None})
        history.append(message)
    user = plan.user
    history += [HistoryMessage(id=user.id, role="user", text=user.text, audio_bytes=len(user.audio),
                               audio_id=user.audio_id, positions=plan.user_positions),
                HistoryMessage(id=user.id + "r", role="assistant", text=reply)]
    return session.model_copy(update={"history": history, "version": session.version + 1})


def prompt_ids(processor, session: Session, user: UserTurn) -> list[int]:
    """The next turn's prompt, every caller audio held by id, expanded as vLLM sees it."""
    conversation = Conversation(session.system_prompt, [
        *(m for m in (history_message(m, held=True) for m in session.history) if m is not None),
        user.message(held=True)])
    return processor.layout(conversation).expanded_ids(processor.special_ids.audio)


def test_a_turn_that_fits_counts_what_it_adds_to_the_last_prompt(processor):
    session, _ = session_of(3)
    first = policy(processor).plan(session, UserTurn("new", utterance(2.0, 9)))
    after = committed(session, first, "Reply number 3, of course.")
    second = policy(processor).plan(after, UserTurn("next", utterance(2.0, 10)))
    assert second.new_positions == second.positions - first.positions  # the reply and the new message
    assert not second.drop and second.next_history is None
    empty = session.model_copy(update={"history": []})
    assert policy(processor).plan(empty, UserTurn("new", utterance(2.0, 9))).new_positions is None


def test_a_reply_with_no_new_message_reads_the_history_as_it_stands(processor):
    """A realtime response.create with nothing new (a greeting): the prompt is the system prompt, the history and
    the generation prompt, counted exactly, and what it adds to the last prompt is the reply before it."""
    empty, _ = session_of(0)
    greeting = policy(processor).plan(empty, None)
    assert greeting.user is None and greeting.user_positions == 0 and greeting.new_positions is None
    assert greeting.positions == len(processor.system_ids("Be brief.")) + len(processor.generation_ids)
    session, _ = session_of(3)
    first = policy(processor).plan(session, UserTurn("new", utterance(2.0, 9)))
    after = committed(session, first, "Reply number 3, of course.")
    plan = policy(processor).plan(after, None)
    assert plan.user is None and [m.id for m in plan.history] == [m.id for m in after.history] and not plan.drop
    prompt = ReasonerPrompt("t", after.id, after.system_prompt, plan.history, plan.user, REPLY_TOKENS, plan.history)
    conversation = next_conversation(prompt)  # the history alone: no new user message after the last reply
    assert [m.role for m in conversation.messages] == [m.role for m in after.history]
    assert processor.layout(conversation).length == plan.positions
    assert plan.new_positions == plan.positions - first.positions  # the reply before it


@pytest.mark.parametrize("truncation", ["auto", RetentionRatio(retention_ratio=1.0)])
def test_the_commit_drops_ahead_and_the_next_prompt_starts_with_the_warmed_one(processor, truncation):
    """Where the next turn would not fit, the turn still reads its whole history, its commit drops the oldest,
    and the next turn (an utterance like this one) fits without truncating: its prompt extends, token for token,
    the prompt the Reasoner warmed (`next_conversation`), so the prefix cache serves all of that."""
    context, turns = 1000, 1
    while True:  # the longest history this turn still reads whole, with no room for a turn like it after
        session, _ = session_of(turns, truncation)
        plan = policy(processor, context).plan(session, UserTurn("new", utterance(2.0, 9)))
        if plan.next_history is not None:
            break
        turns += 1
    assert [m.id for m in plan.history] == [m.id for m in session.history] and plan.new_positions is not None
    assert plan.drop and {m.id for m in plan.next_history} == {m.id for m in session.history} - set(plan.drop.messages)
    prompt = ReasonerPrompt("t", session.id, session.system_prompt, plan.history, plan.user, REPLY_TOKENS,
                            plan.next_history)
    warmed = processor.layout(next_conversation(prompt)).expanded_ids(processor.special_ids.audio)
    after = committed(session, plan, "Reply number 99, of course.")
    following = policy(processor, context).plan(after, UserTurn("next", utterance(2.0, 10)))
    # Read whole, no truncation at its start (it may drop ahead in turn: at a retention ratio of 1 every turn does).
    assert [m.id for m in following.history] == [m.id for m in after.history] and following.new_positions is not None
    ids = prompt_ids(processor, after, following.user)
    assert len(ids) == following.positions and ids[: len(warmed)] == warmed
    assert following.positions - len(warmed) == following.new_positions  # the rest: the reply and the new message


def test_disabled_never_drops_ahead(processor):
    turns = 1
    while True:
        session, _ = session_of(turns, "disabled")
        try:
            plan = policy(processor).plan(session, UserTurn("new", utterance(2.0, 9)))
        except ContextFull:
            break
        assert not plan.drop and plan.next_history is None
        turns += 1
    assert turns > 3
