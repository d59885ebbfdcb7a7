"""RemoteBackend against a fake OpenAI-compatible remote (tests/kit/fake_remote.py)
and against a real Earshot server, in the tone language so the words are exact."""

from __future__ import annotations

import asyncio
import contextvars
import io
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from earshot.core.decoding import SAMPLE_RATE, Backend, DecodeOptions, Window
from earshot.core.errors import (
    ConfigError,
    EarshotError,
    InvalidRequestError,
    RemoteBadResponseError,
    RemoteCircuitOpenError,
    RemoteRejectedError,
    RemoteUnavailableError,
)
from earshot.core.languages import LANGUAGE_NAMES, language_code, language_name
from earshot.core.openai_wire import hypothesis_from_verbose
from earshot.models.remote import (
    RemoteBackend,
    RemoteSettings,
    parse_remote,
    redact_url,
    remote_prompt,
)
from tests.kit.fake_remote import FakeRemote, fake_remote, parse_multipart
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import ToneBackend, make_speech, make_utterance, random_script

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-0123456789abcdef"
OPTS = DecodeOptions()
WORDS = DecodeOptions(word_timestamps=True)

MakeBackend = Callable[..., RemoteBackend]


@pytest.fixture
def fake() -> Iterator[FakeRemote]:
    with fake_remote() as server:
        yield server


@pytest.fixture
def make_backend() -> Iterator[MakeBackend]:
    """Backends with quick settings (every one closed after the test)."""
    made: list[RemoteBackend] = []

    def make(url: str, on_request: Callable[[str, str], None] | None = None, **kw: Any) -> Any:
        settings: dict[str, Any] = {
            "connect_timeout_s": 2.0,
            "timeout_s": 5.0,
            "backoff_s": 0.01,
            "max_backoff_s": 0.05,
        }
        settings.update(kw)
        backend = RemoteBackend(RemoteSettings(url, **settings), on_request=on_request)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def utterance_window(words: list[str], **kw: Any) -> Window:
    lead = np.zeros(int(0.3 * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([lead, make_utterance(words), lead])
    return Window(audio, **kw)


def scripts(n: int, seed: int) -> list[list[str]]:
    return [u for u in random_script(n, (1, 5), seed=seed)]


def transcriptions(fake: FakeRemote) -> int:
    return sum(r.path.endswith("/audio/transcriptions") for r in fake.requests)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- words and fields ---------------------------------------------------------


def test_words_come_back_right(fake: FakeRemote, make_backend: MakeBackend) -> None:
    backend = make_backend(fake.url)
    assert isinstance(backend, Backend)
    script = scripts(5, seed=3)
    hyps = backend.transcribe_batch([utterance_window(u) for u in script], OPTS)
    assert [h.text for h in hyps] == [" ".join(u) for u in script]
    for hyp in hyps:
        assert hyp.tokens == ()
        assert hyp.language == "en"  # the fake answered "english"
        assert hyp.info == {
            "backend": "remote",
            "remote": fake.url,
            "remote_model": "whisper-1",
            "remote_attempts": 1,
        }
        assert hyp.segments and all(s.tokens == () for s in hyp.segments)
        assert math.isclose(hyp.avg_logprob, -0.1) and math.isclose(hyp.no_speech_prob, 0.02)
    assert transcriptions(fake) == len(script)


def test_fields_are_sent_and_word_timings_mapped(
    fake: FakeRemote, make_backend: MakeBackend
) -> None:
    backend = make_backend(fake.url, model="my-model")
    words = ["delta", "echo", "lima"]
    window = utterance_window(words, language="de", prompt="one two three", hotwords="Earshot")
    [hyp] = backend.transcribe_batch([window], DecodeOptions(word_timestamps=True, temperature=0.2))
    req = fake.requests[-1]
    assert req.method == "POST" and req.path == "/v1/audio/transcriptions"
    assert req.headers["content-type"].startswith("multipart/form-data")
    assert req.value("model") == "my-model"
    assert req.value("response_format") == "verbose_json"
    assert req.value("language") == "de"
    assert req.value("prompt") == "Earshot one two three"
    assert req.value("temperature") == "0.2"
    assert req.fields["timestamp_granularities[]"] == ["word", "segment"]
    assert "authorization" not in req.headers  # no key configured
    # The audio: a 16-bit PCM WAV at 16 kHz, the window's samples.
    audio, rate = sf.read(io.BytesIO(req.files["file"]), dtype="float32")
    info = sf.info(io.BytesIO(req.files["file"]))
    assert (rate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert np.max(np.abs(audio - window.audio)) <= 1.0 / 32768 + 1e-6

    assert hyp.text == "delta echo lima"
    assert hyp.language == "de"  # "german" mapped back
    assert hyp.info["remote_model"] == "my-model"
    assert [w.word for w in hyp.words] == words
    truth = ToneBackend().read_words(window.audio)
    for got, want in zip(hyp.words, truth, strict=True):
        assert abs(got.start - want.start) < 0.002 and abs(got.end - want.end) < 0.002
        assert got.probability == pytest.approx(math.exp(-0.1))
    assert [w.word for w in hyp.segments[0].words] == words


def test_without_word_timestamps_no_granularities_and_no_prompt(
    fake: FakeRemote, make_backend: MakeBackend
) -> None:
    backend = make_backend(fake.url)
    [hyp] = backend.transcribe_batch([utterance_window(["golf"])], OPTS)
    req = fake.requests[-1]
    assert "timestamp_granularities[]" not in req.fields
    assert req.value("prompt") is None and req.value("language") is None
    assert hyp.text == "golf" and hyp.words == ()


def test_translate_goes_to_translations(fake: FakeRemote, make_backend: MakeBackend) -> None:
    backend = make_backend(fake.url)
    window = utterance_window(["kilo"], language="fr")
    [hyp] = backend.transcribe_batch([window], DecodeOptions(task="translate"))
    req = fake.requests[-1]
    assert req.path == "/v1/audio/translations"
    assert req.value("language") is None
    assert hyp.text == "kilo"


def test_prompt_is_cut_to_its_last_words() -> None:
    window = Window(np.zeros(10, np.float32), prompt="a b c d e", hotwords="X Y")
    assert remote_prompt(window, DecodeOptions(max_prompt_tokens=2)) == "X Y d e"
    assert remote_prompt(window, DecodeOptions(max_prompt_tokens=0)) == "X Y"
    assert remote_prompt(Window(np.zeros(10, np.float32)), OPTS) is None


def test_language_names_and_codes() -> None:
    assert language_code("english") == "en"
    assert language_code("German") == "de"
    assert language_code("cantonese") == "yue"
    assert language_code("javanese") == "jw"
    assert language_code("castilian") == "es"
    assert language_code("en") == "en"
    assert language_code("pt-BR") == "pt"
    assert language_code("klingon") is None
    assert language_code("") is None and language_code(None) is None
    assert language_name("de") == "german" and language_name("xx") == "xx"


def test_every_whisper_language_has_a_name() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(_LANGUAGE_CODES) == set(LANGUAGE_NAMES)
    for code, name in LANGUAGE_NAMES.items():
        assert language_code(name) == code


def test_verbose_json_variants() -> None:
    window = Window(np.zeros(SAMPLE_RATE * 2, np.float32), language="nl")
    info = {"backend": "remote"}
    # Words inside segments (some servers), probabilities given, times clipped.
    body = {
        "text": " hallo wereld ",
        "language": "dutch",
        "segments": [
            {
                "start": -0.5,
                "end": 9.0,
                "text": " hallo wereld",
                "tokens": [1, 2, 3],
                "avg_logprob": -0.3,
                "no_speech_prob": 0.1,
                "words": [
                    {"word": "hallo", "start": 0.1, "end": 0.5, "probability": 0.7},
                    {"word": "wereld", "start": 0.6, "end": 5.0, "probability": 0.8},
                ],
            },
            {"start": 1.5, "end": 1.9, "text": "x", "tokens": [4], "avg_logprob": -0.7},
        ],
    }
    hyp = hypothesis_from_verbose(body, window, info)
    assert hyp.text == "hallo wereld" and hyp.language == "nl"
    assert (hyp.segments[0].start, hyp.segments[0].end) == (0.0, 2.0)
    assert [(w.word, w.end, w.probability) for w in hyp.words] == [
        ("hallo", 0.5, 0.7),
        ("wereld", 2.0, 0.8),
    ]
    assert hyp.avg_logprob == pytest.approx((-0.3 * 3 - 0.7) / 4)
    assert hyp.no_speech_prob == pytest.approx(0.1)
    assert hyp.info == info and hyp.info is not info
    # Only text: one segment over the window, neutral scores, the window's language.
    hyp = hypothesis_from_verbose({"text": "hoi", "language": "klingon"}, window, info)
    assert [(s.start, s.end, s.text) for s in hyp.segments] == [(0.0, 2.0, "hoi")]
    assert (hyp.avg_logprob, hyp.no_speech_prob, hyp.language) == (0.0, 0.0, "nl")
    # Nothing said.
    hyp = hypothesis_from_verbose({"text": "", "segments": []}, window, info)
    assert hyp.text == "" and hyp.segments == () and hyp.words == ()
    bad: dict[str, Any]
    for bad in ({"segments": []}, {"text": "a", "segments": [{"start": "x"}]}):
        with pytest.raises((TypeError, ValueError)):
            hypothesis_from_verbose(bad, window, info)


def test_a_body_that_is_not_json_is_a_bad_response(make_backend: MakeBackend) -> None:
    with fake_remote(mode="garbage") as fake:
        backend = make_backend(fake.url)
        with pytest.raises(RemoteBadResponseError, match=r"not a JSON object"):
            backend.transcribe_batch([utterance_window(["mike"])], OPTS)
        assert transcriptions(fake) == 1  # not retried


# --- the key ------------------------------------------------------------------


def test_key_is_sent_as_bearer_and_never_shown(make_backend: MakeBackend) -> None:
    with fake_remote(require_key=KEY) as fake:
        backend = make_backend(fake.url, api_key=KEY, breaker_failures=1)
        [hyp] = backend.transcribe_batch([utterance_window(["oscar"])], OPTS)
        assert hyp.text == "oscar"
        assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"
        shown = [repr(backend), repr(backend.settings), backend.name, str(backend.provenance())]
        shown.append(str(hyp))

        # A wrong key: the remote repeats it in its 401, Earshot does not.
        other = "sk-wrong-key-42"
        wrong = make_backend(fake.url, api_key=other, breaker_failures=1)
        with pytest.raises(RemoteRejectedError) as info:
            wrong.transcribe_batch([utterance_window(["oscar"])], OPTS)
        assert info.value.details["status"] == 401
        assert "api_key" in info.value.message
        shown += [str(info.value), str(info.value.to_dict())]
        with pytest.raises(RemoteCircuitOpenError) as opened:  # 401 counts for the breaker
            wrong.transcribe_batch([utterance_window(["oscar"])], OPTS)
        shown += [str(opened.value), str(opened.value.to_dict()), repr(wrong.settings)]
        for text in shown:
            assert KEY not in text and other not in text, text
        assert backend.provenance() == {
            "backend": "remote",
            "name": backend.name,
            "base_url": fake.url,
            "model": "whisper-1",
        }


# --- retries ------------------------------------------------------------------


def test_retries_on_503_then_succeeds(fake: FakeRemote, make_backend: MakeBackend) -> None:
    calls: list[tuple[str, str]] = []
    backend = make_backend(fake.url, max_retries=2, on_request=lambda d, r: calls.append((d, r)))
    fake.fail_next(2, status=503)
    [hyp] = backend.transcribe_batch([utterance_window(["papa", "alpha"])], OPTS)
    assert hyp.text == "papa alpha"
    assert hyp.info["remote_attempts"] == 3
    assert transcriptions(fake) == 3
    port = fake.url.split(":")[2].split("/")[0]
    assert calls == [(f"127.0.0.1:{port}", "transcription")] * 3
    assert backend.requests_sent == 3


def test_gives_up_after_max_retries(fake: FakeRemote, make_backend: MakeBackend) -> None:
    backend = make_backend(fake.url, max_retries=2)
    fake.fail_next(5, status=500)
    with pytest.raises(RemoteUnavailableError) as info:
        backend.transcribe_batch([utterance_window(["bravo"])], OPTS)
    err = info.value
    assert type(err) is RemoteUnavailableError
    assert (err.code, err.http_status, err.ws_close_code) == ("remote_unavailable", 503, 1011)
    assert fake.url in err.message and "3 attempts" in err.message and "HTTP 500" in err.message
    assert err.details["attempts"] == 3 and err.details["status"] == 500
    assert transcriptions(fake) == 3


def test_429_honours_retry_after_up_to_the_cap(fake: FakeRemote, make_backend: MakeBackend) -> None:
    backend = make_backend(fake.url, max_retries=1, backoff_s=0.01, max_backoff_s=0.3)
    fake.fail_next(1, status=429, retry_after=0.25)
    start = time.monotonic()
    [hyp] = backend.transcribe_batch([utterance_window(["hotel"])], OPTS)
    assert hyp.text == "hotel"
    assert 0.24 <= time.monotonic() - start < 2.0
    # A Retry-After far over the cap waits the cap only.
    fake.fail_next(1, status=429, retry_after=3600)
    start = time.monotonic()
    backend.transcribe_batch([utterance_window(["hotel"])], OPTS)
    assert 0.29 <= time.monotonic() - start < 2.0


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_no_retry_on_4xx(fake: FakeRemote, make_backend: MakeBackend, status: int) -> None:
    backend = make_backend(fake.url, max_retries=3)
    fake.fail_next(1, status=status)
    with pytest.raises(RemoteRejectedError) as info:
        backend.transcribe_batch([utterance_window(["india"])], OPTS)
    err = info.value
    assert (err.code, err.http_status) == ("remote_rejected", 502)
    assert f"HTTP {status}" in err.message and fake.url in err.message
    assert "fake failure" in err.message  # the remote's own message is passed on
    assert transcriptions(fake) == 1


def test_timeout_is_unavailable_within_bound(make_backend: MakeBackend) -> None:
    with fake_remote(delay_s=5.0) as fake:
        backend = make_backend(fake.url, timeout_s=0.3, max_retries=1, backoff_s=0.05)
        start = time.monotonic()
        with pytest.raises(RemoteUnavailableError) as info:
            backend.transcribe_batch([utterance_window(["juliett"])], OPTS)
        elapsed = time.monotonic() - start
        assert 0.6 <= elapsed < 2.0
        assert "2 attempts" in info.value.message
        assert "no answer within 0.3 s" in info.value.message
        assert transcriptions(fake) == 2


def test_connection_refused_is_unavailable(make_backend: MakeBackend) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = make_backend(url, max_retries=1)
    start = time.monotonic()
    with pytest.raises(RemoteUnavailableError, match=r"(?i)connection refused") as info:
        backend.transcribe_batch([utterance_window(["lima"])], OPTS)
    assert time.monotonic() - start < 3.0
    assert url in info.value.message


def test_a_failing_audit_hook_sends_nothing(fake: FakeRemote, make_backend: MakeBackend) -> None:
    def refuse(destination: str, reason: str) -> None:
        raise RuntimeError("audit log unavailable")

    backend = make_backend(fake.url, on_request=refuse, breaker_failures=1)
    with pytest.raises(RuntimeError, match="audit log"):
        backend.transcribe_batch([utterance_window(["lima"])], OPTS)
    assert fake.bytes_received == 0 and fake.connections == 0
    assert backend.available()  # not a failure of the remote


SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("session", default="none")


def test_workers_see_the_callers_context(fake: FakeRemote, make_backend: MakeBackend) -> None:
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def audit(destination: str, reason: str) -> None:
        with lock:
            seen.append((SESSION.get(), threading.current_thread().name))

    backend = make_backend(fake.url, on_request=audit, max_concurrency=4)
    token = SESSION.set("session-7")
    try:
        backend.transcribe_batch([utterance_window(["alpha"])] * 6, OPTS)
    finally:
        SESSION.reset(token)
    assert [s for s, _ in seen] == ["session-7"] * 6
    assert all(name.startswith("earshot-remote") for _, name in seen)


def test_invalid_windows_send_nothing(fake: FakeRemote, make_backend: MakeBackend) -> None:
    backend = make_backend(fake.url)
    bad = [
        Window(np.zeros(0, np.float32)),
        Window(np.zeros((2, 100), np.float32)),
        Window(np.zeros(SAMPLE_RATE * 31, np.float32)),
    ]
    for window in bad:
        with pytest.raises(InvalidRequestError):
            backend.transcribe_batch([utterance_window(["echo"]), window], OPTS)
    with pytest.raises(InvalidRequestError, match="task"):
        backend.transcribe_batch([utterance_window(["echo"])], DecodeOptions(task="dance"))
    assert backend.transcribe_batch([], OPTS) == []
    assert fake.bytes_received == 0


# --- the circuit breaker ------------------------------------------------------


def test_breaker_opens_and_then_sends_nothing(fake: FakeRemote, make_backend: MakeBackend) -> None:
    calls: list[str] = []
    backend = make_backend(
        fake.url,
        max_retries=0,
        breaker_failures=3,
        breaker_reset_s=30.0,
        on_request=lambda d, r: calls.append(d),
    )
    fake.fail_next(3, status=502)
    for i in range(3):
        assert backend.available() and backend.circuit_state == "closed"
        with pytest.raises(RemoteUnavailableError) as info:
            backend.transcribe_batch([utterance_window(["foxtrot"])], OPTS)
        assert type(info.value) is RemoteUnavailableError, i
    assert not backend.available()
    assert backend.circuit_state == "open"
    before = (fake.bytes_received, fake.connections, len(fake.requests), len(calls))
    assert before[0] > 0
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(RemoteCircuitOpenError) as info:
            backend.transcribe_batch([utterance_window(["foxtrot"])] * 4, OPTS)
        assert time.monotonic() - start < 0.05
    err = info.value
    assert isinstance(err, RemoteUnavailableError)
    assert (err.code, err.http_status) == ("remote_circuit_open", 503)
    assert fake.url in err.message and "3 consecutive failed windows" in err.message
    assert 0 < err.details["retry_in_s"] <= 30.0
    time.sleep(0.05)  # anything in flight would have arrived by now
    assert (fake.bytes_received, fake.connections, len(fake.requests), len(calls)) == before


def test_breaker_half_open_trial_closes_it(fake: FakeRemote, make_backend: MakeBackend) -> None:
    backend = make_backend(fake.url, max_retries=0, breaker_failures=2, breaker_reset_s=0.3)
    fake.fail_next(2, status=503)
    for _ in range(2):
        with pytest.raises(RemoteUnavailableError):
            backend.transcribe_batch([utterance_window(["charlie"])], OPTS)
    assert not backend.available()
    time.sleep(0.35)
    assert backend.available() and backend.circuit_state == "half_open"
    script = scripts(4, seed=8)
    hyps = backend.transcribe_batch([utterance_window(u) for u in script], OPTS)
    assert [h.text for h in hyps] == [" ".join(u) for u in script]
    assert backend.circuit_state == "closed" and backend.available()


def test_breaker_failed_trial_reopens_with_one_request(
    fake: FakeRemote, make_backend: MakeBackend
) -> None:
    backend = make_backend(fake.url, max_retries=2, breaker_failures=1, breaker_reset_s=0.3)
    fake.fail_next(3, status=503)
    with pytest.raises(RemoteUnavailableError):
        backend.transcribe_batch([utterance_window(["kilo"])], OPTS)
    assert not backend.available()
    time.sleep(0.35)
    fake.fail_next(3, status=503)
    sent = len(fake.requests)
    with pytest.raises(RemoteUnavailableError) as info:
        backend.transcribe_batch([utterance_window(["kilo"])] * 4, OPTS)
    assert type(info.value) is RemoteUnavailableError
    # Only the trial window was sent (with its retries); the circuit is open again.
    assert len(fake.requests) - sent == 3
    assert not backend.available() and backend.circuit_state == "open"


def test_a_400_does_not_count_towards_the_breaker(
    fake: FakeRemote, make_backend: MakeBackend
) -> None:
    backend = make_backend(fake.url, breaker_failures=2)
    fake.fail_next(4, status=400)
    for _ in range(4):
        with pytest.raises(RemoteRejectedError):
            backend.transcribe_batch([utterance_window(["golf"])], OPTS)
    assert backend.available() and backend.circuit_state == "closed"


# --- concurrency --------------------------------------------------------------


def test_a_batch_is_sent_in_parallel_up_to_max_concurrency(make_backend: MakeBackend) -> None:
    with fake_remote(delay_s=0.3) as fake:
        backend = make_backend(fake.url, max_concurrency=4)
        script = scripts(8, seed=21)
        start = time.monotonic()
        hyps = backend.transcribe_batch([utterance_window(u) for u in script], OPTS)
        elapsed = time.monotonic() - start
        assert [h.text for h in hyps] == [" ".join(u) for u in script]  # in order
        assert fake.max_in_flight == 4
        assert 0.55 <= elapsed < 1.5  # two rounds of 0.3 s, not eight


def test_concurrent_batches_share_the_bound(make_backend: MakeBackend) -> None:
    with fake_remote(delay_s=0.2) as fake:
        backend = make_backend(fake.url, max_concurrency=3)
        out: list[list[str]] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                hyps = backend.transcribe_batch([utterance_window(["november"])] * 3, OPTS)
                out.append([h.text for h in hyps])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert not errors and out == [["november"] * 3] * 3
        assert fake.max_in_flight <= 3


def test_a_failed_window_stops_the_rest_of_its_batch(make_backend: MakeBackend) -> None:
    with fake_remote(delay_s=0.2) as fake:
        backend = make_backend(fake.url, max_concurrency=2, max_retries=0)
        fake.fail_next(1, status=400)
        with pytest.raises(RemoteRejectedError):
            backend.transcribe_batch([utterance_window(["echo"])] * 8, OPTS)
        assert transcriptions(fake) < 8


# --- the fake itself ----------------------------------------------------------


def test_the_fake_counts_bytes_that_are_not_http(fake: FakeRemote) -> None:
    with socket.create_connection(("127.0.0.1", int(fake.url.split(":")[2].split("/")[0]))) as s:
        s.sendall(b"\x00\x01garbage")
        deadline = time.monotonic() + 5
        while fake.bytes_received < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert fake.bytes_received == 9 and fake.connections == 1
    assert fake.requests == []


def test_multipart_parser_is_binary_safe() -> None:
    ct = "multipart/form-data; boundary=XyZ"
    payload = b"\r\n--XyZ\r\nbinary\r\n\x00\xff"
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + payload.replace(b"--XyZ", b"--Xy") + b"\r\n--XyZ--\r\n"
    )
    fields, files = parse_multipart(ct, body)
    assert fields == {"model": ["whisper-1"]}
    assert files == {"file": payload.replace(b"--XyZ", b"--Xy")}


# --- settings -----------------------------------------------------------------


def test_settings_defaults_name_and_destination() -> None:
    s = RemoteSettings("http://10.0.0.5:8000/v1/")
    assert s.base_url == "http://10.0.0.5:8000/v1"
    assert (s.model, s.connect_timeout_s, s.timeout_s, s.max_retries) == ("whisper-1", 3, 30, 2)
    assert (s.backoff_s, s.breaker_failures, s.breaker_reset_s, s.max_concurrency) == (
        0.2,
        5,
        30,
        4,
    )
    assert s.destination == "10.0.0.5:8000"
    assert RemoteSettings("https://api.example.com/v1").destination == "api.example.com:443"
    assert RemoteSettings("http://[::1]/v1").destination == "[::1]:80"
    with RemoteBackend(s) as backend:
        assert backend.name == "remote:whisper-1@10.0.0.5:8000"
        assert backend.available()
    assert not backend.available()  # closed
    with pytest.raises(RemoteUnavailableError, match="closed"):
        backend.transcribe_batch([utterance_window(["alpha"])], OPTS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_url": "ftp://host/v1"}, "base_url"),
        ({"base_url": "http:///v1"}, "base_url"),
        ({"base_url": "http://host:99999/v1"}, "base_url"),
        ({"base_url": "http://host/v1?x=1"}, "base_url"),
        ({"base_url": "http://user:secret@host/v1"}, "base_url"),
        ({"api_key": "has space"}, "api_key"),
        ({"model": " "}, "model"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"timeout_s": True}, "timeout_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"backoff_s": -0.1}, "backoff_s"),
        ({"max_backoff_s": 0.1, "backoff_s": 0.2}, "max_backoff_s"),
        ({"breaker_failures": 0}, "breaker_failures"),
        ({"breaker_reset_s": 0}, "breaker_reset_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_settings_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"base_url": "http://host/v1", **kwargs}
    with pytest.raises(ConfigError) as info:
        RemoteSettings(**args)
    assert info.value.details["field"] == field
    assert "secret" not in info.value.message


def test_parse_remote() -> None:
    s = parse_remote(
        "https://sk-in-url@remote.example:8443/v1?model=whisper-large&timeout_s=10",
        {"max_retries": "0", "breaker_reset_s": 5},
    )
    assert s.base_url == "https://remote.example:8443/v1"
    assert s.api_key == "sk-in-url"
    assert (s.model, s.timeout_s, s.max_retries, s.breaker_reset_s) == ("whisper-large", 10, 0, 5)
    assert "sk-in-url" not in repr(s)
    s = parse_remote("http://user:p%40ss@host/v1", {"timeout_s": "2.5"})
    assert (s.api_key, s.timeout_s, s.base_url) == ("p@ss", 2.5, "http://host/v1")
    s = parse_remote("http://host/v1?timeout_s=3", {"timeout_s": 4, "api_key": KEY})
    assert (s.timeout_s, s.api_key) == (4, KEY)
    assert redact_url("http://a:b@host:1/v1") == "http://host:1/v1"
    for url, options, field in [
        ("http://host/v1?api_key=x", None, "api_key"),
        ("http://host/v1?colour=red", None, "colour"),
        ("http://host/v1", {"retries": 1}, "retries"),
        ("http://k@host/v1", {"api_key": "k2"}, "api_key"),
        ("http://host/v1", {"max_retries": "many"}, "max_retries"),
        ("http://host/v1", {"timeout_s": "-1"}, "timeout_s"),
        ("", None, "base_url"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_remote(url, options)
        assert info.value.details["field"] == field, url


# --- a real Earshot server as the remote -------------------------------------


def test_a_real_earshot_server_is_a_remote() -> None:
    script = random_script(3, (2, 4), seed=17)
    audio, _ = make_speech(script)
    expected = " ".join(" ".join(u) for u in script)
    engine = tone_engine(api_keys=KEY)

    async def main() -> tuple[list[Any], EarshotError]:
        async with running_server(engine) as url:
            good = RemoteBackend(RemoteSettings(f"{url}/v1", api_key=KEY, timeout_s=20))
            bad = RemoteBackend(RemoteSettings(f"{url}/v1", api_key="sk-nope", max_retries=0))
            try:
                hyps = await asyncio.to_thread(
                    good.transcribe_batch,
                    [Window(audio, language="en"), Window(audio)],
                    WORDS,
                )
                # A short window: the server refuses before reading the body, and
                # aiohttp then lingers on a large unread body for up to 10 s.
                short = Window(audio[: SAMPLE_RATE // 10])
                try:
                    await asyncio.to_thread(bad.transcribe_batch, [short], OPTS)
                except EarshotError as exc:
                    return hyps, exc
                raise AssertionError("a wrong key was accepted")
            finally:
                good.close()
                bad.close()

    hyps, err = asyncio.run(asyncio.wait_for(main(), timeout=45))
    for hyp in hyps:
        assert hyp.text == expected
        assert [w.word for w in hyp.words] == expected.split()
        assert hyp.language == "en"
        assert hyp.info["remote_model"] == "tone"  # from x-earshot-model
        assert all(0.0 <= s.start < s.end <= len(audio) / SAMPLE_RATE for s in hyp.segments)
        assert [w.word for s in hyp.segments for w in s.words] == expected.split()
        assert hyp.words[0].start >= 0.45  # on the file's clock: 0.5 s of silence first
    assert isinstance(err, RemoteRejectedError) and err.details["status"] == 401
    assert "sk-nope" not in str(err)


def test_close_during_a_batch_fails_it_cleanly(make_backend: MakeBackend) -> None:
    with fake_remote(delay_s=0.3) as fake:
        backend = make_backend(fake.url, max_concurrency=1)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                backend.transcribe_batch([utterance_window(["alpha"])] * 4, OPTS)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 5
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        backend.close()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], RemoteUnavailableError)
        assert "closed" in str(errors[0])
        assert len(fake.requests) < 4
