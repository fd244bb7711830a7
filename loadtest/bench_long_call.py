"""Long calls on the local cluster: one session of 40 turns, then 4 sessions of 40 turns at once, the same 3-second
spoken question every turn (dithered by one PCM16 step per turn, so that no two turns' audio is bit-identical:
with identical audio and the tiny model's often wordless replies a truncated call repeats an earlier prompt
exactly and finds it cached, which flatters the figures; --identical turns that off), each reply as long as the
profile allows (CPU-dev: 250 frames, 20 s; the tiny RANDOM-WEIGHT model often ends a reply earlier).

    flock /tmp/chroma-heavy.lock python loadtest/bench_long_call.py            # starts the default local cluster
    python loadtest/bench_long_call.py --url http://127.0.0.1:8000           # or measures a running one

Per turn (4 sessions: the mean over them): TTFA (the server's: request received to first audio), the Reasoner's
prompt and what it computed of it (prefill = prompt - served by vLLM's prefix cache), the hit rate, what the turn
added to the prompt (new, the server's `new_tokens`: the last reply and the new utterance, with their template
tokens; prefill - new is what block rounding and truncation cost), the bytes of the request each stage received, and
the session's Redis bytes (MEMORY USAGE of its document and its audio). A turn whose commit dropped the oldest
history is marked T: the policy drops ahead, so the next turn's shorter prompt is warmed while the reply plays; a
turn that had to truncate its own history at its start has no `new`. Then the targets' figures, and a chart of TTFA
against the turn index (PNG) next to the JSON of every turn.

With no --url it brings up `chroma-serve up`'s default cluster (CPU-dev profile, tiny RANDOM-WEIGHT checkpoint;
--set KEY=VALUE overrides an app arg as `up --set` does) and takes it down at the end. A turn refused for
capacity (503: on 2 cores the measured bound admits one turn at a time) is retried after its Retry-After and
counted; a refusal on length would be a failure of the history policy and is counted as one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import redis.asyncio
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.clients.http import ApiError, ChromaClient  # noqa: E402
from cluster.local.supervisor import LocalClusterSettings, dotted, down, local_api_key, merge_args, ray_running, up  # noqa: E402
from model.testing.speech import speak_at, synthetic_speech  # noqa: E402
from model.testing.tiny import ensure_tiny_checkpoint  # noqa: E402

QUESTION = "What time does the pharmacy open tomorrow?"
VOICE_TEXT = "This is the voice you will hear in every reply."
LENGTH_ERRORS = ("utterance_too_long", "context_full", "invalid_request")


@dataclass
class Turn:
    index: int
    ttfa_ms: float
    prompt_tokens: int
    cached_tokens: int
    new_tokens: int | None  # what this turn added to the previous prompt (None: first turn, or truncated at its start)
    truncated: bool  # its commit dropped history
    shipped: dict[str, int]
    redis_bytes: int
    wall_s: float  # the call's time so far, at the end of this turn
    reply_s: float  # the reply's audio
    refusals: int = 0

    @property
    def prefill(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Call:
    turns: list[Turn] = field(default_factory=list)
    length_failures: list[str] = field(default_factory=list)
    caller_seconds: float = 0.0


def question(seconds: float) -> np.ndarray:
    """The caller's question at 16 kHz, exactly `seconds` long (espeak-ng speech, padded; synthetic without it)."""
    try:
        audio = speak_at(QUESTION, 16000)
    except RuntimeError:
        audio = synthetic_speech(16000, seconds, seed=1)
    out = np.zeros(int(16000 * seconds), np.float32)
    out[: min(audio.size, out.size)] = audio[: out.size]
    return out


async def redis_bytes(store: redis.asyncio.Redis, session_id: str) -> int:
    key = f"chroma:local:session:{{{session_id}}}"
    used = [await store.memory_usage(k) for k in (key, key + ":audio")]
    return sum(u or 0 for u in used)


def turn_audio(audio: np.ndarray, n: int, dither: bool) -> np.ndarray:
    if not dither:
        return audio
    step = np.random.default_rng(n).integers(-1, 2, audio.size) / 32767.0
    return (audio + step).astype(np.float32)


async def one_call(api: ChromaClient, store: redis.asyncio.Redis, voice_id: str, audio: np.ndarray, turns: int,
                   label: str, number: int, dither: bool) -> Call:
    # Each call its own system prompt: calls share no prefix, as different callers' do (the audio repeats). With this
    # prompt the tiny RANDOM-WEIGHT thinker says something in most replies, so a call outgrows its 4096 positions
    # in about ten turns, as in issue 17 (with "You are the front desk of a pharmacy." it says nothing after turn 1).
    session = await api.create_session(voice_id, system_prompt=f"Be brief. (call {number})")
    call, started = Call(), time.monotonic()
    for n in range(1, turns + 1):
        refusals = 0
        while True:
            try:
                done = (await api.turn(session["id"], turn_audio(audio, n, dither), 16000)).done
                break
            except ApiError as error:
                if error.status == 503 and error.retryable:
                    refusals += 1
                    await asyncio.sleep(1.0)
                    continue
                if error.code in LENGTH_ERRORS:
                    call.length_failures.append(f"turn {n}: {error.code}")
                    done = None
                    break
                raise
        if done is None:
            continue
        call.caller_seconds += audio.size / 16000
        truncated = bool(done["dropped"])
        new = done["new_tokens"]
        call.turns.append(Turn(n, done["ttfa_ms"], done["prompt_tokens"], done["cached_tokens"], new, truncated,
                               done["shipped_bytes"], await redis_bytes(store, session["id"]),
                               time.monotonic() - started, done["audio_seconds"], refusals))
        t = call.turns[-1]
        print(f"  {label} turn {n:>2}: TTFA {t.ttfa_ms:>6.0f} ms, prompt {t.prompt_tokens:>5}, prefill "
              f"{t.prefill:>5}, reply {t.reply_s:4.1f} s{' T' if truncated else ''}", flush=True)
    return call


def by_index(calls: list[Call]) -> dict[int, list[Turn]]:
    rows: dict[int, list[Turn]] = {}
    for call in calls:
        for turn in call.turns:
            rows.setdefault(turn.index, []).append(turn)
    return dict(sorted(rows.items()))


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def table(title: str, calls: list[Call]) -> list[str]:
    lines = [f"## {title}", "",
             "| turn | TTFA ms | prompt | prefill | hit rate | new | prefill - new | Codec B | SpeechStack B | "
             "Reasoner B | Redis B | T |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for index, turns in by_index(calls).items():
        hit = mean(t.cached_tokens / t.prompt_tokens for t in turns)
        new = mean(t.new_tokens for t in turns)
        excess = mean(t.prefill - t.new_tokens for t in turns if t.new_tokens is not None)
        lines.append(
            f"| {index} | {mean(t.ttfa_ms for t in turns):.0f} | {mean(t.prompt_tokens for t in turns):.0f} | "
            f"{mean(t.prefill for t in turns):.0f} | {hit:.2f} | {new:.0f} | {excess:.0f} | "
            f"{mean(t.shipped['Codec'] for t in turns):.0f} | {mean(t.shipped['SpeechStack'] for t in turns):.0f} | "
            f"{mean(t.shipped['Reasoner'] for t in turns):.0f} | {mean(t.redis_bytes for t in turns):.0f} | "
            f"{sum(t.truncated for t in turns)} |")
    return lines


def targets(title: str, calls: list[Call], turns: int) -> list[str]:
    rows = by_index(calls)
    all_turns = [t for c in calls for t in c.turns]
    early = [t.ttfa_ms for i, ts in rows.items() if 2 <= i <= 5 for t in ts]
    late = [t.ttfa_ms for i, ts in rows.items() if 30 <= i <= 40 for t in ts]
    excess = [t.prefill - t.new_tokens for t in all_turns if t.new_tokens is not None]
    kept = [t for t in all_turns if t.new_tokens is not None]
    shipped = {stage: sorted({t.shipped[stage] for t in all_turns}) for stage in ("Codec", "SpeechStack")}
    minutes = mean(c.turns[-1].wall_s for c in calls if c.turns) / 60
    growth = [b.redis_bytes - a.redis_bytes for c in calls for a, b in zip(c.turns, c.turns[1:]) if not b.truncated]
    turn_s = mean((b.wall_s - a.wall_s) for c in calls for a, b in zip(c.turns, c.turns[1:]))
    final_redis = mean(c.turns[-1].redis_bytes for c in calls if c.turns)
    peak_redis = max((t.redis_bytes for t in all_turns), default=0)
    answered = sum(len(c.turns) for c in calls)
    lines = [f"### Targets: {title}", ""]
    lines.append(f"- turns answered: {answered} of {turns * len(calls)}; failed on length: "
                 f"{sum(len(c.length_failures) for c in calls)} {[f for c in calls for f in c.length_failures]}; "
                 f"refused for capacity and retried: {sum(t.refusals for t in all_turns)}")
    if early and late:
        lines.append(f"- TTFA turns 2-5: mean {mean(early):.0f} ms (median {statistics.median(early):.0f}); turns "
                     f"30-40: mean {mean(late):.0f} ms (median {statistics.median(late):.0f}): "
                     f"{100 * (mean(late) / mean(early) - 1):+.1f} % (median "
                     f"{100 * (statistics.median(late) / statistics.median(early) - 1):+.1f} %)")
    truncated = sum(t.truncated for t in all_turns)
    cut_now = [t for t in all_turns if t.new_tokens is None and t.index > 1]
    lines.append(f"- prefill - new (turns not truncated at their start, {len(kept)}): max {max(excess, default=0)}, "
                 f"mean {mean(excess):.1f}; commits that dropped history: {truncated}; turns truncated at their start "
                 f"(they prefill what they keep): {len(cut_now)}, mean prefill {mean(t.prefill for t in cut_now):.0f}")
    lines.append(f"- prefix-cache hit rate over the run: "
                 f"{sum(t.cached_tokens for t in all_turns) / max(1, sum(t.prompt_tokens for t in all_turns)):.3f}")
    lines.append(f"- bytes shipped per turn: Codec {shipped['Codec']}, SpeechStack {shipped['SpeechStack']} "
                 "(distinct values over all turns)")
    caller_s = calls[0].caller_seconds / max(1, len(calls[0].turns))
    lines.append(f"- Redis per session: +{mean(growth):.0f} B a turn while the history grows ({caller_s:.1f} s of "
                 f"caller audio and {mean(t.reply_s for t in all_turns):.1f} s of reply a turn, {turn_s:.1f} s a "
                 f"turn): {60 * mean(growth) / caller_s:.0f} B per minute of caller audio, "
                 f"{60 * mean(growth) / turn_s:.0f} B per minute of call; peak {peak_redis} B, "
                 f"{final_redis:.0f} B at the end of a {minutes:.1f}-minute call (bounded: truncation drops audio first)")
    return lines


def chart(path: Path, results: dict[str, list[Call]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for label, calls in results.items():
        rows = by_index(calls)
        index = list(rows)
        axes.plot(index, [mean(t.ttfa_ms for t in rows[i]) for i in index], marker="o", markersize=3, label=label)
        cut = [i for i in index if any(t.truncated for t in rows[i])]
        axes.scatter(cut, [mean(t.ttfa_ms for t in rows[i]) for i in cut], marker="x", color="black", zorder=3)
    axes.set_xlabel("turn")
    axes.set_ylabel("TTFA ms (server)")
    axes.set_title("TTFA against the turn index (x: the turn's commit dropped history)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


async def run(args, url: str, api_key: str, redis_url: str) -> dict[str, list[Call]]:
    audio = question(args.question_s)
    store = redis.asyncio.Redis.from_url(redis_url)
    results = {}
    async with ChromaClient(url, api_key, timeout_s=600) as api:
        voice = await api.create_voice("bench", VOICE_TEXT, synthetic_speech(24000, 2.0, seed=2), 24000)
        number = args.first_call - 1
        for sessions in args.sessions:
            label = f"{sessions} session{'s' * (sessions > 1)}"
            print(f"{label} x {args.turns} turns", flush=True)
            results[label] = list(await asyncio.gather(*(
                one_call(api, store, voice["id"], audio, args.turns, f"{label}[{n}]", number + n + 1,
                         not args.identical)
                for n in range(sessions))))
            number += sessions
    await store.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running cluster (default: bring up the default local cluster, then down)")
    parser.add_argument("--api-key", help="its key (default: the local cluster's)")
    parser.add_argument("--redis-url", help="its Redis (default: the local cluster's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="app arg for the cluster it starts")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                        help="runs of this many sessions at once, one after the other")
    parser.add_argument("--first-call", type=int, default=1, help="the number in the first call's system prompt")
    parser.add_argument("--question-s", type=float, default=3.0)
    parser.add_argument("--identical", action="store_true", help="the very same question audio every turn")
    parser.add_argument("--out", default="runs/long-call", help="folder for the chart (PNG), the tables and the JSON")
    args = parser.parse_args()

    local = LocalClusterSettings()
    started = args.url is None
    if started:
        if ray_running(local):
            sys.exit("a local cluster is running already: pass --url to measure it, or `chroma-serve down` first")
        app_args: dict = {}
        for item in args.set:
            key, _, value = item.partition("=")
            app_args = merge_args(app_args, dotted(key, yaml.safe_load(value)))
    try:
        if started:
            info = up(ensure_tiny_checkpoint(), app_args=app_args, settings=local)
            url, redis_url = info.url, info.redis_url
        else:
            url, redis_url = args.url, args.redis_url or f"redis://127.0.0.1:{local.redis_port}/0"
        print(f"RANDOM WEIGHTS (tiny checkpoint): timings only. cluster {url}; the machine may be shared: "
              "figures measured beside other work are provisional", flush=True)
        results = asyncio.run(run(args, url, args.api_key or local_api_key(local), redis_url))
    finally:
        if started:
            down(local)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for label, calls in results.items():
        lines += table(label, calls) + [""] + targets(label, calls, args.turns) + [""]
    chart(out / "ttfa_by_turn.png", results)
    lines.append(f"chart: {out / 'ttfa_by_turn.png'}")
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    (out / "turns.json").write_text(json.dumps(
        {label: [[asdict(t) for t in c.turns] for c in calls] for label, calls in results.items()}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
