"""Torch's intra-op threads for an engine's own worker thread, on a CPU.

torch's CPU ops run on OpenMP, and OpenMP gives every thread that runs parallel ops a worker pool of its own. Once
the process holds more pool threads than cores (the pool of the thread that loaded the model, plus the engine
thread's), libgomp stops spinning between parallel regions, and every op of a step then pays for putting its workers
to sleep and waking them: on 2 cores an engine thread with 2 intra-op threads stepped the tiny model 2.3x slower
than the same thread with 1 (and than the main thread with 2). An engine thread therefore picks its own count.
"""

from __future__ import annotations

import threading

import torch


def use_intra_op_threads(count: int) -> None:
    """Give the calling thread `count` intra-op threads, leaving the other threads' counts as they were."""
    default = torch.get_num_threads()
    torch.set_num_threads(count)
    # set_num_threads also sets the count that threads not started yet begin with: another thread puts that back.
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="restore-threads")
    restore.start()
    restore.join()
