"""Running an engine's step function at a few static shapes ("buckets"): eagerly, compiled, or as CUDA graphs.

A batched step costs a few hundred small kernel launches; at small batches the launches, not the GPU, set its
time. Padding each step up to a bucket (batch 1, 2, 4, ...) gives it one of a few static shapes, and one CUDA
graph per bucket then replays the whole step as a single launch. The kernels are the ones the eager step runs at
that shape, so a replay computes exactly what the padded step computes eagerly (mode "padded").

Modes (the `step_mode` of SpeechEngineSettings and the `decode_mode` of CodecSettings):
- "eager": exact shapes, no padding (the CPU default);
- "padded": bucket shapes, run eagerly: the graphs' math without capture, to check them against;
- "cuda_graphs": bucket shapes, each captured once as a CUDA graph and replayed (the CUDA default);
- "compiled": bucket shapes through `torch.compile(fullgraph=True)`, one specialization per bucket. With the
  "eager" or "aot_eager" backend this runs on a CPU and proves the step has no graph break (no host sync, no
  data-dependent Python), which is what capturing it as a CUDA graph needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

StepMode = Literal["auto", "eager", "padded", "cuda_graphs", "compiled"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]


def resolve_step_mode(mode: StepMode, device: torch.device) -> str:
    """"auto" is CUDA graphs on a GPU and eager elsewhere."""
    if mode == "auto":
        return "cuda_graphs" if device.type == "cuda" else "eager"
    if mode == "cuda_graphs" and device.type != "cuda":
        raise ValueError(f"step mode 'cuda_graphs' needs a CUDA device, the model is on {device}")
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


class BucketedStep:
    """`fn(*args)` keyed by bucket. In "cuda_graphs" mode every bucket must be captured first (`capture`), and each
    call of a bucket must pass the tensors it was captured with (static buffers, or the same views of them): a
    replay reads and writes those addresses and returns the captured output tensors, overwritten by the next
    replay."""

    # Dynamo compiles one specialization per bucket; its default limit of 8 per function is fewer than the buckets.
    COMPILE_LIMIT = 1024

    def __init__(self, fn: Callable, mode: str, compile_backend: CompileBackend = "inductor"):
        self.fn, self.mode = fn, mode
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._compiled = None
        if mode == "compiled":
            self._compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=compile_backend)
        self._pool = None

    def __call__(self, key: tuple, *args):
        if self.mode == "cuda_graphs":
            graph, outputs = self.graphs[key]
            graph.replay()
            return outputs
        if self._compiled is not None:
            with torch._dynamo.config.patch(recompile_limit=self.COMPILE_LIMIT):
                return self._compiled(*args)
        return self.fn(*args)

    def capture(self, key: tuple, *args) -> None:
        """Capture `fn(*args)` as the graph of `key`. Capture runs fn once eagerly first (warm-up, on a side
        stream, as CUDA graph capture requires), so the args must be inputs whose step changes nothing the caller
        keeps, e.g. padding rows only. All graphs share one memory pool: only one step runs at a time."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread of the process (a codec loop, say) may keep using CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.fn(*args)
        self._pool = graph.pool()
        self.graphs[key] = (graph, outputs)
