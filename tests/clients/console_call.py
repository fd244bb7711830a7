"""The /console page in a real browser: Debian's chromium driven by Playwright (its own browser download is not
reachable here), the microphone a looped espeak-ng utterance (`--use-file-for-fake-audio-capture`). Runs in the
clients' venv and prints a JSON report; tests/live_cluster/test_console.py asserts on it.

    console_call.py BASE_URL API_KEY VOICE_ID

The file holds the utterance, then a pause long enough for server VAD to end the turn; chromium loops it, so the
caller speaks again while the reply plays: a barge-in. What the page did is read from its `#state` data
attributes, never from timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

UTTERANCE = "Hello, can you tell me what the weather is like today?"
PAUSE_S = 2.5  # past the 500 ms silence window, and shorter than a reply, so the next loop speaks over it
RECORD_S = 2.0


def microphone_wav(folder: Path) -> Path:
    spoken, looped = folder / "spoken.wav", folder / "microphone.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), UTTERANCE], check=True)
    subprocess.run(["sox", str(spoken), "-r", "48000", "-c", "1", "-b", "16", str(looped), "pad", "0.3", str(PAUSE_S)],
                   check=True)
    return looped


def state(page) -> dict:
    return page.evaluate("() => ({...document.getElementById('state').dataset})")


def wait_for(page, done, timeout_s: float) -> dict:
    """Polls the page's state until `done(state)`; the last state either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = state(page)
        if done(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.25)


def run(base_url: str, key: str, voice_id: str, call_s: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="console-call-"))
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone_wav(folder)}", "--autoplay-policy=no-user-gesture-required"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # chromium's sandbox cannot start as root in a container
    urls, page_errors = [], []
    report: dict = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                             headless=True, args=args)
        context = browser.new_context()
        context.on("request", lambda request: urls.append(request.url))
        context.on("response", lambda response: page_errors.append(f"{response.status} {response.url}")
                   if response.status >= 400 else None)
        page = context.new_page()
        sockets = []
        page.on("websocket", lambda ws: (sockets.append(ws.url), urls.append(ws.url)))
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        page.on("console", lambda message: page_errors.append(message.text) if message.type == "error" else None)
        page.goto(f"{base_url}/console")

        # No key: the page neither calls nor asks the API for anything.
        page.click("#connect")
        refused = wait_for(page, lambda s: s["error"] == "no_key", 5)
        report["no_key"] = {"error": refused["error"], "status": page.inner_text("#status"), "websockets": len(sockets),
                            "api_requests": [u for u in urls if "/v1/" in u]}

        page.fill("#key", key)
        page.click("#use-key")
        report["voices"] = int(wait_for(page, lambda s: s["voices"] != "0", 15)["voices"])

        # A voice cloned from a recording of the microphone.
        page.click("#record")
        time.sleep(RECORD_S)
        page.click("#record")
        page.fill("#clone-transcript", UTTERANCE)
        page.click("#clone")
        cloned = wait_for(page, lambda s: s["clone"] in ("ok", "error"), 30)
        report["clone"] = {"state": cloned["clone"], "voice": cloned["clonedVoice"], "message": page.inner_text("#clone-state"),
                           "selected": page.input_value("#voice")}

        page.select_option("#voice", voice_id)
        page.click("#connect")
        connected = wait_for(page, lambda s: s["connected"] == "1" or s["error"], 20)
        report["connected"] = connected["connected"] == "1"
        report["subprotocol"] = page.evaluate("() => call && call.ws.protocol")  # what the server accepted with
        call = wait_for(page, lambda s: int(s["bargeIns"]) >= 1 and int(s["repliesPlayed"]) >= 1
                        and bool(page.inner_text("#transcript .assistant span").strip() if page.query_selector("#transcript .assistant") else ""),
                        call_s)
        report["call"] = call
        report["transcript"] = page.evaluate("""() => [...document.querySelectorAll('#transcript .turn')].map(t => ({
            role: t.classList.contains('user') ? 'user' : 'assistant', text: t.querySelector('span').textContent,
            interrupted: t.classList.contains('interrupted')}))""")
        report["latency"] = {"v2v": page.inner_text("#v2v"), "barge_in": page.inner_text("#barge")}
        report["events"] = page.inner_text("#log").splitlines()[:60]
        page.click("#hangup")
        report["hung_up"] = wait_for(page, lambda s: s["connected"] == "0", 10)["connected"] == "0"
        browser.close()
    report["urls"] = sorted(set(urls))
    report["key_in_url"] = any(key in url for url in urls)
    report["page_errors"] = page_errors
    shutil.rmtree(folder, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("key")
    parser.add_argument("voice_id")
    parser.add_argument("--call-s", type=float, default=60.0, help="how long the call may take to show a barge-in")
    args = parser.parse_args()
    json.dump(run(args.base_url.rstrip("/"), args.key, args.voice_id, args.call_s), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
