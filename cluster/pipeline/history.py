"""Which part of a session's history the Reasoner reads for a turn, so that no call breaks because it got long.

`HistoryPolicy.plan` counts what the turn's prompt takes of the Reasoner's context (the system prompt, the
history, the new utterance, if any, and the generation prompt, with room for the reply) from what each message
takes, counted once when it was committed (`HistoryMessage.positions`). When it would not fit, the session's truncation
(cluster.state.history) drops the oldest first: the oldest caller audio goes before any text (a spoken message
with words keeps its words), then the oldest messages. The system prompt and the new utterance always stay. What
it drops is committed with the turn (`HistoryDrop`), so every later turn's prompt starts with the same messages
and the Reasoner's prefix cache serves them.

The only length a caller is refused for is their own: an utterance that does not fit the context by itself
(`UtteranceTooLong`), or, where they disabled truncation, a history they have to shorten (`ContextFull`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cluster.settings.turns import HistorySettings
from cluster.state.history import HistoryDrop, RetentionRatio
from cluster.state.store import HistoryMessage, Session, audio_digest
from model.errors import Conflict, InvalidInput
from model.processing.audio import REASONER_RATE, pcm16_bytes, pcm16_wave
from model.processing.processor import ChromaProcessor, Message


class UtteranceTooLong(InvalidInput):
    code = "utterance_too_long"


class ContextFull(Conflict):
    code = "context_full"


@dataclass
class UserTurn:
    """The caller's new message: audio as 16 kHz PCM16 (quantised once, so this turn hears exactly what every later
    turn reads back from the history) and/or typed text, under the item id the history will keep it as."""

    id: str
    audio: bytes | None = None
    text: str | None = None

    @classmethod
    def of(cls, item_id: str, audio: np.ndarray | None = None, text: str | None = None) -> UserTurn:
        """`audio`: float32 at REASONER_RATE."""
        return cls(item_id, None if audio is None else pcm16_bytes(audio), text or None)

    @property
    def audio_id(self) -> str | None:
        return None if self.audio is None else audio_digest(self.audio)

    def message(self, held: bool = False) -> Message:
        """`held`: the audio goes by id only (the Reasoner already has it)."""
        if self.audio is None:
            return Message("user", text=self.text)
        if held:
            return Message("user", text=self.text, audio_samples=len(self.audio) // 2, audio_id=self.audio_id)
        return Message("user", text=self.text, audio=pcm16_wave(self.audio), sample_rate=REASONER_RATE,
                       audio_id=self.audio_id)


@dataclass
class TurnPlan:
    """A turn's prompt: the history the Reasoner reads (the drop applied), what the commit takes out of the
    session's history, and what the prompt and the new message take of the context."""

    user: UserTurn | None  # None: the reply answers the history as it stands (a greeting)
    history: list[HistoryMessage]
    drop: HistoryDrop = field(default_factory=HistoryDrop)
    positions: int = 0
    user_positions: int = 0
    new_positions: int | None = None  # what the prompt adds to the last turn's (None: none before, or truncated now)
    next_history: list[HistoryMessage] | None = None  # the history after `drop` where it drops ahead (see plan)


class HistoryPolicy:
    """See the module docstring. `context`: the Reasoner's positions; `reply_tokens`: the room a reply needs;
    `max_audios`: the most caller utterances one prompt may hold (None: no bound)."""

    def __init__(self, processor: ChromaProcessor, context: int, reply_tokens: int, max_audios: int | None,
                 settings: HistorySettings):
        self.processor, self.context, self.reply_tokens = processor, context, reply_tokens
        self.max_audios, self.settings = max_audios, settings

    def positions(self, message: HistoryMessage) -> int:
        """What a history message takes of a prompt (its count from the commit, or counted now)."""
        if message.positions is not None:
            return message.positions
        if message.audio_bytes:
            return self.processor.message_positions(Message(
                "user", text=message.text, audio_samples=message.audio_samples, audio_id=message.audio_id or message.id))
        return self.text_positions(message.role, message.text)

    def text_positions(self, role: str, text: str | None) -> int:
        """A text message's positions: a reply's even with no words (see turn.history_message), a caller's none."""
        if not text and role != "assistant":
            return 0
        return self.processor.message_positions(Message(role, text=text or ""))

    def user_positions(self, user: UserTurn | None) -> int:
        if user is None:
            return 0
        if user.audio is None:
            return self.text_positions("user", user.text)
        return self.processor.message_positions(Message(
            "user", text=user.text, audio_samples=len(user.audio) // 2, audio_id="new"))

    def plan(self, session: Session, user: UserTurn | None) -> TurnPlan:
        """The turn's prompt under the session's truncation (`user` None: a reply to the history as it stands);
        UtteranceTooLong, or ContextFull where it is disabled."""
        system = len(self.processor.system_ids(session.system_prompt))
        mine = self.user_positions(user) + len(self.processor.generation_ids)
        room = self.context - self.reply_tokens - system  # for everything after the system prompt
        if mine > room:
            raise UtteranceTooLong(
                f"the caller's utterance takes {mine} positions; with the system prompt ({system}) and room for the "
                f"reply ({self.reply_tokens}) that is more than the Reasoner's context of {self.context}: send a "
                "shorter one"
            )
        limit = room
        if isinstance(session.truncation, RetentionRatio) and session.truncation.token_limits is not None:
            limit = min(room, session.truncation.token_limits.post_instructions or room)
        history = [m.model_copy() for m in session.history]
        costs = [self.positions(m) for m in history]
        audios = sum(1 for m in history if m.audio_bytes) + (user is not None and user.audio is not None)
        used = mine + sum(costs)  # what the prompt takes after the system prompt
        plan = TurnPlan(user, history, positions=system + used, user_positions=mine - len(self.processor.generation_ids))
        fits = used <= limit and not self._too_many(audios)
        if not fits and session.truncation == "disabled":
            raise ContextFull(self._full(session, plan.positions, audios, self._too_many(audios)))
        if session.truncation == "disabled":
            return plan
        ratio = session.truncation.retention_ratio if isinstance(session.truncation, RetentionRatio) \
            else self.settings.auto_retention_ratio
        if not fits:  # to the ratio where it is too long, to the limit where it holds too many utterances
            target = int(ratio * limit) if used > limit else limit
            plan.history, costs, audios = self._drop_oldest(plan.history, costs, mine, audios, target, 0, plan.drop)
            used = mine + sum(costs)
        elif history:  # the last prompt's generation prompt is the start of its reply
            plan.new_positions = plan.user_positions + sum(
                cost for new, cost in zip(_after_last_caller(history), reversed(costs)) if new)
        plan.positions = system + used
        # Ahead: where the next turn (an utterance like this one, after a reply of up to reply_tokens) would not
        # fit, the commit drops now what that turn would, and the Reasoner prefills the shorter prompt while the
        # reply plays: the next turn finds it in the prefix cache rather than prefilling its truncated history.
        if used + self.reply_tokens + mine > limit or self._too_many(audios + 1):
            target = min(int(ratio * limit), limit - self.reply_tokens - mine)
            plan.next_history, _, _ = self._drop_oldest(plan.history, costs, mine, audios, target, 1, plan.drop)
        return plan

    def _too_many(self, audios: int) -> bool:
        return self.max_audios is not None and audios > self.max_audios

    def _drop_oldest(self, history: list[HistoryMessage], costs: list[int], mine: int, audios: int, target: int,
                     spare_audios: int, drop: HistoryDrop) -> tuple[list[HistoryMessage], list[int], int]:
        """`history` (copies, with `costs`) without its oldest until it takes at most `target` with the new message
        (`mine`) and holds `spare_audios` fewer caller utterances than the bound; what goes is added to `drop`."""
        history, costs = [m.model_copy() for m in history], list(costs)
        total = mine + sum(costs)

        def over() -> bool:
            return total > target or self._too_many(audios + spare_audios)

        # The oldest caller audio goes first: a spoken message with words keeps them.
        for n, message in enumerate(history):
            if not over():
                break
            if message.audio_bytes:
                audios -= 1
                message.audio_bytes, message.audio_id = 0, None
                kept = self.text_positions("user", message.text)
                total -= costs[n] - kept
                costs[n] = message.positions = kept
                (drop.audio if message.text else drop.messages).append(message.id)
        # Then the oldest messages.
        dropped = {m.id for m in history if m.id in drop.messages}
        for n, message in enumerate(history):
            if not over():
                break
            if message.id not in dropped:
                total -= costs[n]
                drop.messages.append(message.id)
                dropped.add(message.id)
        drop.audio = [i for i in drop.audio if i not in dropped]
        kept = [n for n, m in enumerate(history) if m.id not in dropped]
        return [history[n] for n in kept], [costs[n] for n in kept], audios

    def _full(self, session: Session, positions: int, audios: int, too_many: bool) -> str:
        fix = (f"delete earlier items (conversation.item.delete, or DELETE /v1/sessions/{session.id}/history/"
               "{item_id}) or set the session's truncation to \"auto\"")
        if too_many:
            return (f"the conversation holds {audios} caller utterances, more than the Reasoner takes in one prompt "
                    f"({self.max_audios}), and this session's truncation is \"disabled\": {fix}")
        return (f"the conversation takes {positions} positions and the reply needs {self.reply_tokens}, more than "
                f"the Reasoner's context of {self.context}, and this session's truncation is \"disabled\": {fix}")


def _after_last_caller(history: list[HistoryMessage]) -> list[bool]:
    """From the newest back: True for each message after the last caller message (the last turn's reply, and any
    system or assistant message a client added since: what the last prompt did not hold)."""
    flags, after = [], True
    for message in reversed(history):
        after = after and message.role != "user"
        flags.append(after)
    return flags
