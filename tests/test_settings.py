"""What the light layers import, checked in a fresh interpreter (where nothing else imported it first): settings
import nothing heavy, so any process may parse the app's config without loading an engine, Ray, the Redis client or
the web framework; admission control, which HTTP turns and live calls share, imports nothing of the API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "vllm", "ray", "redis", "fastapi", "starlette")

PARSE_PROFILES = """
import sys
from pathlib import Path

import yaml

from cluster.settings import AppConfig

for path in sys.argv[1:]:
    for app in yaml.safe_load(Path(path).read_text())["applications"]:
        args = app["args"]
        AppConfig.model_validate({**args, "checkpoint": {**args["checkpoint"], "path": "/checkpoint"}})
"""


def loaded_by(code: str, *args: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (this checkout's packages first on its path)."""
    done = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(list(sys.modules)))",
                           *args], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_parsing_a_profile_imports_nothing_heavy():
    profiles = sorted((REPO / "cluster").rglob("profiles/*.yaml"))
    assert profiles
    loaded = loaded_by(PARSE_PROFILES, *map(str, profiles))
    assert "cluster.settings" in loaded and "model.settings" in loaded
    assert not {name.split(".")[0] for name in loaded} & set(HEAVY)


def test_admission_sits_below_the_api():
    loaded = loaded_by("import cluster.admission.control")
    assert "cluster.admission.control" in loaded
    assert not [name for name in loaded if name.startswith(("cluster.api", "fastapi", "starlette"))]
