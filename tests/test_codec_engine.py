"""CodecEngine: chunked, batched streaming decode equals the one-shot Mimi decode (RANDOM-WEIGHT codecs)."""

import asyncio
import contextlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import MimiModel

from model.chroma.checkpoint import Checkpoint, load_codec
from model.engines.codec import CapacityError, CodecEngine
from model.engines.graphs import bucket_for
from model.chroma.codec import decode_frames
from tests.conftest import cuda_layout_sdpa

FRAME = 1920


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine: intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)
    return load_codec(checkpoint), checkpoint.config


@pytest.fixture(scope="module")
def upstream(upstream_fixture):
    checkpoint = Checkpoint(upstream_fixture)
    return load_codec(checkpoint), checkpoint.config


@pytest.fixture(params=["tiny", "upstream"])
def codec_and_config(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def small_window(tiny):
    """The tiny codec with a 6-position sliding window, so short turns already slide past it."""
    codec, config = tiny
    small = MimiModel(type(codec.config)(**{**codec.config.to_dict(), "sliding_window": 6})).eval()
    small.load_state_dict(codec.state_dict())
    return small, config


def frames(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (n, 8), generator=torch.Generator().manual_seed(seed))


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4 * max(1.0, want.abs().max().item()), diff
    return diff


def stream(engine: CodecEngine, turn_id, codes: torch.Tensor) -> torch.Tensor:
    """Push a whole turn, step until nothing is ready, close with a flush."""
    engine.open_stream(turn_id)
    engine.push(turn_id, codes)
    chunks = []
    while out := engine.step():
        chunks.append(out[turn_id])
    tail = engine.close(turn_id)
    assert all(c.shape == (engine.chunk_frames * FRAME,) for c in chunks)
    return torch.cat(chunks + ([tail] if tail is not None else []))


@pytest.mark.parametrize("chunk, length", [(1, 5), (2, 8), (2, 7), (3, 7)])
def test_single_stream_equals_one_shot(codec_and_config, chunk, length):
    codec, config = codec_and_config
    codes = frames(length, seed=length)
    engine = CodecEngine(codec, config, max_streams=2, chunk_frames=chunk)
    assert_matches(stream(engine, "turn", codes), decode_frames(codec, codes))


def joining_streams(engine: CodecEngine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
    """Three turns joining at different ticks, one frame per tick each -> (audio, frames, batch size per step)."""
    turns = {"a": (0, frames(9, 1)), "b": (2, frames(5, 2)), "c": (4, frames(12, 3))}  # id: (start tick, frames)
    audio: dict[str, list[torch.Tensor]] = {turn_id: [] for turn_id in turns}
    batch_sizes = []
    for tick in range(20):
        for turn_id, (start, codes) in turns.items():
            i = tick - start
            if i == 0:
                engine.open_stream(turn_id)
            if 0 <= i < len(codes):  # one frame per tick, as the speech model produces them
                engine.push(turn_id, codes[i : i + 1])
            elif i == len(codes):
                tail = engine.close(turn_id)
                audio[turn_id] += [tail] if tail is not None else []
        out = engine.step()
        batch_sizes.append(len(out))
        for turn_id, pcm in out.items():
            audio[turn_id].append(pcm)
    return {t: torch.cat(a) for t, a in audio.items()}, {t: codes for t, (_, codes) in turns.items()}, batch_sizes


@pytest.mark.parametrize("mode", ["eager", "padded"])
def test_streams_joining_at_different_times_are_batched(codec_and_config, mode):
    codec, config = codec_and_config
    engine = CodecEngine(codec, config, max_streams=3, chunk_frames=2, decode_mode=mode)
    audio, codes, batch_sizes = joining_streams(engine)
    assert max(batch_sizes) == 3  # all three were decoded in one forward at least once
    for turn_id in codes:
        assert_matches(audio[turn_id], decode_frames(codec, codes[turn_id]))


@pytest.mark.parametrize("mode", ["eager", "padded"])
def test_chunk_decode_takes_sdpa_outputs_in_the_cuda_layout(tiny, mode):
    """The decoder transformer's attention with SDPA returning non-contiguous outputs, as on CUDA, at batch > 1."""
    codec, config = tiny
    expected, codes, _ = joining_streams(CodecEngine(codec, config, max_streams=3, chunk_frames=2, decode_mode="eager"))
    with cuda_layout_sdpa():
        audio, _, _ = joining_streams(CodecEngine(codec, config, max_streams=3, chunk_frames=2, decode_mode=mode))
    for turn_id in codes:
        assert torch.equal(audio[turn_id], expected[turn_id]), turn_id


def test_compiled_chunk_decode_has_no_graph_break_and_equals_eager(tiny):
    """The chunk decode a CUDA graph captures, per batch bucket (1, 2, 3 here), compiles with fullgraph=True and
    decodes exactly what the eager engine decodes."""
    codec, config = tiny
    eager, _, _ = joining_streams(CodecEngine(codec, config, max_streams=3, chunk_frames=2, decode_mode="eager"))
    compiled_engine = CodecEngine(codec, config, max_streams=3, chunk_frames=2, decode_mode="compiled", compile_backend="eager")
    compiled, _, batch_sizes = joining_streams(compiled_engine)
    assert {bucket_for(n, compiled_engine.batch_buckets) for n in batch_sizes if n} == {1, 2, 3}
    for turn_id, pcm in eager.items():
        assert torch.equal(compiled[turn_id], pcm), turn_id


def test_turn_longer_than_the_sliding_window(small_window):
    codec, config = small_window
    codes = frames(20, seed=4)  # 40 transformer positions against a window of 6
    engine = CodecEngine(codec, config, max_streams=1, chunk_frames=2)
    assert_matches(stream(engine, "turn", codes), decode_frames(codec, codes))


def test_close_and_cancel_free_slots_for_reuse(tiny):
    codec, config = tiny
    engine = CodecEngine(codec, config, max_streams=2, chunk_frames=2)
    engine.open_stream("a")
    engine.open_stream("b")
    engine.push("a", frames(5, 5))
    engine.push("b", frames(3, 6))
    engine.step()
    assert engine.stats().pending_frames == 3 + 1
    engine.cancel("a")
    assert engine.close("b", flush=False) is None
    stats = engine.stats()
    assert stats.open_streams == 0 and stats.pending_frames == 0
    # Reused slots start from a clean state: decodes still equal the one-shot.
    for turn_id, seed in (("c", 7), ("d", 8)):
        codes = frames(5, seed)
        assert_matches(stream(engine, turn_id, codes), decode_frames(codec, codes))
    assert engine.stats().open_streams == 0


def test_upstream_expected_audio(upstream_fixture, upstream):
    codec, config = upstream
    expected = load_file(upstream_fixture / "expected.safetensors")
    engine = CodecEngine(codec, config, max_streams=1, chunk_frames=2)
    assert_matches(stream(engine, "turn", expected["frames"][0]), expected["audio"][0, 0])


def test_cost_per_chunk_does_not_grow_with_the_turn(small_window):
    codec, config = small_window
    engine = CodecEngine(codec, config, max_streams=1, chunk_frames=2)
    # The transformer holds window - 1 positions per stream, whatever the turn's length.
    assert engine.stats().kv_positions_per_stream == codec.config.sliding_window - 1
    lengths: list[int] = []  # samples into the last conv per step: the chunk plus a fixed left context
    hook = codec.decoder.layers[-1].conv.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[-1]))
    try:
        engine.open_stream("turn")
        engine.push("turn", frames(60, seed=9))
        for _ in range(5):
            engine.step()
        state_at_10 = engine.stats().state_bytes
        while engine.step():
            pass
        assert engine.stats().state_bytes == state_at_10
    finally:
        hook.remove()
    assert len(lengths) == 30 and len(set(lengths)) == 1
    engine.close("turn")


def test_bad_calls(tiny):
    codec, config = tiny
    engine = CodecEngine(codec, config, max_streams=1, chunk_frames=2)
    with pytest.raises(KeyError, match="ghost"):
        engine.push("ghost", frames(1, 0))
    engine.open_stream("a")
    with pytest.raises(ValueError, match="already"):
        engine.open_stream("a")
    with pytest.raises(CapacityError, match="1 streams"):
        engine.open_stream("b")
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        engine.push("a", torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        engine.push("a", torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        engine.push("a", torch.zeros(1, 8))
    with pytest.raises(ValueError, match="2048"):
        engine.push("a", torch.full((1, 8), 2050))  # the speech vocab's pad id is not a Mimi code
    assert engine.stats().pending_frames == 0
    engine.close("a")
    with pytest.raises(KeyError, match="'a'"):
        engine.push("a", frames(1, 0))
    with pytest.raises(KeyError, match="'a'"):
        engine.cancel("a")
    with pytest.raises(ValueError):
        CodecEngine(codec, config, max_streams=0)


def test_encode_voice_reuses_generate(tiny):
    codec, config = tiny
    engine = CodecEngine(codec, config, max_streams=1)
    voice = engine.encode_voice(torch.tensor([5, 6, 7]), torch.randn(4000) * 0.1)
    assert voice.codes.shape == (3, 8) and voice.valid_frames == 3


async def test_a_reply_cancelled_while_its_stream_opens_leaves_no_stream(tiny):
    """A caller who hangs up just as the codec opens its stream must not leave the stream open."""
    from model.engines.codec_loop import CodecLoop

    codec, config = tiny
    loop = CodecLoop(CodecEngine(codec, config, max_streams=2))

    async def no_frames():
        return
        yield

    for _ in range(5):
        reply = asyncio.ensure_future(anext(loop.decode("turn-x", no_frames()), None))
        await asyncio.sleep(0)
        reply.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reply
        await loop.check()  # after the drop that followed the open
        assert loop.stats().open_streams == 0
    await loop.close()
