"""Load the official Chroma checkpoint (single or sharded safetensors) one component at a time.

Components and their key prefixes: thinker (`thinker.`), speech (`backbone.` + `decoder.`), codec
(`codec_model.`). Only the requested component's tensors are read. Apart from the two ties upstream's
save_pretrained drops (see TIED_KEYS), a missing or unexpected key is an error, never a silent random init.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from model.chroma.config import ChromaConfig

Component = Literal["thinker", "speech", "codec"]
COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "thinker": ("thinker.",),
    # The speech stack embeds text tokens with the thinker's input table, so it borrows that one tensor.
    "speech": ("backbone.", "decoder.", "thinker.model.embed_tokens.weight"),
    "codec": ("codec_model.",),
}
# Upstream ties these and writes only one side; either side may be the one present.
TIED_KEYS: list[tuple[str, str]] = [
    ("thinker.lm_head.weight", "thinker.model.embed_tokens.weight"),
    ("backbone.audio_embedding.embed_audio_tokens.weight", "decoder.audio_embedding.embed_audio_tokens.weight"),
]
TEXT_EMBEDDING_KEY = "thinker.model.embed_tokens.weight"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}


class CheckpointError(ValueError):
    pass


class Checkpoint:
    """A checkpoint directory: its config and a key -> shard map read from the safetensors headers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config = ChromaConfig.from_file(self.path)
        self.key_to_file = self._index()
        self.keys_read: set[str] = set()

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.path / name for name in set(weight_map.values())}
            missing = sorted(str(f.name) for f in files.values() if not f.is_file())
            if missing:
                raise CheckpointError(f"{index.name} names shard(s) missing from {self.path}: {', '.join(missing)}")
            return {key: files[name] for key, name in weight_map.items()}
        single = self.path / "model.safetensors"
        shards = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"no safetensors weights in {self.path} (expected model.safetensors or an index)")
        key_to_file = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                key_to_file.update({key: shard for key in f.keys()})
        return key_to_file

    def keys(self, component: Component | None = None) -> list[str]:
        prefixes = COMPONENT_PREFIXES[component] if component else ("",)
        return sorted(k for k in self.key_to_file if k.startswith(prefixes))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """key -> (shape, dtype) from the headers alone."""
        by_file = defaultdict(list)
        for key, file in self.key_to_file.items():
            by_file[file].append(key)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    piece = f.get_slice(key)
                    out[key] = (tuple(piece.get_shape()), piece.get_dtype())
        return out

    def read(self, component: Component, dtype: torch.dtype | None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The component's tensors with ties filled in, names unchanged (still prefixed); dtype None keeps
        the stored one."""
        keys = self.keys(component)
        by_file = defaultdict(list)
        for key in keys:
            by_file[self.key_to_file[key]].append(key)
        state = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in file_keys:
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
        self.keys_read.update(keys)
        for a, b in TIED_KEYS:
            if a in state and b not in state and b.startswith(COMPONENT_PREFIXES[component]):
                state[b] = state[a]
            elif b in state and a not in state and a.startswith(COMPONENT_PREFIXES[component]):
                state[a] = state[b]
        return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Strictly load `state` (keys starting with `prefix`) into `module`, naming missing/unexpected keys."""
    stripped = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    expected = set(module.state_dict().keys())
    missing = sorted(expected - stripped.keys())
    unexpected = sorted(stripped.keys() - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(prefix + k for k in keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {show(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
        raise CheckpointError(f"{what} weights do not match the model: " + "; ".join(problems))
    module.load_state_dict(stripped, strict=True, assign=True)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_thinker(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(
            checkpoint.config.thinker_hf_config(), dtype=dtype
        )
    load_into(thinker, checkpoint.read("thinker", dtype, device), "thinker.", "thinker")
    return thinker.eval()


def load_speech(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from model.chroma.speech import SpeechModel

    with torch.device("meta"):
        speech = SpeechModel(checkpoint.config)
    state = checkpoint.read("speech", dtype, device)
    state["text_embedding.weight"] = state.pop(TEXT_EMBEDDING_KEY)
    load_into(speech, state, "", "speech (backbone + decoder)")
    speech.tie_weights()
    return speech.eval()


def load_codec(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import MimiModel
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        codec = MimiModel._from_config(checkpoint.config.codec_hf_config(), dtype=dtype)
    load_into(codec, checkpoint.read("codec", dtype, device), "codec_model.", "codec")
    return codec.eval()


LOADERS = {"thinker": load_thinker, "speech": load_speech, "codec": load_codec}


def load_component(path: str | Path | Checkpoint, component: Component, dtype="float32", device="cpu"):
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    if component not in LOADERS:
        raise ValueError(f"unknown component {component!r}; use one of {', '.join(LOADERS)}")
    return LOADERS[component](checkpoint, resolve_dtype(dtype), device)


PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "generation_config.json",
)


def split_thinker(src: str | Path, out: str | Path) -> Path:
    """Write a thinker-only directory that transformers and vLLM load as a Qwen2.5-Omni thinker.

    Safetensors stores names inside the file, so the `thinker.` prefix can only be dropped by rewriting the
    thinker's tensors; everything else (tokenizer, feature extractor, chat template) is linked, not copied."""
    from safetensors.torch import save_file

    checkpoint = Checkpoint(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    thinker_config = dict(checkpoint.config.thinker_config)
    thinker_config["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    thinker_config.setdefault("model_type", "qwen2_5_omni_thinker")
    (out / "config.json").write_text(json.dumps(thinker_config, indent=2))

    state = {}
    for key, tensor in checkpoint.read("thinker", dtype=None).items():
        state[key[len("thinker."):]] = tensor
    # The tie is implicit in Chroma checkpoints; vLLM expects the head explicitly when the text config
    # says the embeddings are not tied.
    if state["lm_head.weight"] is state["model.embed_tokens.weight"]:
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})

    for name in PROCESSOR_FILES:
        source = checkpoint.path / name
        target = out / name
        if source.is_file() and not target.exists():
            target.symlink_to(source.resolve())
    return out


def split_thinker_once(src: str | Path, out: str | Path) -> Path:
    """`out`, a thinker-only directory of `src`, split out unless it is already there. Safe when several processes
    (replicas on one node) race: each splits beside `out` and renames into place; the first rename wins."""
    import os
    import shutil
    import tempfile

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        split_thinker(src, staging)
        staging.chmod(0o755)  # mkdtemp's is private
        os.rename(staging, out)
    except OSError:
        if not (out / "config.json").is_file():  # not another process's win: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def describe(path: str | Path) -> dict:
    """Components, parameter counts, dtypes and bytes, from the safetensors headers alone."""
    checkpoint = Checkpoint(path)
    shapes = checkpoint.shapes()
    report = {}
    for component, prefixes in COMPONENT_PREFIXES.items():
        keys = [k for k in shapes if k.startswith(prefixes) and not (component == "speech" and k.startswith("thinker."))]
        params = sum(math.prod(shapes[k][0]) for k in keys)
        dtypes = sorted({shapes[k][1] for k in keys})
        nbytes = sum(math.prod(shapes[k][0]) * DTYPE_BYTES.get(shapes[k][1], 4) for k in keys)
        report[component] = {"tensors": len(keys), "parameters": params, "dtypes": dtypes, "bytes": nbytes}
    other = [k for k in shapes if not k.startswith(sum(COMPONENT_PREFIXES.values(), ()))]
    if other:
        report["unrecognised"] = {"tensors": len(other), "examples": other[:5]}
    return report
