"""The container image (Containerfile): `make image` builds it, `make image-test` builds it here and tries it.

Standard library only: `make image` runs this with the system python3, before any virtualenv exists.

`build` uses podman, or docker where podman is missing, and hands the build what this machine's pip reaches: its
configuration (`pip config list`, PIP_* variables) as build args, every local folder that names (find-links
folders, file:// indexes) as a read-only volume, and pip's CA bundle as the build secret `ca` (so a TLS-inspecting
proxy's CA reaches pip and apt inside the build, and stays out of the image).

`test` is what CI runs on a Debian machine with no registry in reach: it installs podman if it is missing, makes
a local Debian base with debootstrap (once: it is kept as BASE_TAG), builds the CPU image on it (podman keeps the
layers, so an unchanged tree rebuilds in seconds), runs it, checks from this machine that it runs as a non-root
user, that /healthz, /readyz and /console (package data: the page is in the image) answer through the published
port and that `chroma-serve demo` answers a spoken turn through it, then removes the container. It prints each
step's time and ends on an "N passed, N failed" line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
BASE_TAG = "localhost/chroma-serve-base:bookworm"
TEST_IMAGE = "localhost/chroma-serve:image-test"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chroma-serve" / "container"
# podman's default runtime (crun) fails on hosts with hybrid cgroups such as these machines; runc with cgroupfs
# runs there and on ordinary hosts. Used when runc is installed and CONTAINERS_CONF names no config of the caller's.
RUNC_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert")


def _log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def _run(argv: list[str], *, env: dict | None = None, check: bool = True, capture: bool = False,
         timeout: float | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=env, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if check and done.returncode != 0:
        tail = f":\n{done.stdout[-3000:]}" if capture and done.stdout else ""
        raise RuntimeError(f"`{' '.join(argv[:3])} ...` failed ({done.returncode}){tail}")
    return done


# --- the container engine -----------------------------------------------------------------------------------------

@dataclass
class Engine:
    command: str
    env: dict = field(default_factory=lambda: dict(os.environ))

    @property
    def is_podman(self) -> bool:
        return Path(self.command).name == "podman"

    def __call__(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return _run([self.command, *args], env=self.env, **kwargs)


def find_engine() -> Engine:
    podman = shutil.which("podman")
    if podman:
        env = dict(os.environ)
        if "CONTAINERS_CONF" not in env and shutil.which("runc"):
            CACHE.mkdir(parents=True, exist_ok=True)
            conf = CACHE / "containers.conf"
            conf.write_text(RUNC_CONF)
            env["CONTAINERS_CONF"] = str(conf)
        return Engine(podman, env)
    docker = shutil.which("docker")
    if docker and _run([docker, "info"], check=False, capture=True).returncode == 0:
        return Engine(docker)
    raise RuntimeError("neither podman nor a running docker was found: apt-get install podman runc (Debian)")


# --- this machine's package sources -------------------------------------------------------------------------------

@dataclass
class PipSources:
    """What pip on this machine is configured with, as build args, volumes and a CA bundle for the build."""

    values: dict[str, list[str]]

    @classmethod
    def from_host(cls) -> PipSources:
        listed = _run([sys.executable, "-m", "pip", "config", "list"], check=False, capture=True)
        return cls.parse(listed.stdout if listed.returncode == 0 else "", os.environ)

    @classmethod
    def parse(cls, config_list: str, environ: Mapping[str, str]) -> PipSources:
        """`pip config list` output, with PIP_* variables over it as pip itself applies them."""
        rank = {"global": 0, "install": 1, ":env:": 2}  # later sections win
        found: dict[str, tuple[int, str]] = {}
        for line in config_list.splitlines():
            match = re.match(r"^([^.]*)\.([\w-]+)='(.*)'$", line.strip())
            if match and match[2] in PIP_KEYS and match[1] in rank:
                if match[2] not in found or rank[match[1]] >= found[match[2]][0]:
                    found[match[2]] = (rank[match[1]], match[3])
        values: dict[str, list[str]] = {}
        for key in PIP_KEYS:
            text = environ.get("PIP_" + key.upper().replace("-", "_")) or found.get(key, (0, ""))[1]
            if text:
                values[key] = text.split()
        return cls(values)

    def build_args(self) -> dict[str, str]:
        names = {"index-url": "PIP_INDEX_URL", "extra-index-url": "PIP_EXTRA_INDEX_URL",
                 "find-links": "PIP_FIND_LINKS", "trusted-host": "PIP_TRUSTED_HOST"}
        return {names[k]: " ".join(v) for k, v in self.values.items() if k in names}

    def local_folders(self) -> list[Path]:
        """Folders the build must see at the same path: find-links folders, and the root of each file:// index
        (a simple index links its files relative to itself, e.g. simple/numpy/ -> ../../files/)."""
        folders = []
        for key in ("find-links", "index-url", "extra-index-url"):
            for item in self.values.get(key, []):
                path = Path(urlparse(item).path) if item.startswith("file:") else Path(item)
                if not path.is_absolute() or not path.exists():
                    continue
                if key != "find-links" and path.name == "simple":
                    path = path.parent
                folders.append(path)
        return sorted(set(folders))

    def ca_bundle(self) -> Path | None:
        for candidate in (*self.values.get("cert", []), os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE")):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    def has_local_wheel(self, spec: str) -> bool:
        """Whether a find-links folder holds the wheel `spec` (name==version) names."""
        name, _, version = spec.partition("==")
        for folder in self.values.get("find-links", []):
            if glob.glob(os.path.join(folder, f"{name}-{version}-*.whl")):
                return True
        return False


def makefile_value(name: str, *make_args: str) -> str:
    """A variable as the Makefile computes it (one source for the pins)."""
    done = _run(["make", "-s", "--no-print-directory", "-C", str(REPO), f"print-{name}", *make_args], capture=True)
    return done.stdout.strip()


# --- build --------------------------------------------------------------------------------------------------------

def build(image: str, base: str, device: str, torch_index: str | None = None, engine: Engine | None = None) -> float:
    """Build the Containerfile; returns the seconds it took."""
    engine = engine or find_engine()
    sources = PipSources.from_host()
    argv = ["build", "-f", str(REPO / "Containerfile"), "-t", image, "--network", "host",
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"DEVICE={device}"]
    for key, value in sources.build_args().items():
        argv += ["--build-arg", f"{key}={value}"]
    if torch_index is None and device == "cpu" and sources.has_local_wheel(makefile_value("TORCH_SPEC", "DEVICE=cpu")):
        torch_index = ""  # the CPU torch is in a local wheel folder: no PyTorch index needed
    if torch_index is not None:
        argv += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    ca = sources.ca_bundle()
    if ca:
        argv += ["--secret", f"id=ca,src={ca}"]
    folders = sources.local_folders()
    if engine.is_podman:
        argv += ["--isolation", "chroot"]
        for folder in folders:
            argv += ["-v", f"{folder}:{folder}:ro"]
    elif folders:
        _log(f"docker cannot mount folders into a build: pip's local folders {', '.join(map(str, folders))} stay out of it")
    _log(f"building {image} ({device}) on {base} with {engine.command}")
    started = time.monotonic()
    engine(*argv, str(REPO))
    return time.monotonic() - started


# --- test ---------------------------------------------------------------------------------------------------------

def ensure_podman() -> None:
    needed = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool)]
    if not needed:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"please install {' '.join(needed)} (Debian packages)")
    _log(f"installing {' '.join(needed)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env, capture=True)
    _run(["apt-get", "install", "-y", "-qq", *needed], env=env, capture=True)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources name (deb822 or one-line form)."""
    texts = [Path(p).read_text() for p in glob.glob("/etc/apt/sources.list.d/*.sources") + ["/etc/apt/sources.list"]
             if Path(p).is_file()]
    for text in texts:
        for url in re.findall(r"^(?:URIs:|deb)\s+(\S+)", text, flags=re.M):
            if url.rstrip("/").endswith("/debian"):
                return url
    return "http://deb.debian.org/debian"


def ensure_base(engine: Engine) -> float:
    """A Debian bookworm base image made with debootstrap; kept, so only the first run pays for it."""
    if engine("image", "exists", BASE_TAG, check=False).returncode == 0:
        _log(f"base {BASE_TAG}: reused")
        return 0.0
    started = time.monotonic()
    mirror = debian_mirror()
    _log(f"base {BASE_TAG}: debootstrap bookworm from {mirror}")
    with tempfile.TemporaryDirectory(prefix="chroma-rootfs-") as rootfs:
        _run(["debootstrap", "--variant=minbase", "bookworm", rootfs, mirror], capture=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([engine.command, "import", "-", BASE_TAG], stdin=tar.stdout, env=engine.env,
                                  capture_output=True, text=True)
        tar.wait()
        if tar.returncode or imported.returncode:
            raise RuntimeError(f"importing the debootstrap root failed: {imported.stderr[-2000:]}")
    return time.monotonic() - started


def image_id(engine: Engine, image: str) -> str | None:
    found = engine("image", "inspect", image, "--format", "{{.Id}}", check=False, capture=True)
    return found.stdout.strip() if found.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@dataclass
class Checks:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    log: Callable[[str], None] = _log

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        (self.passed if ok else self.failed).append(name)
        self.log(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
        return ok


def test(ready_timeout_s: float = 900.0) -> int:
    checks = Checks()
    timings: dict[str, float] = {}
    ensure_podman()
    engine = find_engine()
    timings["base"] = ensure_base(engine)
    previous = image_id(engine, TEST_IMAGE)
    timings["build"] = build(TEST_IMAGE, BASE_TAG, "cpu", engine=engine)
    if previous and previous != image_id(engine, TEST_IMAGE):
        engine("rmi", previous, check=False, capture=True)  # the last run's image: its layers stay while shared
    size = engine("image", "inspect", TEST_IMAGE, "--format", "{{.Size}}", capture=True).stdout.strip()
    _log(f"image {TEST_IMAGE}: {int(size) / 1e9:.2f} GB")

    name = f"chroma-image-test-{secrets.token_hex(4)}"
    port, api_key = free_port(), f"image-test-{secrets.token_hex(16)}"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # A short reply keeps the turn cheap on a 2-core machine; it still runs every stage.
    engine("run", "-d", "--name", name, "--shm-size=1g", "-p", f"127.0.0.1:{port}:8000", TEST_IMAGE,
           "chroma-serve", "up", "--foreground", "--api-keys", json.dumps({api_key: "image-test"}),
           "--set", "turns.max_frames=25", "--set", "turns.max_tokens=16", capture=True)
    try:
        user = engine("exec", name, "id", "-u", capture=True).stdout.strip()
        checks.check("runs as a non-root user", user not in ("", "0"), f"uid {user}")
        ready = None
        while time.monotonic() - started < ready_timeout_s:
            ready = http_status(f"{url}/readyz")
            if ready == 200:
                break
            state = engine("inspect", name, "--format", "{{.State.Status}}", capture=True).stdout.strip()
            if state != "running":
                break
            time.sleep(2)
        timings["start"] = time.monotonic() - started
        checks.check("/healthz answers 200 through the published port", http_status(f"{url}/healthz") == 200)
        checks.check("/console answers 200 through the published port", http_status(f"{url}/console") == 200)
        if checks.check("/readyz answers 200 through the published port", ready == 200,
                        f"after {timings['start']:.0f} s" if ready == 200 else f"last status {ready}"):
            turn_started = time.monotonic()
            reply = REPO / "runs" / "image-test-reply.wav"
            demo = _run([str(Path(sys.executable).parent / "chroma-serve"), "demo", "--url", url, "--api-key", api_key,
                         "--out", str(reply)], check=False, capture=True, timeout=600)
            timings["turn"] = time.monotonic() - turn_started
            print(demo.stdout, end="", flush=True)
            checks.check("a spoken turn answered through the published port (chroma-serve demo)",
                         demo.returncode == 0 and reply.is_file() and reply.stat().st_size > 44,
                         f"exit {demo.returncode}")
    finally:
        if checks.failed:
            logs = engine("logs", name, check=False, capture=True).stdout.splitlines()[-60:]
            serve = engine("exec", name, "sh", "-c", "tail -n 15 /tmp/chroma-ray-*/session_latest/logs/serve/*.log",
                           check=False, capture=True).stdout
            print("--- the container's log ---", *logs, "--- Serve's logs ---", serve, sep="\n", flush=True)
        engine("rm", "-f", "-t", "0", name, check=False, capture=True)
        checks.check("container removed", engine("container", "exists", name, check=False).returncode != 0)

    _log("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"image-test: {len(checks.passed)} passed, {len(checks.failed)} failed", flush=True)
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.container", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the image with podman or docker")
    build_cmd.add_argument("--image", required=True)
    build_cmd.add_argument("--base", required=True, help="the base image (build arg BASE_IMAGE)")
    build_cmd.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    build_cmd.add_argument("--torch-index", help="where the CPU torch comes from (default: a local wheel, else the PyTorch CPU index)")
    commands.add_parser("test", help="build the CPU image on a local Debian base, run it and answer a turn through it")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            seconds = build(args.image, args.base, args.device, args.torch_index)
            _log(f"built {args.image} in {seconds:.0f} s")
            return 0
        return test()
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"[image] error: {error}", file=sys.stderr, flush=True)
        if args.command == "test":
            print("image-test: 0 passed, 1 failed", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
