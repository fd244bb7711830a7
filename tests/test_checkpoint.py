"""Loader, tiny checkpoint layout, per-component loading, split and inspect."""

import errno
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.chroma.checkpoint import (
    Checkpoint,
    CheckpointError,
    describe,
    load_component,
    split_thinker,
    split_thinker_once,
)


def keys_of(path):
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_tiny_checkpoint_has_the_official_key_set(tiny_checkpoint, upstream_fixture):
    # The tiny config has the fixture's depths, so the official layout means exactly the same names.
    assert keys_of(tiny_checkpoint) == keys_of(upstream_fixture)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "chroma"
    assert config["thinker_config"]["text_config"]["head_dim"] == 64
    assert config["backbone_config"]["hidden_size"] == config["thinker_config"]["text_config"]["hidden_size"]
    assert (tiny_checkpoint / "RANDOM_WEIGHTS.txt").is_file()


def test_tiny_checkpoint_is_deterministic_per_seed(tmp_path):
    from model.testing.tiny import write_tiny_checkpoint

    a = load_file(write_tiny_checkpoint(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(write_tiny_checkpoint(tmp_path / "b", seed=3) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def copy_with_state(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    edit(state)
    (dst / "model.safetensors").chmod(0o644)
    save_file(state, dst / "model.safetensors")
    return dst


def test_missing_key_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    broken = copy_with_state(tiny_checkpoint, tmp_path / "c", lambda s: s.pop("backbone.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key.*backbone\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_component(broken, "speech")


def test_unexpected_key_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    broken = copy_with_state(tiny_checkpoint, tmp_path / "c", lambda s: s.update({"codec_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key.*codec_model\.extra\.weight"):
        load_component(broken, "codec")


def test_tied_keys_are_filled_and_an_explicit_lm_head_is_used(tiny_checkpoint, tmp_path):
    thinker = load_component(tiny_checkpoint, "thinker")
    assert torch.equal(thinker.lm_head.weight, thinker.model.embed_tokens.weight)
    speech = load_component(tiny_checkpoint, "speech")
    assert speech.backbone.audio_embedding.embed_audio_tokens.weight is speech.decoder.audio_embedding.embed_audio_tokens.weight

    head = torch.randn(4096, 128)
    explicit = copy_with_state(tiny_checkpoint, tmp_path / "c", lambda s: s.update({"thinker.lm_head.weight": head}))
    assert torch.equal(load_component(explicit, "thinker").lm_head.weight, head)


@pytest.mark.parametrize("component, allowed", [
    ("thinker", ("thinker.",)),
    ("codec", ("codec_model.",)),
    ("speech", ("backbone.", "decoder.", "thinker.model.embed_tokens.weight")),
])
def test_component_loading_reads_only_its_tensors(tiny_checkpoint, component, allowed):
    checkpoint = Checkpoint(tiny_checkpoint)
    load_component(checkpoint, component)
    assert checkpoint.keys_read
    assert all(key.startswith(allowed) for key in checkpoint.keys_read)
    assert checkpoint.keys_read == set(checkpoint.keys(component))


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    state = load_file(tiny_checkpoint / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny_checkpoint / "config.json", sharded / "config.json")

    a, b = load_component(tiny_checkpoint, "speech"), load_component(sharded, "speech")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Checkpoint(sharded)


def test_bfloat16_loading(tiny_checkpoint):
    speech = load_component(tiny_checkpoint, "speech", dtype="bfloat16")
    assert speech.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_component(tiny_checkpoint, "speech", dtype="int3")


def test_missing_checkpoint_files_are_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        Checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unknown component"):
        load_component(tiny_checkpoint, "vocoder")


def test_split_thinker_loads_in_transformers_with_identical_outputs(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

    out = split_thinker(tiny_checkpoint, tmp_path / "thinker")
    assert (out / "tokenizer.json").is_symlink()
    assert all(not k.startswith("thinker.") for k in keys_of(out))
    reference = load_component(tiny_checkpoint, "thinker")
    loaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_inspect_reports_components(tiny_checkpoint):
    report = describe(tiny_checkpoint)
    assert set(report) == {"thinker", "speech", "codec"}
    assert report["speech"]["parameters"] > 0 and report["speech"]["dtypes"] == ["F32"]
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "checkpoint", "inspect", str(tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert "RANDOM WEIGHTS" in done.stderr
    assert "speech" in done.stdout and "codec" in done.stdout


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_a_read_only_checkpoint_has_its_thinker_split_on_the_node(tiny_checkpoint, monkeypatch, tmp_path):
    """The Helm chart mounts the checkpoint read-only (and the Reasoner's node may not be where the app was built):
    the thinker is split on the Reasoner's node, under the tools' home, once, and the checkpoint is left as it was."""
    import model.testing.tiny
    from cluster.settings import AppConfig

    checkpoint = tmp_path / "ro"
    # without a thinker split beside it (an earlier test in the session may have split the shared one)
    shutil.copytree(tiny_checkpoint, checkpoint, ignore=shutil.ignore_patterns("thinker"))
    real_mkdtemp = tempfile.mkdtemp

    def read_only_mount(*args, dir=None, **kwargs):  # what a read-only volume answers (tests run as root)
        if dir is not None and Path(dir).is_relative_to(checkpoint):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_mount)
    monkeypatch.setattr(model.testing.tiny, "CHROMA_SERVE_HOME", tmp_path / "home")
    before = _tree(checkpoint)
    config = AppConfig.model_validate({"checkpoint": {"path": str(checkpoint)}, "reasoner": {"engine": "vllm"}})
    path = Path(config.reasoner_path())
    assert _tree(checkpoint) == before
    assert path.is_relative_to(tmp_path / "home") and (path / "config.json").is_file()
    assert config.reasoner_path() == str(path)  # split once
    assert all(not k.startswith("thinker.") for k in keys_of(path))


def test_a_writable_checkpoint_keeps_its_thinker_beside_it(tiny_checkpoint, tmp_path):
    from cluster.settings import AppConfig

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint, ignore=shutil.ignore_patterns("thinker"))
    config = AppConfig.model_validate({"checkpoint": {"path": str(checkpoint)}, "reasoner": {"engine": "vllm"}})
    assert config.reasoner_path() == str(checkpoint / "thinker") and (checkpoint / "thinker" / "config.json").is_file()
    assert config.reasoner_path() == str(checkpoint / "thinker")


def test_replicas_racing_to_split_get_one_complete_thinker(tiny_checkpoint, tmp_path):
    out = tmp_path / "node" / "thinker"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: split_thinker_once(tiny_checkpoint, out), range(4)))
    assert results == [out] * 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["thinker"]  # no staging directory left behind
    assert all(not k.startswith("thinker.") for k in keys_of(out))
