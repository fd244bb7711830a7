"""Settings import nothing heavy: any process may parse the app's config without loading an engine, Ray, the
Redis client or the web framework. Checked in a fresh interpreter, where nothing else has imported them first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "vllm", "ray", "redis", "fastapi", "starlette")

PARSE_PROFILES = """
import json, sys
from pathlib import Path

import yaml

from cluster.settings import AppConfig

for path in sys.argv[1:]:
    for app in yaml.safe_load(Path(path).read_text())["applications"]:
        args = app["args"]
        AppConfig.model_validate({**args, "checkpoint": {**args["checkpoint"], "path": "/checkpoint"}})
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_parsing_a_profile_imports_nothing_heavy():
    profiles = sorted((REPO / "cluster").rglob("profiles/*.yaml"))
    assert profiles
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", PARSE_PROFILES, *map(str, profiles)], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert "cluster" in loaded and "pydantic" in loaded
    assert not loaded & set(HEAVY)
