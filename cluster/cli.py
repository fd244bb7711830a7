"""`chroma-serve` command line: a local cluster (up, down, demo), offline generation, checkpoint tools."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

DEFAULT_REPLY = Path("reply.wav")


def _banner(message: str) -> None:
    line = "!" * (len(message) + 8)
    print(f"{line}\n!!! {message} !!!\n{line}", file=sys.stderr)


def cmd_generate(args) -> int:
    from model.chroma.sampling import SamplingParams
    from model.offline import OfflineChroma
    from model.processing.audio import load_audio_file, write_wav
    from model.processing.processor import Conversation, Message
    from model.testing.speech import speak
    from model.testing.tiny import RANDOM_WEIGHTS_NOTICE, ensure_tiny_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_tiny_checkpoint()
    started = time.perf_counter()
    chroma = OfflineChroma(checkpoint, dtype=args.dtype, device=args.device)
    if chroma.random_weights:
        _banner(f"{RANDOM_WEIGHTS_NOTICE} ({checkpoint})")
    print(f"loaded {checkpoint} in {time.perf_counter() - started:.1f} s")

    user_audio, user_rate = load_audio_file(args.audio) if args.audio else speak(args.say)
    voice_audio, voice_rate = load_audio_file(args.voice_audio) if args.voice_audio else speak(args.voice_text)
    voice = chroma.voice(args.voice_text, voice_audio, voice_rate)
    conversation = Conversation(
        system_prompt=args.system, messages=[Message(role="user", audio=user_audio, sample_rate=user_rate)]
    )
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    result = chroma.reply(conversation, voice, max_frames=args.max_frames, sampling=sampling)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_wav(args.out, result.audio.numpy(), result.sample_rate)
    print(f"text:        {result.text!r}")
    print(f"text tokens: {len(result.text_tokens)}")
    print(f"frames:      {result.frames.shape[0]} ({result.audio_seconds:.2f} s of audio at {result.sample_rate} Hz)")
    print(f"time:        {result.timings['total_s']:.2f} s (reasoner {result.timings['reasoner_s']:.2f}, "
          f"speech {result.timings['speech_s']:.2f}, codec {result.timings['codec_s']:.2f})")
    print(f"real-time factor: {result.real_time_factor:.3f}")
    print(f"wrote {args.out}")
    return 0


def cmd_tiny(args) -> int:
    from model.testing.tiny import RANDOM_WEIGHTS_NOTICE, write_tiny_checkpoint

    out = write_tiny_checkpoint(args.dir, seed=args.seed)
    _banner(RANDOM_WEIGHTS_NOTICE)
    print(f"wrote tiny checkpoint to {out}")
    return 0


def cmd_split(args) -> int:
    from model.chroma.checkpoint import split_thinker

    print(f"wrote thinker-only directory {split_thinker(args.dir, args.out)}")
    return 0


def cmd_inspect(args) -> int:
    from model.chroma.checkpoint import describe
    from model.testing.tiny import uses_random_weights

    report = describe(args.dir)
    if uses_random_weights(args.dir):
        _banner("RANDOM WEIGHTS: this is a tiny test checkpoint")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'component':<12}{'tensors':>9}{'parameters':>16}{'MiB':>10}  dtypes")
    for name, info in report.items():
        if name == "unrecognised":
            print(f"unrecognised tensors: {info['tensors']} e.g. {', '.join(info['examples'])}")
            continue
        print(f"{name:<12}{info['tensors']:>9}{info['parameters']:>16,}{info['bytes'] / 2**20:>10.1f}  {', '.join(info['dtypes'])}")
    return 0


def cmd_check_parity(args) -> int:
    from model.testing.parity import run_fixture

    items = run_fixture(args.dir)
    for item in items:
        print(f"{'PASS' if item.ok else 'FAIL'}  {item.name:<12} {item.detail}")
    ok = all(item.ok for item in items)
    print("parity: " + ("identical to upstream" if ok else "MISMATCH"))
    return 0 if ok else 1


def _local_settings(args):
    """The local cluster's settings ($CHROMA_LOCAL_*), with --home / --port where the command has them."""
    from cluster.local.supervisor import LocalClusterSettings

    given = {"home": getattr(args, "home", None), "port": getattr(args, "port", None)}
    return LocalClusterSettings(**{k: v for k, v in given.items() if v is not None})


def cmd_up(args) -> int:
    import yaml

    from cluster.local.supervisor import dotted, down, merge_args, up
    from model.testing.tiny import RANDOM_WEIGHTS_NOTICE, ensure_tiny_checkpoint, uses_random_weights

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_tiny_checkpoint()
    if uses_random_weights(checkpoint):
        _banner(f"{RANDOM_WEIGHTS_NOTICE} ({checkpoint}): replies are noise, not speech")
    settings = _local_settings(args)
    app_args = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        # Numbers, booleans and {json: objects} keep their types.
        app_args = merge_args(app_args, dotted(key, yaml.safe_load(value)))
    info = up(checkpoint, profile=args.profile, redis_url=args.redis_url or os.environ.get("REDIS_URL"),
              api_keys_path=args.api_keys, app_args=app_args, settings=settings)
    print(f"chroma-serve is up at {info.url}")
    print(f"  serve config: {info.serve_config}")
    print(f"  API keys:     {info.api_keys_path}" + (f" (tenant 'local': {info.api_key})" if info.api_key else ""))
    if not args.foreground:
        print("  try:         chroma-serve demo;  stop with: chroma-serve down")
        return 0
    print("  try:         chroma-serve demo;  stop with Ctrl-C (SIGINT) or SIGTERM", flush=True)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # wait for them here, also as a container's PID 1
    signal.sigwait(stop)
    down(settings)
    return 0


def cmd_down(args) -> int:
    from cluster.local.supervisor import down

    down(_local_settings(args))
    return 0


def cmd_status(args) -> int:
    from cluster.local.supervisor import application_status, engine_stats, ray_running

    settings = _local_settings(args)
    if not ray_running(settings):
        print("chroma-serve: no local cluster is running (start one with `chroma-serve up`)", file=sys.stderr)
        return 1
    status, message = application_status(settings)
    engines = engine_stats(settings) if status == "RUNNING" else {}
    report = {"application": status, "message": message, "engines": {name: asdict(s) for name, s in engines.items()}}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"application: {status.lower()}" + (f"\n{message}" if message else ""))
    for engine, stats in report["engines"].items():
        print(f"{engine}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _client_inputs(args):
    """The cluster, its key, the voice clip and the caller's audio of `demo` and `call`."""
    from cluster.local.supervisor import client_api_key
    from model.processing.audio import load_audio_file
    from model.testing.speech import speak

    settings = _local_settings(args)
    url = args.url or f"http://{settings.host}:{settings.port}"
    api_key = args.api_key or client_api_key(settings)
    voice = load_audio_file(args.voice_audio) if args.voice_audio else speak(args.voice_text)
    caller = load_audio_file(args.audio) if args.audio else speak(args.say)
    return url, api_key, voice, caller


async def _create_voice(client, args, voice_audio, voice_rate) -> dict:
    voice = await client.create_voice("demo", args.voice_text, voice_audio, voice_rate)
    print(f"voice:   {voice['id']} ({voice['valid_frames']} frames of reference audio)")
    return voice


def cmd_demo(args) -> int:
    import asyncio

    from cluster.clients.http import ChromaClient
    from model.processing.audio import CODEC_RATE, write_wav

    url, api_key, (voice_audio, voice_rate), (caller_audio, caller_rate) = _client_inputs(args)

    async def run():
        async with ChromaClient(url, api_key) as client:
            voice = await _create_voice(client, args, voice_audio, voice_rate)
            session = await client.create_session(voice["id"], system_prompt=args.system)
            print(f"session: {session['id']}")
            return await client.turn(session["id"], caller_audio, caller_rate)

    reply = asyncio.run(run())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_wav(args.out, reply.samples, CODEC_RATE)
    print(f"text:    {reply.text!r}")
    print(f"audio:   {reply.done.get('frames', 0)} frames, {reply.audio_seconds:.2f} s in {len(reply.audio)} chunks")
    if reply.ttfa_s is not None:
        print(f"time to first audio: {reply.ttfa_s * 1000:.0f} ms at the client ({reply.done.get('ttfa_ms')} ms in the server)")
        print(f"real-time factor:    {reply.rtf:.3f} at the client ({reply.done.get('rtf')} in the server)")
    print(f"wrote {args.out}")
    return 0


def cmd_call(args) -> int:
    import asyncio

    import numpy as np

    from cluster.clients.realtime import JITTER_BUFFER_S, RealtimeCaller
    from cluster.clients.http import ChromaClient
    from model.processing.audio import CODEC_RATE, resample, write_wav

    url, api_key, (voice_audio, voice_rate), (caller_audio, caller_rate) = _client_inputs(args)
    speech = resample(caller_audio, caller_rate, CODEC_RATE)

    async def run():
        async with ChromaClient(url, api_key) as client:
            voice = await _create_voice(client, args, voice_audio, voice_rate)
        async with RealtimeCaller(url, api_key) as call:
            detection = {"type": "server_vad", "early_start": args.early_start}
            updated = await call.configure(voice["id"], args.system, audio={
                "input": {"turn_detection": detection}, "output": {"voice": voice["id"]}})
            print(f"session: {updated['session']['id']} (resume it with ?session_id=)")
            print(f"calling: streaming {speech.size / CODEC_RATE:.1f} s of speech in real time, then silence")
            await call.say(speech)
            listening = asyncio.create_task(call.say(np.zeros(int(args.listen * CODEC_RATE), np.float32)))
            reply = await call.next_reply(timeout_s=args.listen)
            listening.cancel()
            return call, reply

    call, reply = asyncio.run(run())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_wav(args.out, reply.samples().astype(np.float32) / 32768.0, CODEC_RATE)
    print(f"reply:   {reply.status}, {reply.audio_ms / 1000:.2f} s of audio, text {''.join(reply.transcript)!r}")
    if reply.first_audio_at is not None:
        latency = reply.first_audio_at - call.speech_ended_at
        print(f"voice-to-voice latency: {latency * 1000:.0f} ms from the end of speech to the first reply audio "
              f"(the turn detector's silence window included{', early start' if args.early_start else ''})")
        print(f"underruns: {reply.underruns()} (real-time playback behind a {JITTER_BUFFER_S * 1000:.0f} ms jitter buffer)")
    print(f"wrote {args.out}")
    return 0


def _client_arguments(command: argparse.ArgumentParser, out: str) -> None:
    command.add_argument("--url", help="the cluster (default: the local one)")
    command.add_argument("--api-key", help="default: $CHROMA_API_KEY, else the local cluster's generated key")
    command.add_argument("--voice-audio", help="reference clip; default: --voice-text spoken by espeak-ng")
    command.add_argument("--voice-text", default="This is the voice you will hear in every reply.")
    command.add_argument("--audio", help="caller audio file; default: --say spoken by espeak-ng")
    command.add_argument("--say", default="Hello, can you tell me what the weather is like today?")
    command.add_argument("--system", default="You are a helpful voice assistant. Answer briefly.")
    command.add_argument("--out", default=out)
    command.add_argument("--port", type=int)
    command.add_argument("--home")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chroma-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer one spoken turn offline and write the reply WAV")
    gen.add_argument("--checkpoint", help="checkpoint directory (default: a tiny RANDOM-WEIGHT one, made on first use)")
    gen.add_argument("--audio", help="caller audio (WAV/FLAC, any rate); default: --say synthesised by espeak-ng")
    gen.add_argument("--say", default="Hello, can you tell me what the weather is like today?")
    gen.add_argument("--voice-audio", help="reference clip of the voice to clone; default: --voice-text spoken by espeak-ng")
    gen.add_argument("--voice-text", default="This is the voice you will hear in every reply.",
                     help="transcript of the reference clip")
    gen.add_argument("--system", default="You are a helpful voice assistant. Answer briefly.")
    gen.add_argument("--out", default=str(DEFAULT_REPLY))
    gen.add_argument("--max-frames", type=int, default=125, help="frame limit (12.5 frames per second)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=cmd_generate)

    up = commands.add_parser("up", help="start a local cluster: Ray, Redis, the Serve app; print its URL")
    up.add_argument("--checkpoint", help="checkpoint directory (default: a tiny RANDOM-WEIGHT one, made on first use)")
    up.add_argument("--profile", default="cpu-dev", help="cluster/local/profiles/<name>.yaml or a Serve config file")
    up.add_argument("--redis-url", help="use this Redis (default: $REDIS_URL, else a local redis-server with AOF)")
    up.add_argument("--api-keys", help='JSON {"key": "tenant"} or a file with it (default: a generated key)')
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an app arg of the profile, e.g. --set turns.max_frames=50 (repeatable)")
    up.add_argument("--port", type=int, help="HTTP port (default 8000)")
    up.add_argument("--home", help="data dir (default ~/.cache/chroma-serve/local)")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the foreground and stop the cluster on SIGINT/SIGTERM (the container image's command)")
    up.set_defaults(func=cmd_up)
    down = commands.add_parser("down", help="stop the local cluster and the redis-server `up` started")
    down.add_argument("--home")
    down.set_defaults(func=cmd_down)
    status = commands.add_parser("status", help="the local cluster's app status and each engine's live work")
    status.add_argument("--home")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    demo = commands.add_parser("demo", help="clone a voice, send a spoken turn to the cluster, write the reply WAV")
    _client_arguments(demo, out="runs/cluster-reply.wav")
    demo.set_defaults(func=cmd_demo)
    call = commands.add_parser("call", help="place a live call through /v1/realtime, streaming speech in real time")
    _client_arguments(call, out="runs/call-reply.wav")
    call.add_argument("--early-start", action="store_true", help="start the reply inside the silence window")
    call.add_argument("--listen", type=float, default=120.0, help="seconds to wait for the reply")
    call.set_defaults(func=cmd_call)

    ckpt = commands.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="tool", required=True)
    tiny = ckpt.add_parser("tiny", help="write a tiny RANDOM-WEIGHT checkpoint in the official layout")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny)
    split = ckpt.add_parser("split", help="write a thinker-only directory for vLLM / transformers")
    split.add_argument("dir")
    split.add_argument("out")
    split.set_defaults(func=cmd_split)
    inspect = ckpt.add_parser("inspect", help="components, parameter counts, dtypes, sizes")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    # Reachable both as `chroma-serve check-parity` and `chroma-serve checkpoint check-parity`.
    for group in (commands, ckpt):
        parity = group.add_parser("check-parity", help="compare against an upstream-made fixture directory")
        parity.add_argument("dir")
        parity.set_defaults(func=cmd_check_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import httpx
    from transformers.utils import logging as hf_logging

    from model.errors import ChromaError

    hf_logging.set_verbosity_error()  # transformers warns about the custom `chroma` model type on every load
    try:
        return args.func(args)
    except (ChromaError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as error:
        print(f"chroma-serve: error: {error}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:  # the cluster unreachable, or no answer in time: say so, without a traceback
        detail = f": {error}" if str(error) else ""
        print(f"chroma-serve: error: the cluster did not answer ({type(error).__name__}{detail})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
