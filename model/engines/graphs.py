"""Running an engine's step function at a few static shapes ("buckets"): eagerly, compiled, or as CUDA graphs.

A batched step costs a few hundred small kernel launches; at small batches the launches, not the GPU, set its
time. Padding each step up to a bucket (batch 1, 2, 4, ...) gives it one of a few static shapes, and one CUDA
graph per bucket then replays the whole step as a single launch. The kernels are the ones the eager step runs at
that shape, so a replay computes exactly what the padded step computes eagerly (mode "padded").

Modes (`StepMode`, the `step_mode` of SpeechEngineSettings and CodecSettings):
- "eager": exact shapes, no padding (the CPU default);
- "padded": bucket shapes, run eagerly: the graphs' math without capture, to check them against;
- "cuda_graphs": bucket shapes, each captured once as a CUDA graph and replayed (the CUDA default);
- "compiled": bucket shapes through `torch.compile(fullgraph=True)`. With the "eager" or "aot_eager" backend this
  runs on a CPU and proves the step has no graph break (no host sync, no data-dependent Python), which is what
  capturing it as a CUDA graph needs; with "inductor" it fuses the elementwise ops (norms, rotary, residual adds,
  sampling) into fewer kernels;
- "compiled_graphs": "compiled", then each bucket captured as a CUDA graph: fused kernels, one launch.

Capture, as vLLM and SGLang do it: the warm-up run and the capture of every bucket run on ONE persistent side
stream, so whatever a step creates lazily (per-stream cuBLAS/cuDNN workspaces, tables cached on first use) is made
in the warm-up, never during a capture. On CUDA each bucket's SDPA backend is chosen explicitly, the first of
`SDPA_BACKENDS` that runs and captures the step, and every run of that bucket uses it (padded eager included), so a
replay computes what the padded step computes. A bucket that cannot be captured runs padded eager instead: logged
once, when the engine is built, with the reason, and counted in `stats()`; it never fails the engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from model.settings import CompileBackend, StepMode

GRAPH_MODES = ("cuda_graphs", "compiled_graphs")
# Tried in this order per bucket. The engines' attention always carries a mask, which flash attention does not take;
# the memory-efficient kernel does, in float32 too, and it is what torch picks for these calls by default.
SDPA_BACKENDS = ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH")

log = logging.getLogger(__name__)


def resolve_step_mode(mode: StepMode, device: torch.device) -> str:
    """"auto" is CUDA graphs on a GPU and eager elsewhere."""
    if mode == "auto":
        return "cuda_graphs" if device.type == "cuda" else "eager"
    if mode in GRAPH_MODES and device.type != "cuda":
        raise ValueError(f"step mode {mode!r} needs a CUDA device, the model is on {device}")
    return mode


def power_of_two_buckets(limit: int, smallest: int = 1) -> list[int]:
    """smallest, 2 * smallest, 4 * smallest, ... below `limit`, then `limit` itself."""
    buckets, size = [], smallest
    while size < limit:
        buckets.append(size)
        size *= 2
    return buckets + [limit]


def bucket_for(size: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `size`."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"{size} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class StepStats:
    """What a `BucketedStep`'s buckets cost and how they run (its `stats()`); the engines' stats extend it."""

    cuda_graphs: int  # graphs captured
    eager_fallback_buckets: int  # buckets left to padded eager
    eager_fallback_steps: int  # steps those buckets ran
    graph_capture_s: float
    graph_pool_mb: float
    sdpa_backends: dict[str, int]  # buckets per SDPA backend


@dataclass
class Bucket:
    """How one bucket runs, as `BucketedStep.prepare` settled it."""

    sdpa_backend: str | None = None  # None: torch's own choice (eager mode, or a CPU)
    graph: torch.cuda.CUDAGraph | None = None
    outputs: object = None  # the captured outputs, overwritten by each replay
    capture_s: float = 0.0
    graph_bytes: int = 0  # device memory the graphs' pool grew by at this capture (the largest bucket goes first)
    fallback: str | None = None  # why it runs padded eager instead of a graph
    steps: int = 0


def sdpa_backend(name: str | None):
    """A context that runs scaled_dot_product_attention with the named backend only (None: torch's choice)."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def capture_graph(fn: Callable, args: tuple, stream: torch.cuda.Stream, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm up, then capture fn(*args), both on `stream` (one stream for every capture of the engine)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*args)  # makes everything fn creates on first use (tables, workspaces), on the stream it is captured on
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of the process (a codec loop, say) may keep using CUDA meanwhile.
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        outputs = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    return graph, outputs


class BucketedStep:
    """`fn(*args)` keyed by bucket. In the bucketed modes, `prepare` settles every bucket first (its SDPA backend on
    CUDA, its graph in the graph modes), and each call of a bucket must pass the tensors it was prepared with (static
    buffers, or the same views of them): a replay reads and writes those addresses and returns the captured output
    tensors, overwritten by the next replay."""

    # Dynamo's default limit of 8 recompiles per function is fewer than the buckets.
    COMPILE_LIMIT = 1024

    def __init__(self, fn: Callable, mode: str, compile_backend: CompileBackend = "inductor", name: str = "step"):
        self.mode, self.name = mode, name
        self.fn = fn
        if mode in ("compiled", "compiled_graphs"):
            # dynamic=None: static shapes first, then one dynamic-shape recompile on the first new size, so a few
            # compilations serve every bucket (one per bucket at static shapes would take minutes on a GPU).
            self.fn = torch.compile(fn, fullgraph=True, backend=compile_backend)
        self.buckets: dict[tuple, Bucket] = {}
        self.capture_s = 0.0
        self.graph_pool_bytes = 0
        self._stream: torch.cuda.Stream | None = None
        self._pool = None

    def __call__(self, key: tuple, *args):
        if self.mode == "eager":  # exact shapes: no bucket to keep
            return self.fn(*args)
        bucket = self.buckets.get(key)
        if bucket is None:  # a bucket `prepare` left to torch's choices (on a CPU)
            bucket = self.buckets[key] = Bucket()
        bucket.steps += 1
        if bucket.graph is not None:
            bucket.graph.replay()
            return bucket.outputs
        with sdpa_backend(bucket.sdpa_backend), self._compile_config():
            return self.fn(*args)

    @torch.no_grad()
    def prepare(self, buckets: Iterable[tuple[tuple, tuple]], device: torch.device, backends: tuple | None = None) -> None:
        """Settle each (key, args) bucket, in the order given (largest first: the smaller ones then reuse its graph
        memory). The args must be inputs whose step changes nothing the caller keeps, e.g. padding rows only: each
        bucket runs its step a few times here. Buckets that cannot be captured are logged once, grouped by reason.
        `backends`: the SDPA backends to try, in order (default: `SDPA_BACKENDS` on CUDA, torch's choice elsewhere)."""
        cuda = device.type == "cuda"
        backends = backends or (SDPA_BACKENDS if cuda else (None,))
        if backends == (None,) and self.mode not in GRAPH_MODES:
            return  # nothing to settle: torch chooses the SDPA backend, and there are no graphs
        started, reserved = time.perf_counter(), _reserved(device)
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream(device)
        for key, args in buckets:
            self.buckets[key] = self._prepare_bucket(args, backends, device)
        if cuda:
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - started
        self.graph_pool_bytes = _reserved(device) - reserved
        self._log_fallbacks()

    def _prepare_bucket(self, args: tuple, backends: tuple, device: torch.device) -> Bucket:
        """The first SDPA backend that runs the step (and captures it, in the graph modes)."""
        failures = []
        for backend in backends:
            with sdpa_backend(backend), self._compile_config():
                try:
                    self.fn(*args)
                except RuntimeError as error:  # this backend cannot run some attention of the step
                    failures.append(f"{backend}: {_first_line(error)}")
                    continue
                if self.mode not in GRAPH_MODES:
                    return Bucket(sdpa_backend=backend)
                before, started = _reserved(device), time.perf_counter()
                try:
                    graph, outputs = capture_graph(self.fn, args, self._stream, self._pool)
                except Exception as error:  # noqa: BLE001 - any capture failure leaves this bucket to padded eager
                    failures.append(f"{backend or 'default'}: capture failed: {_first_line(error)}")
                    continue
            self._pool = graph.pool()  # all graphs share one memory pool: only one step runs at a time
            return Bucket(backend, graph, outputs, time.perf_counter() - started, _reserved(device) - before)
        ran = [f.split(":")[0] for f in failures if "capture failed" in f]
        return Bucket(
            sdpa_backend=None if not ran or ran[0] == "default" else ran[0],
            fallback="; ".join(failures) or "no SDPA backend runs it",
        )

    def _log_fallbacks(self) -> None:
        by_reason: dict[str, list[tuple]] = {}
        for key, bucket in self.buckets.items():
            if bucket.fallback is not None:
                by_reason.setdefault(bucket.fallback, []).append(key)
        for reason, keys in by_reason.items():
            log.warning("%s: %d of %d buckets run padded eager, not as CUDA graphs (%s): %s",
                        self.name, len(keys), len(self.buckets), reason, ", ".join(map(str, keys)))

    def _compile_config(self):
        """Around every call in the compiled modes (compilation happens inside the first calls of a shape)."""
        if self.mode not in ("compiled", "compiled_graphs"):
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=self.COMPILE_LIMIT))
        import torch._inductor.config as inductor

        if hasattr(inductor, "emulate_precision_casts"):
            # Round to bfloat16/float16 after each fused op as eager does: without it, fused elementwise chains
            # (MLP, rotary, residual + norm) keep float32 between ops and differ from padded eager by an ulp.
            stack.enter_context(inductor.patch(emulate_precision_casts=True))
        return stack

    @property
    def graphs(self) -> int:
        return sum(bucket.graph is not None for bucket in self.buckets.values())

    def stats(self) -> StepStats:
        fallbacks = [b for b in self.buckets.values() if b.fallback is not None]
        return StepStats(
            cuda_graphs=self.graphs,
            eager_fallback_buckets=len(fallbacks),
            eager_fallback_steps=sum(b.steps for b in fallbacks),
            graph_capture_s=round(self.capture_s, 3),
            graph_pool_mb=round(self.graph_pool_bytes / 2**20, 1),
            sdpa_backends=dict(Counter(b.sdpa_backend or "default" for b in self.buckets.values())),
        )

    def bucket_table(self) -> list[dict]:
        """One row per bucket: its key, SDPA backend, capture time and memory, fallback reason, steps run."""
        return [
            {"bucket": "x".join(map(str, key)), "sdpa_backend": b.sdpa_backend or "default", "graph": b.graph is not None,
             "capture_s": round(b.capture_s, 4), "graph_mb": round(b.graph_bytes / 2**20, 2), "fallback": b.fallback,
             "steps": b.steps}
            for key, b in self.buckets.items()
        ]


def _reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
