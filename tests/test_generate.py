"""Step-wise invariants of the generation algorithm on the tiny (RANDOM-WEIGHT) checkpoint."""

import numpy as np
import pytest
import torch

from model.processing.audio import AudioError, decode_audio, encode_wav
from model.chroma.turn import TurnProgress
from model.reasoner.hf import ReasonerSession
from model.processing.processor import Conversation, Message
from model.chroma.sampling import SamplingParams
from tests.conftest import speech_like


@pytest.fixture(scope="module")
def conversation():
    return Conversation(
        system_prompt="You are a helpful voice assistant.",
        messages=[Message(role="user", audio=speech_like(16000, 1.0, seed=1), sample_rate=16000)],
    )


def test_thinker_steps_once_per_two_frames_until_im_end(chroma, voice, conversation, monkeypatch):
    frames_at_step = []
    original = ReasonerSession.step
    frames_so_far = []

    def counting_step(self, token):
        frames_at_step.append(len(frames_so_far))
        return original(self, token)

    original_add = TurnProgress.add_frame

    def counting_add(self, frame):
        frames_so_far.append(frame)
        return original_add(self, frame)

    monkeypatch.setattr(ReasonerSession, "step", counting_step)
    monkeypatch.setattr(TurnProgress, "add_frame", counting_add)
    result = chroma.reply(conversation, voice, max_frames=60)

    # Prefill gives the first token; then one thinker step after every second frame.
    assert frames_at_step == [2 * (i + 1) for i in range(len(frames_at_step))]
    assert len(result.text_tokens) == len(frames_at_step) + 1
    im_end = chroma.config.im_end_token_id
    if im_end in result.text_tokens:
        assert result.text_tokens.index(im_end) == len(result.text_tokens) - 1
        assert len(frames_so_far) >= 2 * (len(result.text_tokens) - 1)
    else:
        assert len(frames_so_far) == 60


def test_audio_length_is_frames_times_frame_size(chroma, voice, conversation):
    result = chroma.reply(conversation, voice, max_frames=12)
    assert result.frames.shape == (12, 8)
    assert result.audio.shape == (12 * 1920,)
    assert result.sample_rate == 24000
    assert result.real_time_factor > 0
    assert (result.frames < chroma.config.codec_codebook_size).all()


def test_greedy_is_deterministic(chroma, voice, conversation):
    a = chroma.reply(conversation, voice, max_frames=10)
    b = chroma.reply(conversation, voice, max_frames=10)
    assert torch.equal(a.frames, b.frames) and a.text_tokens == b.text_tokens
    assert torch.equal(a.audio, b.audio)


def test_seeded_sampling_is_reproducible(chroma, voice, conversation):
    def run(seed):
        return chroma.reply(conversation, voice, max_frames=10, sampling=SamplingParams(temperature=0.9, top_k=40, seed=seed)).frames

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(7), chroma.reply(conversation, voice, max_frames=10).frames)


def test_stop_rule_and_kept_frames(chroma):
    progress = TurnProgress(chroma.config, max_frames=100)
    assert progress.wants_reasoner_pair()
    assert progress.add_frame([5, 1, 2, 3, 4, 5, 6, 7]) and not progress.finished
    assert not progress.wants_reasoner_pair()
    progress.add_text(chroma.config.im_end_token_id)
    assert progress.add_frame([7, 1, 2, 3, 4, 5, 6, 7]) and not progress.finished
    assert not progress.wants_reasoner_pair()  # the thinker is done after im_end
    # Codebooks 0..6 all EOS stops the turn; codebook 7 is not looked at, and the frame is still output.
    assert progress.add_frame([0, 0, 0, 0, 0, 0, 0, 9]) and progress.finished
    assert len(progress.frames) == 3

    silent = TurnProgress(chroma.config, max_frames=100)
    assert not silent.add_frame([0] * 8) and silent.finished  # an all-EOS frame stops and is not output
    assert silent.frames == []

    limited = TurnProgress(chroma.config, max_frames=2)
    limited.add_frame([1] * 8)
    limited.add_frame([2] * 8)
    assert limited.finished


def test_thinker_sessions_share_one_module(chroma):
    # Explicit positions: interleaving two conversations on one thinker gives each its solo result.
    ids_a = torch.tensor([[4044, 10, 20, 30, 4045, 4044, 40]])
    ids_b = torch.tensor([[4044, 50, 60, 4045, 4044, 70, 80, 90]])
    from model.processing.processor import ReasonerInputs

    def solo(ids):
        session = ReasonerSession(chroma.thinker)
        token, hidden = session.prefill(ReasonerInputs(ids, torch.ones_like(ids)))
        tokens, states = [token], [hidden]
        for _ in range(4):
            token, hidden = session.step(token)
            tokens.append(token)
            states.append(hidden)
        return tokens, torch.stack(states)

    a_solo, b_solo = solo(ids_a), solo(ids_b)
    sa, sb = ReasonerSession(chroma.thinker), ReasonerSession(chroma.thinker)
    ta, _ = sa.prefill(ReasonerInputs(ids_a, torch.ones_like(ids_a)))
    tb, _ = sb.prefill(ReasonerInputs(ids_b, torch.ones_like(ids_b)))
    ta_all, tb_all = [ta], [tb]
    for _ in range(4):
        ta, _ = sa.step(ta)
        tb, _ = sb.step(tb)
        ta_all.append(ta)
        tb_all.append(tb)
    assert ta_all == a_solo[0] and tb_all == b_solo[0]


def test_hidden_state_is_the_final_normed_last_layer(chroma):
    from model.processing.processor import ReasonerInputs

    ids = torch.tensor([[4044, 11, 22, 33, 4045, 4044]])
    _, hidden = ReasonerSession(chroma.thinker).prefill(ReasonerInputs(ids, torch.ones_like(ids)))
    with torch.no_grad():
        last = chroma.thinker.model(input_ids=ids).last_hidden_state[0, -1]
    torch.testing.assert_close(hidden, last)


def test_bad_inputs_give_clear_errors(chroma):
    with pytest.raises(AudioError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioError, match="format"):
        decode_audio(b"this is not audio at all" * 10)
    stereo = np.stack([speech_like(16000, 0.5)] * 2, axis=1)
    import io
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioError, match="2 channels"):
        decode_audio(buffer.getvalue())
    with pytest.raises(AudioError):
        decode_audio(encode_wav(speech_like(16000, 0.5), 16000)[:60])
    with pytest.raises(ValueError, match="transcript is empty"):
        chroma.voice("   ", speech_like(24000, 1.0), 24000)
    with pytest.raises(ValueError):
        chroma.voice("hello", np.zeros(0, dtype=np.float32), 24000)


@pytest.mark.parametrize("max_frames", [1, 2, 3, 8, 13])
def test_thinker_tokens_for_bounds_what_the_speech_loop_takes(chroma, voice, max_frames):
    from model.chroma.turn import reasoner_tokens_for
    from model.offline import speak_turn

    asked = []
    hidden_size = chroma.speech.text_embedding.weight.shape[1]

    def next_pair(previous):
        asked.append(previous)
        return 100 + len(asked), torch.randn(hidden_size)  # never im_end: the frame limit ends the turn

    progress = speak_turn(chroma.speech, voice, next_pair, max_frames)
    assert len(progress.frames) // 8 == max_frames or progress.finished
    assert len(asked) <= reasoner_tokens_for(max_frames)
    assert len(asked) >= reasoner_tokens_for(max_frames) - 1  # and it is tight
