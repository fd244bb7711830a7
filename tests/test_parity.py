"""Upstream parity through the `chroma-serve check-parity` command, as the maintainers run it."""

import json
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file


def run_check(path):
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "check-parity", str(path)], capture_output=True, text=True, timeout=600
    )


def test_upstream_fixture_is_reproduced_exactly(upstream_fixture):
    done = run_check(upstream_fixture)
    print(done.stdout, done.stderr)
    assert done.returncode == 0
    for item in ("text tokens", "frames", "audio"):
        assert any(line.startswith("PASS") and item in line for line in done.stdout.splitlines()), item
    assert "identical to upstream" in done.stdout


def test_a_single_changed_code_fails_the_check(upstream_fixture, tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(upstream_fixture, fixture)
    expected = load_file(fixture / "expected.safetensors")
    frames = expected["frames"].clone()
    frames[0, 7, 3] = (frames[0, 7, 3] + 1) % 2048
    (fixture / "expected.safetensors").chmod(0o644)
    save_file({"frames": frames, "audio": expected["audio"]}, fixture / "expected.safetensors")
    meta = json.loads((fixture / "expected.json").read_text())
    meta["text_tokens"][-2] += 1
    (fixture / "expected.json").chmod(0o644)
    (fixture / "expected.json").write_text(json.dumps(meta))

    done = run_check(fixture)
    assert done.returncode == 1
    assert "FAIL  frames" in done.stdout and "first at frame 7" in done.stdout
    assert "FAIL  text tokens" in done.stdout
    assert "MISMATCH" in done.stdout


def test_parity_fixture_missing_files_is_a_clear_error(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 2
    assert "lacks inputs.safetensors" in done.stderr
