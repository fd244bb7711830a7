"""What the client scripts share (each runs in the clients' venv, from this folder): the README's snippet they are
built by, and the caller's speech."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

RATE = 24000  # what both clients send and play


def readme_snippet(readme: Path, heading: str) -> str:
    """The first ```python block of the README section `heading` (a `## ` heading), as written."""
    text = readme.read_text()
    marker = f"\n## {heading}\n"
    if marker not in text:
        raise SystemExit(f"{readme} has no section {heading!r}")
    section = text.split(marker, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    if block is None:
        raise SystemExit(f"{readme}'s section {heading!r} has no python block")
    return block.group(1)


def espeak(text: str) -> bytes:
    """`text` spoken by espeak-ng, as 24 kHz mono PCM16, raw."""
    with tempfile.TemporaryDirectory() as tmp:
        wav, raw = Path(tmp) / "say.wav", Path(tmp) / "say.raw"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        subprocess.run(["sox", str(wav), "-r", str(RATE), "-c", "1", "-b", "16", "-e", "signed-integer", str(raw)],
                       check=True, capture_output=True)
        return raw.read_bytes()
