"""A reply's life (cluster.calls.reply): every move the table allows is taken, every other one is refused."""

from __future__ import annotations

import itertools

import pytest

from cluster.calls.cursor import PlaybackCursor
from cluster.calls.reply import TRANSITIONS, IllegalTransition, Reply, ReplyState, UserInput

S = ReplyState
LEGAL = {
    (S.SPECULATIVE, S.SPEAKING), (S.SPECULATIVE, S.DROPPED),
    (S.SPEAKING, S.PLAYING), (S.SPEAKING, S.INTERRUPTED), (S.SPEAKING, S.FAILED),
    (S.PLAYING, S.INTERRUPTED), (S.PLAYING, S.COMMITTED),
    (S.INTERRUPTED, S.COMMITTED),
}


def reply_in(state: ReplyState) -> Reply:
    return Reply(id="resp_1", item_id="item_2", user=UserInput("item_1"), cursor=PlaybackCursor(), committed_at=None,
                 vad_window_s=0.0, state=state)


def test_the_table_is_the_life_of_a_reply():
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL
    assert set(TRANSITIONS) == set(ReplyState)


@pytest.mark.parametrize(("start", "to"), list(itertools.product(ReplyState, ReplyState)),
                         ids=lambda s: s.value)
def test_every_move(start, to):
    reply = reply_in(start)
    if (start, to) in LEGAL:
        reply.move(to)
        assert reply.state is to
    else:
        with pytest.raises(IllegalTransition, match=f"{start.value} -> {to.value}"):
            reply.move(to)
        assert reply.state is start


def test_what_each_state_lets_out():
    assert {s for s in ReplyState if reply_in(s).generating} == {S.SPECULATIVE, S.SPEAKING}
    assert {s for s in ReplyState if reply_in(s).audible} == {S.SPEAKING, S.PLAYING}
