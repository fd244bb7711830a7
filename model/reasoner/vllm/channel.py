"""The side channel that carries the Reasoner's hidden states from vLLM's model process to the front end.

vLLM's `AsyncLLM` always runs the engine core (scheduler) in a separate process, and the model in a worker process
under it, and sends token ids back over its own ZeroMQ sockets; it has no field for per-token hidden states. The
Reasoner therefore opens a second, one-way ZeroMQ PUSH -> PULL pipe next to vLLM's: the front end binds a PULL
socket on a private `ipc://` path and hands the address to the engine through `VllmConfig.additional_config`
(vLLM's slot for plugin settings); in the worker, the logits processor `HiddenStateTap` connects a PUSH socket
and sends one message per engine step with the rows of the tagged requests sampled in that step.

Wire format: two frames, a JSON header `{"tags": [...], "positions": [...], "dim": H}` and the rows as raw
little-endian float32, `len(tags) x H`. `positions[i]` is the sequence position whose final-normed last-layer
state `rows[i]` is, i.e. the row that produced output token k has position prompt_len + k - 1.

No vLLM or torch import here: both processes use this module.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid

import numpy as np

# Key in VllmConfig.additional_config naming the channel address; key in SamplingParams.extra_args tagging a
# request whose hidden states are wanted (the value is the tag the rows carry).
CHANNEL_CONFIG_KEY = "chroma_hidden_channel"
REQUEST_TAG_KEY = "chroma_hidden_tag"


def new_ipc_address() -> tuple[str, str]:
    """A fresh private ipc:// address and the directory holding its socket file (remove it when done)."""
    directory = tempfile.mkdtemp(prefix="chroma-hidden-")
    os.chmod(directory, 0o700)
    return f"ipc://{directory}/{uuid.uuid4().hex[:12]}.sock", directory


def encode_rows(tags: list[str], positions: list[int], rows: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    header = json.dumps({"tags": tags, "positions": positions, "dim": int(rows.shape[1])}).encode()
    return [header, rows.tobytes()]


def decode_rows(frames: list[bytes]) -> tuple[list[str], list[int], np.ndarray]:
    if len(frames) != 2:
        raise ValueError(f"hidden-state message has {len(frames)} frames, expected 2")
    header = json.loads(bytes(frames[0]))
    tags, positions, dim = header["tags"], header["positions"], int(header["dim"])
    rows = np.frombuffer(bytes(frames[1]), dtype="<f4")
    if rows.size != len(tags) * dim or len(positions) != len(tags):
        raise ValueError("hidden-state message is malformed (row count / size mismatch)")
    return tags, positions, rows.reshape(len(tags), dim)
