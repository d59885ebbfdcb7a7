"""The browser demo (clients/web/) in a real browser: Debian's Chromium driven
by Playwright, against a real server with the tone-language backend and the
real Silero endpointer.

Chromium's fake microphone plays a tone-language WAV file once per capture
(``%noloop``; every ``getUserMedia`` starts it again), so the words the page
must show are known exactly. The page resamples it from the audio context's
rate to 16 kHz in its AudioWorklet; the file picker path decodes and
resamples a 44.1 kHz stereo file in the page. Screenshots go to
``.artifacts/browser/``.

Skipped when Playwright or Chromium is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from earshot.service.http.demo import CONTENT_SECURITY_POLICY, DEMO_PATHS
from tests.kit.browser import (
    FOREIGN_HOST,
    ServerThread,
    chromium_args,
    find_chromium,
    screenshot_path,
    write_wav,
)
from tests.kit.live import tone_engine
from tests.kit.tones import make_speech

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium not found (apt-get install chromium, or set EARSHOT_CHROMIUM)",
    ),
]

KEY = "sk-browser-demo"
WAIT_MS = 20_000  # the longest any single wait may take

MIC_SCRIPT = [
    ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"],
    ["golf", "hotel", "india", "juliett", "kilo"],
]
FILE_SCRIPT = [["lima", "mike", "november", "oscar", "papa"], ["delta", "alpha"]]


def texts(script: list[list[str]]) -> list[str]:
    return [" ".join(words) for words in script]


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mic_truth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The fake microphone's WAV (48 kHz mono) and its truth."""
    audio, truth = make_speech(MIC_SCRIPT, 48000, lead_s=0.6, gap_s=1.0, tail_s=1.5)
    path = tmp_path_factory.mktemp("browser") / "microphone.wav"
    return write_wav(path, audio, 48000), truth


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """One server for the module: a key is required, allowed_origins is left
    empty (the page's own loopback origin is allowed all the same), and one
    stream at a time (so that the overload test can fill it)."""

    def engine(origin: str) -> Any:
        return tone_engine(api_keys=KEY, max_streams=1)

    with ServerThread(engine) as live:
        yield live


@pytest.fixture(scope="module")
def browser(mic_truth: tuple[Path, Any]) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=chromium_args(mic_truth[0]), timeout=WAIT_MS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, server: ServerThread) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: Any) -> None:
        # A blocked resource or script shows up here, not as a page error.
        if message.type == "error" and "Content Security Policy" in message.text:
            errors.append(message.text)

    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", on_console)
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page raised errors: {errors}"


# --- helpers -----------------------------------------------------------------------


def open_page(page: Any, url: str, key: str = KEY) -> None:
    page.goto(url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_label("Language").select_option("en")


def finals(page: Any) -> list[str]:
    return list(page.locator("#transcript .final").all_inner_texts())


# Waits use selectors: the page's Content-Security-Policy forbids the eval
# that wait_for_function needs for a JavaScript predicate.


def wait_finals(page: Any, count: int) -> None:
    page.locator("#transcript .final").nth(count - 1).wait_for(timeout=WAIT_MS)


def wait_state(page: Any, *states: str) -> None:
    selector = ", ".join(f"body[data-state='{state}']" for state in states)
    page.wait_for_selector(selector, state="attached", timeout=WAIT_MS)


def page_log(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate("window.earshotDemo.log"))


def request_id(page: Any) -> str:
    return str(page.locator("#info").get_attribute("data-request-id") or "")


def notice(page: Any) -> str:
    page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
    return str(page.locator("#notice").inner_text())


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    def seconds(stamp: str) -> float:
        h, m, rest = stamp.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        start, end = lines[1].split(" --> ")
        cues.append((seconds(start), seconds(end), " ".join(lines[2:])))
    return cues


# --- tests -------------------------------------------------------------------------


def test_page_and_assets_are_public_with_a_strict_policy(server: ServerThread) -> None:
    import urllib.request

    for path in sorted(DEMO_PATHS):
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            assert response.status == 200, path
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            body = response.read()
        kind = response.headers["Content-Type"]
        expected = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        assert kind.startswith(expected.get(Path(path).suffix, "text/html")), (path, kind)
        if path == "/":
            # Self-contained: nothing is loaded from another host.
            assert not re.search(rb"""(src|href)=["']?(https?:)?//""", body)
    assert "connect-src 'self' ws: wss:" in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY


def test_microphone_interims_then_exact_finals_then_a_new_session(
    page: Any, server: ServerThread, mic_truth: tuple[Path, Any]
) -> None:
    expected = texts(MIC_SCRIPT)
    open_page(page, server.url)
    page.get_by_role("button", name="Start microphone").click()
    wait_state(page, "streaming")
    wait_finals(page, 1)
    page.wait_for_selector("#transcript .channel .interim:not(:empty)", timeout=WAIT_MS)
    page.screenshot(path=str(screenshot_path("demo-desktop-live")))
    wait_finals(page, len(expected))
    page.get_by_role("button", name="Stop").click()
    wait_state(page, "idle")
    assert finals(page) == expected
    first_id = request_id(page)
    assert first_id

    # Interims came first, and each final came after an interim of its words.
    log = page_log(page)
    kinds = [e["kind"] for e in log if e["kind"] in ("interim", "final")]
    assert kinds.index("interim") < kinds.index("final"), kinds
    for text in expected:
        final_at = next(i for i, e in enumerate(log) if e["kind"] == "final" and e["text"] == text)
        interims = [e["text"] for e in log[:final_at] if e["kind"] == "interim"]
        assert any(i and text.startswith(i) for i in interims), (text, interims)
    # Latency was measured and shown.
    assert all(
        e["latency"] is not None and 0 <= e["latency"] < 10_000 for e in log if e["kind"] == "final"
    )
    assert re.search(r"final \d+ ms", page.locator("#latency").inner_text())

    # The info panel shows the model, every policy key and the decoding options.
    policy = server.call(lambda: dict(server.engine.policy))
    for key in policy:
        assert page.locator(f"#info-policy dd[data-key='{key}']").count() == 1, key
    assert page.locator("#info-model dd[data-key='name']").inner_text() == "tone"
    assert page.locator("#info-decoding dd[data-key='final']").count() == 1
    page.screenshot(path=str(screenshot_path("demo-desktop")), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(screenshot_path("demo-phone")), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 860})

    # Downloads: the text, and SRT cues at the words' times.
    with page.expect_download() as info:
        page.get_by_role("button", name="Download text").click()
    assert Path(info.value.path()).read_text().splitlines() == expected
    with page.expect_download() as info:
        page.get_by_role("button", name="Download SRT").click()
    assert info.value.suggested_filename.endswith(".srt")
    cues = parse_srt(Path(info.value.path()).read_text())
    truth = mic_truth[1]
    assert [c[2] for c in cues] == expected
    for (start, end, _), utterance in zip(cues, truth.utterances, strict=True):
        assert abs(start - utterance.start) < 0.3, (start, utterance.start)
        assert abs(end - utterance.end) < 0.3, (end, utterance.end)

    # Stop, start again: a new stream with its own request id and new finals.
    server.wait_idle()
    page.get_by_role("button", name="Start microphone").click()
    wait_finals(page, 2 * len(expected))
    page.get_by_role("button", name="Stop").click()
    wait_state(page, "idle")
    assert finals(page) == expected + expected
    second_id = request_id(page)
    assert second_id and second_id != first_id
    metadata = [e for e in page_log(page) if e["kind"] == "metadata"]
    assert [m["requestId"] for m in metadata] == [first_id, first_id, second_id, second_id]
    server.wait_idle()


def test_a_wrong_key_shows_the_servers_message(page: Any, server: ServerThread) -> None:
    open_page(page, server.url, key="sk-not-this-one")
    page.get_by_role("button", name="Start microphone").click()
    text = notice(page)
    assert "wrong API key" in text, text
    assert "401" in text and "unauthorized" in text, text
    wait_state(page, "error")
    # No key at all.
    page.get_by_label("API key").fill("")
    page.get_by_role("button", name="Start microphone").click()
    page.locator("#notice", has_text="missing API key").wait_for(timeout=WAIT_MS)


def test_a_foreign_origin_is_explained(page: Any, server: ServerThread, tmp_path: Path) -> None:
    # The same server under another name (as a rebound DNS name would reach
    # it): the websocket's Origin is not the server's own, and not allowed.
    audio, _ = make_speech([["kilo"]], 16000)
    path = write_wav(tmp_path / "short.wav", audio, 16000)
    open_page(page, server.url.replace("127.0.0.1", FOREIGN_HOST))
    page.get_by_label("Or stream an audio file").set_input_files(str(path))
    text = notice(page)
    assert "forbidden_origin" in text and "not in allowed_origins" in text, text
    assert f"EARSHOT_ALLOWED_ORIGINS=http://{FOREIGN_HOST}:" in text, text


def test_a_full_server_shows_its_message(page: Any, server: ServerThread) -> None:
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    server.wait_idle()
    open_page(page, server.url)
    protocols = [Subprotocol("token"), Subprotocol(KEY)]
    with connect(server.listen_url(), subprotocols=protocols, open_timeout=10) as held:
        assert json.loads(held.recv(timeout=10))["type"] == "Metadata"
        page.get_by_role("button", name="Start microphone").click()
        text = notice(page)
        held.send(json.dumps({"type": "CloseStream"}))
    assert "server_full" in text and "503" in text, text
    assert "the server is at its limit of 1 streams (max_streams)" in text, text
    assert "Try again in 5 s" in text, text
    page.screenshot(path=str(screenshot_path("demo-refused")))
    server.wait_idle()


def test_a_file_streams_through_the_same_path(
    page: Any, server: ServerThread, tmp_path: Path
) -> None:
    audio, _ = make_speech(FILE_SCRIPT, 44100, lead_s=0.3, gap_s=1.0, tail_s=0.8)
    stereo = np.stack([audio, audio * 0.8], axis=1)
    path = write_wav(tmp_path / "speech.wav", stereo, 44100)
    server.wait_idle()
    open_page(page, server.url)
    page.get_by_label("Or stream an audio file").set_input_files(str(path))
    wait_state(page, "streaming")
    wait_finals(page, len(FILE_SCRIPT))
    wait_state(page, "idle")
    assert finals(page) == texts(FILE_SCRIPT)
    assert "Done" in page.locator("#state").inner_text()
    assert [e["kind"] for e in page_log(page) if e["kind"] == "close"] == ["close"]
    server.wait_idle()


def test_a_denied_microphone_is_explained(page: Any, server: ServerThread) -> None:
    page.add_init_script(
        "navigator.mediaDevices.getUserMedia = () =>"
        " Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
    )
    open_page(page, server.url)
    page.get_by_role("button", name="Start microphone").click()
    text = notice(page)
    assert "Microphone access was denied" in text, text
    assert server.call(lambda: server.engine.active_streams) == 0
