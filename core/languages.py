"""Whisper's language codes and the English names OpenAI's API uses for them.

OpenAI's ``verbose_json`` names the language in English (``"english"``);
Earshot works with ISO 639-1 codes (Whisper's own: ``"jw"``, ``"haw"``,
``"yue"``). The remote backend reads names back into codes, and the
OpenAI-compatible endpoints write codes as names.
"""

from __future__ import annotations

LANGUAGE_NAMES: dict[str, str] = {
    "af": "afrikaans", "am": "amharic", "ar": "arabic", "as": "assamese",
    "az": "azerbaijani", "ba": "bashkir", "be": "belarusian", "bg": "bulgarian",
    "bn": "bengali", "bo": "tibetan", "br": "breton", "bs": "bosnian",
    "ca": "catalan", "cs": "czech", "cy": "welsh", "da": "danish", "de": "german",
    "el": "greek", "en": "english", "es": "spanish", "et": "estonian",
    "eu": "basque", "fa": "persian", "fi": "finnish", "fo": "faroese",
    "fr": "french", "gl": "galician", "gu": "gujarati", "ha": "hausa",
    "haw": "hawaiian", "he": "hebrew", "hi": "hindi", "hr": "croatian",
    "ht": "haitian creole", "hu": "hungarian", "hy": "armenian",
    "id": "indonesian", "is": "icelandic", "it": "italian", "ja": "japanese",
    "jw": "javanese", "ka": "georgian", "kk": "kazakh", "km": "khmer",
    "kn": "kannada", "ko": "korean", "la": "latin", "lb": "luxembourgish",
    "ln": "lingala", "lo": "lao", "lt": "lithuanian", "lv": "latvian",
    "mg": "malagasy", "mi": "maori", "mk": "macedonian", "ml": "malayalam",
    "mn": "mongolian", "mr": "marathi", "ms": "malay", "mt": "maltese",
    "my": "myanmar", "ne": "nepali", "nl": "dutch", "nn": "nynorsk",
    "no": "norwegian", "oc": "occitan", "pa": "punjabi", "pl": "polish",
    "ps": "pashto", "pt": "portuguese", "ro": "romanian", "ru": "russian",
    "sa": "sanskrit", "sd": "sindhi", "si": "sinhala", "sk": "slovak",
    "sl": "slovenian", "sn": "shona", "so": "somali", "sq": "albanian",
    "sr": "serbian", "su": "sundanese", "sv": "swedish", "sw": "swahili",
    "ta": "tamil", "te": "telugu", "tg": "tajik", "th": "thai", "tk": "turkmen",
    "tl": "tagalog", "tr": "turkish", "tt": "tatar", "uk": "ukrainian",
    "ur": "urdu", "uz": "uzbek", "vi": "vietnamese", "yi": "yiddish",
    "yo": "yoruba", "yue": "cantonese", "zh": "chinese",
}  # fmt: skip
"""Whisper's language codes and the English names OpenAI's API answers with."""

_NAME_ALIASES = {
    "burmese": "my", "castilian": "es", "flemish": "nl", "haitian": "ht",
    "letzeburgesch": "lb", "mandarin": "zh", "moldavian": "ro",
    "moldovan": "ro", "panjabi": "pa", "pushto": "ps", "sinhalese": "si",
    "valencian": "ca", "norwegian nynorsk": "nn", "farsi": "fa",
}  # fmt: skip
_CODES_BY_NAME = {name: code for code, name in LANGUAGE_NAMES.items()} | _NAME_ALIASES


def language_code(value: str | None) -> str | None:
    """The ISO code for a language name (``"english"``) or code (``"en"``,
    ``"en-US"``), or None when it is not one Whisper knows."""
    if not value:
        return None
    text = value.strip().lower().replace("_", "-")
    if text in LANGUAGE_NAMES:
        return text
    if text in _CODES_BY_NAME:
        return _CODES_BY_NAME[text]
    base = text.split("-")[0]
    return base if base in LANGUAGE_NAMES else None


def language_name(code: str) -> str:
    """The English name of ``code`` as OpenAI writes it; an unknown code stays a code."""
    return LANGUAGE_NAMES.get(code, code)
