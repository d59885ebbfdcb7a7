"""The tone language and its backend: exact words through every encoding,
rate and window cut, nothing from silence or noise, and Silero hears it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from earshot.core.decoding import SAMPLE_RATE, Backend, DecodeOptions, Window
from earshot.core.errors import InvalidRequestError
from tests.kit.tones import (
    DEFAULT_WORD_S,
    VOCABULARY,
    Law,
    SpeechTruth,
    ToneBackend,
    g711_decode,
    g711_encode,
    make_speech,
    make_utterance,
    make_word,
    random_script,
    resample,
    telephone_roundtrip,
    word_frequency,
)

OPTIONS = DecodeOptions(word_timestamps=True)


@pytest.fixture(scope="module")
def backend() -> ToneBackend:
    return ToneBackend()


def utterance_windows(
    audio: np.ndarray, truth: SpeechTruth, pad_s: float = 0.3
) -> tuple[list[Window], list[float]]:
    """One window per utterance, ``pad_s`` of context either side, and each window's start."""
    windows, offsets = [], []
    for u in truth.utterances:
        a = max(0, round((u.start - pad_s) * SAMPLE_RATE))
        b = min(len(audio), round((u.end + pad_s) * SAMPLE_RATE))
        windows.append(Window(audio=audio[a:b]))
        offsets.append(a / SAMPLE_RATE)
    return windows, offsets


def read_text(backend: ToneBackend, audio: np.ndarray) -> str:
    return " ".join(w.word for w in backend.read_words(audio))


# -- the language ------------------------------------------------------------


def test_vocabulary_is_sixteen_distinct_pitches_inside_one_octave() -> None:
    assert len(VOCABULARY) >= 16
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    f0 = np.array([word_frequency(w) for w in VOCABULARY])
    ratios = f0[1:] / f0[:-1]
    assert np.all(ratios > 1.04)  # neighbours at least 4 % apart
    assert f0[-1] < 2 * f0[0]  # no word is an octave of another
    with pytest.raises(ValueError, match="unknown tone word 'zulu'"):
        word_frequency("zulu")


def test_words_survive_a_telephone_band_pass(backend: ToneBackend) -> None:
    """Identity lies in the harmonics between 200 and 3400 Hz, not in the
    fundamental, so a 300 to 3400 Hz band-pass keeps every word (Silero,
    however, stops hearing them: see the module docstring)."""
    for word in VOCABULARY:
        x = make_word(word, 16000)
        power = np.abs(np.fft.rfft(x)) ** 2
        assert power[np.fft.rfftfreq(len(x), 1 / 16000) > 3900].sum() / power.sum() < 1e-6
    taps = np.arange(511) - 255
    band_pass = (np.sinc(taps * 3400 / 8000) * 3400 - np.sinc(taps * 300 / 8000) * 300) / 8000
    band_pass *= np.hamming(len(taps))
    audio, truth = make_speech(random_script(6, (1, 8), seed=12))
    filtered = np.convolve(audio, band_pass, mode="same").astype(np.float32)
    assert read_text(backend, filtered) == truth.text


def test_make_speech_places_words_exactly() -> None:
    script = [["alpha", "bravo"], ["papa"]]
    audio, truth = make_speech(
        script, 16000, gap_s=1.0, lead_s=0.5, tail_s=0.25, word_s=0.2, word_gap_s=0.05
    )
    assert audio.dtype == np.float32
    assert truth.texts == ["alpha bravo", "papa"]
    assert truth.text == "alpha bravo papa"
    starts = [w.start for w in truth.words]
    assert starts == pytest.approx([0.5, 0.75, 0.95 + 1.0])
    assert [w.end - w.start for w in truth.words] == pytest.approx([0.2] * 3)
    assert truth.utterances[0].end == pytest.approx(0.95)
    assert truth.duration == pytest.approx(2.15 + 0.25)
    assert len(audio) == round(truth.duration * 16000)
    # Silence outside the words, sound inside.
    assert not np.any(audio[: 8000 - 1]) and not np.any(audio[round(2.15 * 16000) :])
    word = audio[round(0.75 * 16000) : round(0.95 * 16000)]
    assert np.max(np.abs(word)) == pytest.approx(0.25, rel=1e-3)
    assert truth.words_between(0.0, 1.0) == truth.words[:2]


def test_utterance_layout_at_other_rates() -> None:
    for rate in (8000, 22050, 44100, 48000):
        x = make_utterance(["alpha", "kilo", "kilo"], rate, word_s=0.2, word_gap_s=0.05)
        assert len(x) == 3 * round(0.2 * rate) + 2 * round(0.05 * rate)
    assert len(make_utterance([])) == 0


def test_generator_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="utterance 1 is empty"):
        make_speech([["alpha"], []])
    with pytest.raises(ValueError, match="unknown tone word"):
        make_utterance(["alpha", "Alpha"])
    with pytest.raises(ValueError, match="sample_rate"):
        make_word("alpha", 4000)
    with pytest.raises(ValueError, match="gap_s"):
        make_speech([["alpha"]], gap_s=-1)


def test_random_script_is_seeded() -> None:
    a = random_script(20, (2, 5), seed=7)
    assert a == random_script(20, (2, 5), seed=7)
    assert a != random_script(20, (2, 5), seed=8)
    assert len(a) == 20 and all(2 <= len(u) <= 5 for u in a)
    assert {w for u in a for w in u} <= set(VOCABULARY)
    with pytest.raises(ValueError):
        random_script(3, (0, 2))


# -- exact recovery ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_scripts_read_exactly_at_16k(backend: ToneBackend, seed: int) -> None:
    audio, truth = make_speech(random_script(6, (1, 8), seed))
    words = backend.read_words(audio)
    assert [w.word for w in words] == [w.word for w in truth.words]
    for got, want in zip(words, truth.words, strict=True):
        assert got.start == pytest.approx(want.start, abs=0.015)
        assert got.end == pytest.approx(want.end, abs=0.015)
        assert 0.85 < got.probability <= 1.0


def test_batch_of_utterance_windows(backend: ToneBackend) -> None:
    audio, truth = make_speech(random_script(16, (1, 8), seed=11))
    windows, offsets = utterance_windows(audio, truth)
    assert len(windows) == 16
    hypotheses = backend.transcribe_batch(windows, OPTIONS)
    assert [h.text for h in hypotheses] == truth.texts
    for h, u, offset in zip(hypotheses, truth.utterances, offsets, strict=True):
        assert h.language == "en"
        assert h.no_speech_prob < 0.1
        assert h.avg_logprob == pytest.approx(-0.1)
        assert h.tokens == tuple(VOCABULARY.index(w.word) for w in u.words)
        (segment,) = h.segments
        assert segment.text == h.text and segment.words == h.words
        assert segment.start == h.words[0].start and segment.end == h.words[-1].end
        # Times are relative to the window.
        assert h.words[0].start + offset == pytest.approx(u.start, abs=0.015)
        assert h.words[-1].end + offset == pytest.approx(u.end, abs=0.015)
    # A batch gives what one window at a time gives.
    one_by_one = [backend.transcribe_batch([w], OPTIONS)[0] for w in windows]
    assert one_by_one == hypotheses


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
@pytest.mark.parametrize("seed", range(2))
def test_telephone_roundtrip_reads_exactly(backend: ToneBackend, law: Law, seed: int) -> None:
    audio, truth = make_speech(random_script(6, (1, 8), seed + 100))
    assert read_text(backend, telephone_roundtrip(audio, 16000, law)) == truth.text


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_words_made_at_8k_and_sent_as_g711(backend: ToneBackend, law: Law) -> None:
    audio, truth = make_speech(random_script(6, (1, 8), seed=5), 8000)
    wire = g711_encode(audio, law)
    assert len(wire) == len(audio)
    received = resample(g711_decode(wire, law), 8000, 16000)
    assert read_text(backend, received) == truth.text


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
def test_other_rates_resampled_with_soxr(backend: ToneBackend, rate: int) -> None:
    audio, truth = make_speech(random_script(5, (1, 8), seed=rate), rate)
    assert audio.dtype == np.float32
    words = backend.read_words(resample(audio, rate, 16000))
    assert [w.word for w in words] == [w.word for w in truth.words]
    for got, want in zip(words, truth.words, strict=True):
        assert got.start == pytest.approx(want.start, abs=0.015)


@pytest.mark.parametrize("level", [0.01, 0.05, 1.0])
def test_quiet_and_loud_words(backend: ToneBackend, level: float) -> None:
    audio, truth = make_speech(random_script(4, (1, 8), seed=3), level=level)
    assert read_text(backend, audio) == truth.text


def test_words_in_white_noise(backend: ToneBackend) -> None:
    audio, truth = make_speech(random_script(4, (1, 8), seed=4))
    noise = np.random.default_rng(0).standard_normal(len(audio)) * 10 ** (-45 / 20)
    assert read_text(backend, (audio + noise).astype(np.float32)) == truth.text


def test_other_word_durations_and_gaps() -> None:
    script = random_script(4, (1, 8), seed=9)
    for word_s, gap_s in ((0.12, 0.03), (0.16, 0.05), (0.34, 0.1)):
        audio, truth = make_speech(script, word_s=word_s, word_gap_s=gap_s)
        reader = ToneBackend(word_s=word_s)
        assert read_text(reader, audio) == truth.text, (word_s, gap_s)


# -- window edges ----------------------------------------------------------------


def test_a_cut_word_is_reported_by_at_most_one_window(backend: ToneBackend) -> None:
    audio, truth = make_speech([["alpha", "mike", "papa"]], lead_s=0.3, tail_s=0.3)
    mike = truth.words[1]
    for cut in np.arange(mike.start - 0.02, mike.end + 0.02, 0.005):
        n = round(cut * SAMPLE_RATE)
        left, right = read_text(backend, audio[:n]).split(), read_text(backend, audio[n:]).split()
        inside = float(np.clip((cut - mike.start) / DEFAULT_WORD_S, 0.0, 1.0))
        assert left + right in (
            ["alpha", "mike", "papa"],
            ["alpha", "papa"],
        ), f"cut at {inside:.2f} of the word: {left} | {right}"
        if inside >= 0.65:
            assert left == ["alpha", "mike"], inside
        if inside <= 0.35:
            assert right == ["mike", "papa"], inside
        if 0.45 <= inside <= 0.55:
            assert "mike" not in left + right, inside


def test_coverage_estimates_the_part_inside_the_window(backend: ToneBackend) -> None:
    audio, truth = make_speech([["golf"]], lead_s=0.3, tail_s=0.3)
    golf = truth.words[0]
    for fraction in (0.5, 0.6, 0.7, 0.9):
        cut = round((golf.start + fraction * DEFAULT_WORD_S) * SAMPLE_RATE)
        (head,) = backend.detect(audio[:cut])
        assert head.cut_end and not head.cut_start
        assert head.coverage == pytest.approx(fraction, abs=0.03)
        (tail,) = backend.detect(audio[round((golf.end - fraction * DEFAULT_WORD_S) * 16000) :])
        assert tail.cut_start and tail.start == 0.0
        assert tail.coverage == pytest.approx(fraction, abs=0.03)


def test_interim_windows_of_a_growing_utterance(backend: ToneBackend) -> None:
    """Each growing window reads a prefix of the utterance; never a word twice
    or a word that is not there."""
    audio, truth = make_speech([random_script(1, (8, 8), seed=2)[0]], lead_s=0.2, tail_s=0.5)
    words = [w.word for w in truth.words]
    start = round(0.1 * SAMPLE_RATE)
    for end in np.arange(0.3, truth.duration, 0.1):
        text = read_text(backend, audio[start : round(end * SAMPLE_RATE)]).split()
        assert text == words[: len(text)]
        complete = sum(w.end <= end for w in truth.words)
        assert complete <= len(text) <= complete + 1
    assert read_text(backend, audio).split() == words


# -- nothing from nothing ------------------------------------------------------


def test_silence_and_noise_give_no_words(backend: ToneBackend) -> None:
    rng = np.random.default_rng(1)
    n = 10 * SAMPLE_RATE
    silence = np.zeros(n, dtype=np.float32)
    noise_40 = (rng.standard_normal(n) * 10 ** (-40 / 20)).astype(np.float32)
    noise_20 = (rng.standard_normal(n) * 10 ** (-20 / 20)).astype(np.float32)
    # Word-sized noise bursts, and pure tones at a word's pitch and at twice it.
    t = np.arange(round(DEFAULT_WORD_S * SAMPLE_RATE)) / SAMPLE_RATE
    shape = np.hanning(len(t)) ** 0.3
    gap = np.zeros(4000)
    bursts = np.concatenate([np.concatenate([gap, rng.standard_normal(len(t)) * 0.1 * shape])] * 8)
    sines = np.concatenate(
        [
            np.concatenate([gap, 0.3 * np.sin(2 * np.pi * k * word_frequency(w) * t) * shape])
            for w in VOCABULARY[::4]
            for k in (1, 2, 5)
        ]
    )
    windows = [
        Window(audio=a.astype(np.float32)) for a in (silence, noise_40, noise_20, bursts, sines)
    ]
    for h in backend.transcribe_batch(windows, OPTIONS):
        assert h.text == "" and h.words == () and h.segments == () and h.tokens == ()
        assert h.no_speech_prob > 0.9
    assert backend.read_words(np.zeros(100, dtype=np.float32)) == []


# -- the backend's contract ----------------------------------------------------


def test_token_budget_caps_the_words(backend: ToneBackend) -> None:
    audio = make_utterance(["alpha", "bravo", "charlie", "delta", "echo", "golf", "hotel"])
    options = DecodeOptions(min_tokens=2, max_tokens_per_second=1.0)
    window = Window(audio=np.pad(audio, 1600))
    budget = options.token_budget(window.duration)
    assert budget == 5
    (h,) = backend.transcribe_batch([window], options)
    assert h.text == "alpha bravo charlie delta echo"
    assert len(h.tokens) == len(h.words) == budget
    assert h.info["words_over_budget"] == 2


def test_language_is_passed_through(backend: ToneBackend) -> None:
    audio = make_utterance(["india"])
    (h,) = backend.transcribe_batch([Window(audio=audio, language="de")], OPTIONS)
    assert h.language == "de" and h.text == "india"


def test_backend_protocol_and_provenance(backend: ToneBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "tone"
    provenance = backend.provenance()
    assert provenance["name"] == "tone"
    assert provenance["synthetic"] is True
    assert provenance["kind"] == "synthetic-test-backend"
    assert len(provenance["sha256"]) == 64
    assert provenance == ToneBackend().provenance()
    assert provenance != ToneBackend(word_s=0.3).provenance()


def test_bad_windows_are_refused_and_not_counted() -> None:
    reader = ToneBackend()
    too_long = Window(audio=np.zeros(30 * SAMPLE_RATE + 1, dtype=np.float32))
    with pytest.raises(InvalidRequestError, match="limit is 30 s") as caught:
        reader.transcribe_batch([Window(audio=np.zeros(10, dtype=np.float32)), too_long], OPTIONS)
    assert caught.value.details["field"] == "audio"
    stereo = Window(audio=np.zeros((2, 1600), dtype=np.float32))
    with pytest.raises(InvalidRequestError, match="mono"):
        reader.transcribe_batch([stereo], OPTIONS)
    assert reader.calls == 0 and reader.windows_decoded == 0
    exactly_30 = Window(audio=np.zeros(30 * SAMPLE_RATE, dtype=np.float32))
    assert reader.transcribe_batch([exactly_30], OPTIONS)[0].text == ""
    with pytest.raises(ValueError, match="min_coverage"):
        ToneBackend(min_coverage=0.5)


def test_delay_and_counters() -> None:
    slept: list[float] = []
    reader = ToneBackend(delay_s=0.05, delay_per_window_s=0.01, sleep=slept.append)
    window = Window(audio=make_utterance(["lima"]))
    reader.transcribe_batch([window] * 3, OPTIONS)
    reader.transcribe_batch([window], OPTIONS)
    assert slept == pytest.approx([0.08, 0.06])
    assert (reader.calls, reader.windows_decoded, reader.batch_sizes) == (2, 4, [3, 1])
    reader.reset_counters()
    assert (reader.calls, reader.windows_decoded, reader.batch_sizes) == (0, 0, [])


def test_deterministic(backend: ToneBackend) -> None:
    audio, _ = make_speech(random_script(3, (1, 8), seed=1))
    window = Window(audio=audio)
    assert backend.transcribe_batch([window], OPTIONS) == backend.transcribe_batch(
        [window], OPTIONS
    )
    assert np.array_equal(audio, make_speech(random_script(3, (1, 8), seed=1))[0])


# -- G.711 ---------------------------------------------------------------------


@pytest.mark.parametrize(("law", "subtype"), [("mulaw", "ULAW"), ("alaw", "ALAW")])
def test_g711_agrees_with_libsndfile(law: Law, subtype: str) -> None:
    every_code = bytes(range(256))
    ours = np.round(g711_decode(every_code, law) * 32768).astype(np.int16)
    theirs, _ = sf.read(
        io.BytesIO(every_code),
        format="RAW",
        subtype=subtype,
        samplerate=8000,
        channels=1,
        dtype="int16",
    )
    assert np.array_equal(ours, theirs)

    pcm = np.arange(-32768, 32768, dtype=np.int16)
    encoded = np.frombuffer(g711_encode(pcm / 32768.0, law), dtype=np.uint8)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, 8000, format="RAW", subtype=subtype)
    reference = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    # Encoders may round a sample that lies exactly between two codes either way.
    differ = encoded != reference
    assert differ.mean() < 0.005
    step = np.abs(
        g711_decode(encoded[differ].tobytes(), law) - g711_decode(reference[differ].tobytes(), law)
    )
    assert np.all(step <= 1024 / 32768)
    assert g711_encode([0.0], "mulaw") == b"\xff" and g711_encode([0.0], "alaw") == b"\xd5"


# -- Silero hears the words ------------------------------------------------------


@pytest.mark.parametrize("path", ["16k", "mulaw8k"])
def test_silero_hears_utterances(path: str) -> None:
    vad = pytest.importorskip("faster_whisper.vad")
    audio, truth = make_speech(random_script(6, (1, 7), seed=21))
    if path == "mulaw8k":
        audio = telephone_roundtrip(audio, 16000, "mulaw")
    spans = vad.get_speech_timestamps(
        audio, vad.VadOptions(min_silence_duration_ms=500, speech_pad_ms=0)
    )
    assert len(spans) == len(truth.utterances)
    for span, u in zip(spans, truth.utterances, strict=True):
        assert span["start"] / SAMPLE_RATE == pytest.approx(u.start, abs=0.25)
        assert span["end"] / SAMPLE_RATE == pytest.approx(u.end, abs=0.25)

    padded = np.pad(audio, (0, 512 - len(audio) % 512))
    probability = vad.get_vad_model()(padded).reshape(-1)
    frame_start = np.arange(len(probability)) * 512 / SAMPLE_RATE
    in_words = np.zeros(len(probability), dtype=bool)
    for w in truth.words:
        in_words |= (frame_start >= w.start) & (frame_start + 0.032 <= w.end)
    between = np.zeros(len(probability), dtype=bool)
    for before, after in zip(truth.utterances, truth.utterances[1:], strict=False):
        between |= (frame_start >= before.end + 0.3) & (frame_start + 0.032 <= after.start)
    assert probability[in_words].mean() > 0.85
    assert np.percentile(probability[in_words], 10) > 0.6
    assert probability[between].max() < 0.35
