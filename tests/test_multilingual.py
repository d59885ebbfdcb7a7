"""The multilingual path on real weights: base, with sentences that Debian's
``espeak-ng`` speaks in six European languages (installed by ``.ci/run``).

Language identification is compared with faster-whisper's own offline
``transcribe`` of the same audio (the reference: Earshot must find what a
plain offline decode finds) and with the language the sentence was spoken
in, where the reference finds it. espeak-ng's Dutch voice is detected as
English by base offline too (measured: probability 0.55); Dutch is therefore
held to the reference only.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from aiohttp import ClientSession, FormData

from earshot.clients.stream import transcribe_stream
from earshot.core.decoding import SAMPLE_RATE
from earshot.models.runner import WhisperRunner
from earshot.models.silero import shared_model
from earshot.service.cli import main as cli_main
from earshot.service.config import load_config
from earshot.service.engine.audiofile import load_audio
from earshot.service.engine.engine import Engine
from tests.kit.live import running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(280)]

SENTENCES = {
    "de": "Guten Tag, ich rufe wegen meiner Rechnung an. Die Zahlung ist noch nicht angekommen.",
    "fr": "Bonjour, je vous appelle au sujet de ma commande. Elle n'est pas encore arrivée.",
    "es": "Buenos días, llamo por mi factura. El pago todavía no ha llegado.",
    "it": "Buongiorno, chiamo per la mia bolletta. Il pagamento non è ancora arrivato.",
    "nl": "Goedemorgen, ik bel over mijn rekening. De betaling is nog niet aangekomen.",
    "pl": "Dzień dobry, dzwonię w sprawie mojego rachunku. Płatność jeszcze nie dotarła.",
}
# German, measured: base offline 5 errors in 14 words on this voice (the
# synthetic "Zahlung" is heard as "Zahl und"); Earshot must do no worse.
GERMAN_WER_MAX = 0.40


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after Whisper's basic (language-neutral) normalisation."""
    import jiwer
    from whisper_normalizer.basic import BasicTextNormalizer

    norm = BasicTextNormalizer()
    return float(jiwer.wer(norm(reference), norm(hypothesis) or "-"))


@dataclass(frozen=True)
class Spoken:
    language: str
    text: str
    path: Path


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Spoken]:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng; .ci/run does)")
    folder = tmp_path_factory.mktemp("espeak")
    out = {}
    for lang, text in SENTENCES.items():
        path = folder / f"{lang}.wav"
        subprocess.run(
            [espeak, "-v", lang, "-s", "150", "-w", str(path), text], check=True, timeout=60
        )
        out[lang] = Spoken(lang, text, path)
    return out


@dataclass(frozen=True)
class Reference:
    """faster-whisper's own offline result for one sentence."""

    language: str
    probability: float
    likely: tuple[str, ...]  # its five most probable languages
    text: str


@pytest.fixture(scope="module")
def reference(base_model: Path, spoken: dict[str, Spoken]) -> dict[str, Reference]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(base_model), device="cpu", compute_type="int8")
    out = {}
    for lang, s in spoken.items():
        segments, info = model.transcribe(str(s.path), beam_size=5)
        ranked = sorted(info.all_language_probs or [], key=lambda lp: -lp[1])
        out[lang] = Reference(
            info.language,
            info.language_probability,
            tuple(code for code, _ in ranked[:5]),
            " ".join(seg.text.strip() for seg in segments),
        )
    return out


@pytest.fixture(scope="module")
def runner(base_model: Path) -> WhisperRunner:
    return WhisperRunner(base_model)


@pytest.fixture
def engine(runner: WhisperRunner) -> Engine:
    cfg = load_config(env={}, overrides={"language": "auto"})
    return Engine.create(cfg, runner, vad_model=shared_model())


def expected_language(lang: str, reference: dict[str, Reference]) -> str:
    """The language a correct path reports: the spoken one where the offline
    reference finds it, else what the reference found."""
    return lang if reference[lang].language == lang else reference[lang].language


CONFIDENT = 0.5
"""Below this probability offline, detection is a close call (espeak-ng's
Italian: 0.2, Latin a near second); a path is then held to the offline
reference's five most likely languages, not to its first."""


def check_language(got: str, lang: str, reference: dict[str, Reference]) -> None:
    ref = reference[lang]
    if ref.probability >= CONFIDENT:
        assert got == expected_language(lang, reference), (lang, got, ref)
    else:
        assert got in ref.likely, (lang, got, ref)


def test_reference_finds_most_languages(reference: dict[str, Reference]) -> None:
    # Guards the premise of the tests below: base really identifies these voices.
    found = [lang for lang, ref in reference.items() if ref.language == lang]
    assert set(found) >= {"de", "fr", "es", "it", "pl"}, reference


def test_cli_detects_each_language(
    base_model: Path,
    spoken: dict[str, Spoken],
    reference: dict[str, Reference],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    files = [str(s.path) for s in spoken.values()]
    assert (
        cli_main(
            ["transcribe", *files, "--model", str(base_model), "--format", "json", "--no-progress"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    by_lang = {Path(d["source"]).stem: d for d in lines}
    for lang in SENTENCES:
        check_language(by_lang[lang]["language"], lang, reference)
    german = by_lang["de"]["text"]
    assert wer(SENTENCES["de"], german) <= GERMAN_WER_MAX, german


def test_http_verbose_json_names_the_language(
    engine: Engine, spoken: dict[str, Spoken], reference: dict[str, Reference]
) -> None:
    from earshot.core.languages import language_name

    async def main() -> dict[str, Any]:
        out = {}
        async with running_server(engine) as url, ClientSession() as http:
            for lang in ("de", "fr", "pl"):
                form = FormData()
                form.add_field("file", spoken[lang].path.read_bytes(), filename=f"{lang}.wav")
                form.add_field("model", "whisper-1")
                form.add_field("response_format", "verbose_json")
                async with http.post(f"{url}/v1/audio/transcriptions", data=form) as resp:
                    assert resp.status == 200, await resp.text()
                    out[lang] = await resp.json()
        return out

    results = asyncio.run(asyncio.wait_for(main(), timeout=200))
    for lang, body in results.items():
        assert body["language"] == language_name(expected_language(lang, reference)), body
        assert body["text"].strip()


def test_a_call_that_switches_language_between_utterances(
    engine: Engine, spoken: dict[str, Spoken], reference: dict[str, Reference]
) -> None:
    order = ["de", "fr", "pl"]  # each detected offline with probability 0.8 or more
    pause = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)
    pieces = [pause]
    for lang in order:
        pieces += [load_audio(str(spoken[lang].path)).samples, pause]
    call = np.concatenate(pieces)
    path = spoken["de"].path.parent / "call.wav"
    sf.write(path, call, SAMPLE_RATE, subtype="PCM_16")

    async def main() -> Any:
        async with running_server(engine) as url:
            ws_url = url.replace("http://", "ws://") + "/v1/listen"
            return await transcribe_stream(
                ws_url, str(path), language="auto", realtime=True, interim_results=True
            )

    result = asyncio.run(asyncio.wait_for(main(), timeout=200))
    assert result.close_code == 1000
    finals = [m for m in result.finals[0] if m["channel"]["alternatives"][0]["transcript"]]
    languages = [m["channel"]["detected_language"] for m in finals]
    # Each sentence may be cut into more than one utterance; each is in its language.
    assert [lang for i, lang in enumerate(languages) if i == 0 or languages[i - 1] != lang] == [
        expected_language(lang, reference) for lang in order
    ], [(m["channel"]["detected_language"], m["channel"]["alternatives"][0]) for m in finals]
    for m in finals:
        alt = m["channel"]["alternatives"][0]
        assert alt["languages"] == [m["channel"]["detected_language"]]
    # Once an interim of 1.5 s has detected the utterance's language, the
    # utterance's later interims keep it.
    interims: dict[int, set[str]] = {}
    for m in result.messages:
        if m["type"] == "Results" and not m["is_final"] and m["duration"] >= 1.5:
            interims.setdefault(m["earshot"]["utterance"], set()).add(
                m["channel"]["detected_language"]
            )
    assert interims, "interims were asked for"
    assert all(len(langs) == 1 for langs in interims.values()), interims
    german = " ".join(
        m["channel"]["alternatives"][0]["transcript"]
        for m in finals
        if m["channel"]["detected_language"] == "de"
    )
    assert wer(SENTENCES["de"], german) <= GERMAN_WER_MAX, german
