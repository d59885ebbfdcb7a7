"""Random-weight Whisper models in CTranslate2 format, for tests and benchmarks.

Trained Whisper weights cannot be had on the development machines, so the tests
build their own models: numpy weights poured into ``ctranslate2.specs.WhisperSpec``,
the real multilingual Whisper tokenizer from the shared test data, and a
``config.json`` like the one the CTranslate2 converter writes. faster-whisper
loads such a folder like any converted model and runs every path on it
(timestamps, word timings, language detection, VAD filter, batched pipeline)
at the real compute cost of the architecture.

Pure random weights decode to the maximum length. These models are shaped so
that decoding ends: for any audio and any prompt, greedy search, beam search
and sampling emit exactly ``tokens`` ordinary text tokens (common English word
pieces such as " river") and then ``<|endoftext|>``.

How the decoder is shaped
-------------------------
The decoder's residual stream is split into three parts:

* *state* dimensions: each token embedding carries a code for a state of a
  small machine. No decoder layer writes to these dimensions (zero rows in
  the output projections of self-attention, cross-attention and the feed
  forward network) and no layer reads them (zero layer norm gains), so after
  the last layer they still hold exactly the code of the *current* token.
  The codes are large and zero-mean, so the final layer norm keeps their
  direction.
* *readout* dimensions, written only by cross-attention: they carry a little
  information about the audio into the logits.
* *content* dimensions: ordinary random transformer state; they shape the
  attention patterns but do not reach the logits (zero final-norm gains).

States: ``0`` for every token that is not one of the chosen words (special
tokens, timestamps, prompt text), ``k`` for a word emitted at position ``k``,
and, for multilingual models, a separate state for ``<|startoftranscript|>``.
The output projection maps state ``k`` to the candidate words of position
``k + 1`` (a primary word and a few alternatives a few logits below it, each
of them leading to state ``k + 1``) and state ``tokens`` to ``<|endoftext|>``.
The readout dimensions shift the candidates' logits a little, so the words
chosen depend a little on the audio, while their number never does. State 0
also slightly prefers ``<|0.00|>`` among the timestamps, so a decode with
timestamps starts at ``<|0.00|>`` and yields one segment per 30 s window; the
state of ``<|startoftranscript|>`` prefers ``<|en|>`` (language detection
answers English) and gives ``<|nocaptions|>`` a low probability.

Limits: the output only depends on the last input token, so a decoding
``prefix`` that ends with one of the chosen words shortens the output; the
model never emits a closing timestamp; the words are meaningless.

Use :func:`cached_model` in tests (it builds once per argument set and reuses
the folder), :func:`build_whisper_model` to build into a folder of your own, and
``python -m tests.kit.whisper_builder OUT_DIR --size tiny --tokens 12`` from the
repository root by hand or in benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.kit.paths import REPO_ROOT, tokenizer_dir

__all__ = [
    "BUILDER_VERSION",
    "MANIFEST_NAME",
    "MAX_TOKENS",
    "SIZES",
    "WhisperDims",
    "build_whisper_model",
    "cached_model",
    "model_cache_dir",
    "read_manifest",
]

#: Bumped whenever the weights a given argument set produces change; part of
#: the cache key, so stale cached models are never reused.
BUILDER_VERSION = 1

#: File written into every built folder, describing how it was built and which
#: token ids the model emits (see :func:`read_manifest`).
MANIFEST_NAME = "earshot_test_model.json"

#: Whisper has 448 text positions. CTranslate2 generates at most 224 tokens
#: (``max_length // 2``) and no more than the positions the prompt leaves;
#: faster-whisper's prompts take at most 228 positions, which leaves 221 for a
#: leading timestamp, the text tokens and the end: 200 always fit.
MAX_TOKENS = 200

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class WhisperDims:
    """Architecture of a Whisper model (the fields of OpenAI's ``ModelDimensions``)."""

    n_mels: int
    d_model: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    audio_ctx: int = 1500
    text_ctx: int = 448

    @property
    def ffn(self) -> int:
        return 4 * self.d_model


#: "micro" is for unit tests (fast to build, load and run); the others are the
#: real OpenAI architectures, for benchmarks at the real compute cost.
SIZES: dict[str, WhisperDims] = {
    "micro": WhisperDims(n_mels=80, d_model=64, heads=4, encoder_layers=2, decoder_layers=2),
    "tiny": WhisperDims(n_mels=80, d_model=384, heads=6, encoder_layers=4, decoder_layers=4),
    "base": WhisperDims(n_mels=80, d_model=512, heads=8, encoder_layers=6, decoder_layers=6),
    "small": WhisperDims(n_mels=80, d_model=768, heads=12, encoder_layers=12, decoder_layers=12),
}

# Shape of the decoder (see the module docstring). Logits are in natural units.
_STATE_DIMS = 24  # room for C(24, 2) = 276 states, enough for MAX_TOKENS + 2
_READOUT_DIMS = 8
_STATE_TO_CONTENT = 8.0  # state part's std per dimension against the content's (about 1)
_TARGET_LOGIT = 50.0  # logit of the primary next token; others sit near 0
_CANDIDATES = 6  # words per position: at least the usual beam size, so beams stay on the path
_ALTERNATIVE_GAP = 7.0  # the alternatives' logits below the primary word
# Weight of the readout in the alternatives' logits. Measured over the test
# recordings: the audio moves an alternative's logit by about 1 (std), and 2 to
# 6 % of the words emitted are alternatives rather than the primary words.
_READOUT_SCALE = 6.0
_TIMESTAMP_LOGIT = 25.0  # <|0.00|> in state 0: below the first word, far above other timestamps
_NO_SPEECH_GAP = 10.0  # <|nocaptions|> below <|en|> at <|startoftranscript|>
_CROSS_ATTENTION_SHARPNESS = 1.7  # scales queries and keys so cross-attention picks frames
_CONV_GAIN = (4.0, 1.5)  # so the audio, not the positions, dominates the encoder output

# Words the model says: common English words that are single tokens with a
# leading space ("Ġ" in byte-level BPE) go first; when more are needed, other
# lower-case word pieces from the frequent part of the vocabulary follow.
_COMMON_WORDS_TEXT = """
time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power
hour game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party
result change morning reason research girl guy moment air teacher force education foot boy
age policy music market sense nation plan college interest death experience effect class
control care field development role effort rate heart drug show leader light voice wife
police mind price report decision son view relationship town road arm difference value
building action model season society tax director position player record paper space
ground form event official matter center couple site project activity star table need
court oil situation cost industry figure street image phone data picture practice piece
land product doctor wall patient worker news test movie north love support technology step
baby computer type attention film tree source organization hair window evidence population
truth song garden river chair bread apple stone glass letter bridge island forest summer
winter spring autumn ocean mountain valley village castle flower bird horse dog cat fish
cloud rain snow wind fire earth metal silver gold iron wood sugar salt milk coffee tea
dinner lunch breakfast kitchen bottle pocket ticket train plane ship boat engine wheel
machine camera clock radio pencil museum library hospital church farm hill lake beach
desert sky moon sun planet color green blue yellow black white brown orange purple bright
quiet happy simple strong early late small large little great young old good new long
short high low open close quick slow warm cold soft hard clean dark heavy easy ready sure
true free full rich poor deep wide near far always never often today tomorrow together
again already almost around before after behind between inside outside under above across
along during maybe perhaps really still soon walk run read write speak listen learn teach
build carry bring think know believe remember forget start finish keep hold stand sit
sleep travel visit watch follow leave arrive return answer explain
"""
_COMMON_WORDS = tuple(_COMMON_WORDS_TEXT.split())
_WORD_PATTERN = re.compile(r"Ġ[a-z]{4,9}")
_WORD_ID_RANGE = (256, 20000)

_ENGLISH_ONLY_GAP_ID = 50256  # "" in the multilingual vocabulary; absent from English-only


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Vocabulary:
    tokenizer_json: str | None  # tokenizer.json to write; None: copy the source's
    tokens: list[str]  # CTranslate2 vocabulary, indexed by id, timestamps included
    ids: dict[str, int]
    suppress_ids: list[int]
    suppress_ids_begin: list[int]
    lang_ids: list[int]

    @property
    def eot(self) -> int:
        return self.ids["<|endoftext|>"]

    @property
    def timestamp_begin(self) -> int:
        return self.ids["<|notimestamps|>"] + 1


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load_vocabulary(source: Path, multilingual: bool) -> _Vocabulary:
    tokenizer = _read_json(source / "tokenizer.json")
    generation = _read_json(source / "generation_config.json")
    suppress = [int(i) for i in generation["suppress_tokens"]]
    begin = [int(i) for i in generation["begin_suppress_tokens"]]
    langs = sorted(int(i) for i in generation["lang_to_id"].values())

    if not multilingual:
        tokenizer = _english_only_tokenizer(tokenizer)

        def shift(ids: list[int]) -> list[int]:
            return [i - 1 if i > _ENGLISH_ONLY_GAP_ID else i for i in ids]

        suppress, begin, langs = shift(suppress), shift(begin), shift(langs)

    by_id: dict[int, str] = {int(i): str(t) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer["added_tokens"]:
        by_id[int(added["id"])] = str(added["content"])
    ids = {token: i for i, token in by_id.items()}
    for name in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|nocaptions|>"):
        _require(name in ids, f"tokenizer.json in {source} has no {name} token")

    # The timestamp tokens <|0.00|> ... <|30.00|> follow <|notimestamps|>, as the
    # CTranslate2 converter lays them out; fill in any the tokenizer lacks.
    timestamp_begin = ids["<|notimestamps|>"] + 1
    size = timestamp_begin + 1501
    tokens: list[str] = []
    for i in range(size):
        if i >= timestamp_begin:
            expected = "<|%.2f|>" % ((i - timestamp_begin) * 0.02)
            _require(
                by_id.get(i, expected) == expected,
                f"token {i} of {source}/tokenizer.json is {by_id[i]!r}, expected {expected!r}",
            )
            tokens.append(expected)
        else:
            _require(i in by_id, f"tokenizer.json in {source} has no token with id {i}")
            tokens.append(by_id[i])
    return _Vocabulary(
        tokenizer_json=None
        if multilingual
        else json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n",
        tokens=tokens,
        ids={t: i for i, t in enumerate(tokens)},
        suppress_ids=suppress,
        suppress_ids_begin=begin,
        lang_ids=langs,
    )


def _english_only_tokenizer(tokenizer: dict[str, Any]) -> dict[str, Any]:
    """The multilingual tokenizer laid out like an English-only one: the empty
    token at 50256 is dropped and the special tokens move down by one
    (``<|endoftext|>`` = 50256, 51864 tokens in all). The word pieces stay the
    multilingual ones, which a random model does not mind."""
    tokenizer = json.loads(json.dumps(tokenizer))
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    gap = [t for t, i in vocab.items() if i == _ENGLISH_ONLY_GAP_ID]
    _require(gap == [""], f"unexpected token at id {_ENGLISH_ONLY_GAP_ID}: {gap!r}")
    del vocab[""]
    for token, i in list(vocab.items()):
        if i > _ENGLISH_ONLY_GAP_ID:
            vocab[token] = i - 1
    for added in tokenizer["added_tokens"]:
        if added["id"] > _ENGLISH_ONLY_GAP_ID:
            added["id"] -= 1
    post = tokenizer.get("post_processor") or {}
    for special in post.get("special_tokens", {}).values():
        special["ids"] = [i - 1 if i > _ENGLISH_ONLY_GAP_ID else i for i in special["ids"]]
    return tokenizer


# --------------------------------------------------------------------------- decoding plan


@dataclass(frozen=True)
class _Plan:
    """Which token follows which state. ``chain[k]`` are the candidate ids for
    text position ``k + 1``; the first one is the primary word."""

    chain: list[list[int]]
    sot_state: bool  # whether <|startoftranscript|> has a state of its own

    @property
    def states(self) -> int:
        return len(self.chain) + 1 + int(self.sot_state)

    @property
    def sot(self) -> int:
        return len(self.chain) + 1


def _choose_words(vocab: _Vocabulary, tokens: int, rng: np.random.Generator) -> list[list[int]]:
    suppressed = set(vocab.suppress_ids)
    common = [vocab.ids.get("Ġ" + word, -1) for word in _COMMON_WORDS]
    common = [i for i in common if 0 <= i < vocab.eot and i not in suppressed]
    low, high = _WORD_ID_RANGE
    taken = set(common)
    extra = [
        i
        for i in range(low, min(high, vocab.eot))
        if _WORD_PATTERN.fullmatch(vocab.tokens[i]) and i not in suppressed and i not in taken
    ]
    pool = [common[i] for i in rng.permutation(len(common))]
    pool += [extra[i] for i in rng.permutation(len(extra))]
    needed = tokens * _CANDIDATES
    _require(len(pool) >= needed, f"only {len(pool)} word tokens to choose from, need {needed}")
    # Primary words first, so they come from the common words.
    primaries, alternatives = pool[:tokens], pool[tokens:needed]
    step = _CANDIDATES - 1
    return [[primaries[k], *alternatives[k * step : (k + 1) * step]] for k in range(tokens)]


def _state_codes(states: int) -> Array:
    """One unit vector per state in the state dimensions, mean removed so the
    final layer norm's centring leaves it alone. One-hot while the states fit
    (codes nearly orthogonal), else two dimensions set per state (two codes
    then share at most one dimension: cosine at most 0.47)."""
    weight = 1 if states <= _STATE_DIMS else 2
    patterns = itertools.islice(itertools.combinations(range(_STATE_DIMS), weight), states)
    codes = np.zeros((states, _STATE_DIMS), dtype=np.float32)
    count = 0
    for state, dims in enumerate(patterns):
        codes[state, list(dims)] = 1.0
        count += 1
    _require(count == states, f"{states} states do not fit in {_STATE_DIMS} dimensions")
    codes -= codes.mean(axis=1, keepdims=True)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    return codes


# --------------------------------------------------------------------------- weights


class _Weights:
    """Draws random weights from one generator, in a fixed order."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def normal(self, shape: tuple[int, ...], std: float) -> Array:
        values: Array = self.rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return values

    def linear(self, out_dim: int, in_dim: int, gain: float = 1.0) -> Array:
        return self.normal((out_dim, in_dim), gain / math.sqrt(in_dim))


def _sinusoids(length: int, channels: int) -> Array:
    """Whisper's fixed positional encoding of the encoder."""
    increment = math.log(10000) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    scaled = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    encodings: Array = np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)
    return encodings


def _fill_layer_norm(spec: Any, gamma: Array, beta: Array) -> None:
    spec.gamma = gamma
    spec.beta = beta


def _fill_encoder(spec: Any, dims: WhisperDims, w: _Weights) -> None:
    d = dims.d_model
    ones = np.ones(d, dtype=np.float32)
    spec.conv1.weight = w.normal((d, dims.n_mels, 3), _CONV_GAIN[0] / math.sqrt(3 * dims.n_mels))
    spec.conv1.bias = w.normal((d,), 0.02)
    spec.conv2.weight = w.normal((d, d, 3), _CONV_GAIN[1] / math.sqrt(3 * d))
    spec.conv2.bias = w.normal((d,), 0.02)
    spec.position_encodings.encodings = _sinusoids(dims.audio_ctx, d)
    for layer in spec.layer:
        attention = layer.self_attention
        _fill_layer_norm(attention.layer_norm, ones, np.zeros(d, dtype=np.float32))
        attention.linear[0].weight = w.linear(3 * d, d)
        qkv_bias = w.normal((3 * d,), 0.02)
        qkv_bias[d : 2 * d] = 0.0  # Whisper's key projections have no bias
        attention.linear[0].bias = qkv_bias
        attention.linear[1].weight = w.linear(d, d, gain=0.5)
        attention.linear[1].bias = w.normal((d,), 0.02)
        ffn = layer.ffn
        _fill_layer_norm(ffn.layer_norm, ones, np.zeros(d, dtype=np.float32))
        ffn.linear_0.weight = w.linear(dims.ffn, d)
        ffn.linear_0.bias = w.normal((dims.ffn,), 0.02)
        ffn.linear_1.weight = w.linear(d, dims.ffn, gain=0.5)
        ffn.linear_1.bias = w.normal((d,), 0.02)
    _fill_layer_norm(spec.layer_norm, ones, np.zeros(d, dtype=np.float32))


def _fill_decoder(
    spec: Any, dims: WhisperDims, vocab: _Vocabulary, plan: _Plan, w: _Weights
) -> None:
    d = dims.d_model
    n_vocab = len(vocab.tokens)
    content = d - _STATE_DIMS - _READOUT_DIMS
    _require(content >= 16, f"d_model {d} is too small for the decoder layout")
    readout = slice(content, content + _READOUT_DIMS)
    state = slice(content + _READOUT_DIMS, d)

    codes = _state_codes(plan.states)
    amplitude = _STATE_TO_CONTENT * math.sqrt(d)  # the code's norm in the residual stream
    norm_scale = amplitude / math.sqrt(d)  # about the std the layer norms divide by

    # Token embeddings: random content, no readout, the code of the token's state.
    token_state = np.zeros(n_vocab, dtype=np.int64)
    for position, candidates in enumerate(plan.chain, start=1):
        token_state[candidates] = position
    if plan.sot_state:
        token_state[vocab.ids["<|startoftranscript|>"]] = plan.sot
    embeddings = np.zeros((n_vocab, d), dtype=np.float32)
    embeddings[:, :content] = w.normal((n_vocab, content), 1.0)
    embeddings[:, state] = amplitude * codes[token_state]
    spec.embeddings.weight = embeddings

    positions = np.zeros((dims.text_ctx, d), dtype=np.float32)
    positions[:, :content] = w.normal((dims.text_ctx, content), 0.5)
    spec.position_encodings.encodings = positions

    # Layer norms inside the layers see content and readout, never the state,
    # and undo the division by the state-dominated std.
    layer_gamma = np.full(d, norm_scale, dtype=np.float32)
    layer_gamma[state] = 0.0
    zeros = np.zeros(d, dtype=np.float32)
    state_dims = np.arange(content + _READOUT_DIMS, d)  # written by no layer
    readout_and_state = np.arange(content, d)  # cross-attention alone writes the readout

    sharp = _CROSS_ATTENTION_SHARPNESS
    last = len(spec.layer) - 1
    for index, layer in enumerate(spec.layer):
        attention = layer.self_attention
        _fill_layer_norm(attention.layer_norm, layer_gamma, zeros)
        attention.linear[0].weight = w.linear(3 * d, d)
        qkv_bias = w.normal((3 * d,), 0.02)
        qkv_bias[d : 2 * d] = 0.0
        attention.linear[0].bias = qkv_bias
        out = w.linear(d, d, gain=0.5)
        out_bias = w.normal((d,), 0.02)
        out[readout_and_state] = 0.0
        out_bias[readout_and_state] = 0.0
        attention.linear[1].weight = out
        attention.linear[1].bias = out_bias

        cross = layer.attention
        _fill_layer_norm(cross.layer_norm, layer_gamma, zeros)
        cross.linear[0].weight = w.linear(d, d, gain=sharp)
        cross.linear[0].bias = w.normal((d,), 0.02)
        kv = w.linear(2 * d, d)
        kv[:d] *= sharp
        cross.linear[1].weight = kv
        kv_bias = w.normal((2 * d,), 0.02)
        kv_bias[:d] = 0.0
        cross.linear[1].bias = kv_bias
        out = w.linear(d, d, gain=0.5)
        out_bias = w.normal((d,), 0.02)
        # Only the last layer's cross-attention writes the readout.
        silent = state_dims if index == last else readout_and_state
        out[silent] = 0.0
        out_bias[silent] = 0.0
        cross.linear[2].weight = out
        cross.linear[2].bias = out_bias

        ffn = layer.ffn
        _fill_layer_norm(ffn.layer_norm, layer_gamma, zeros)
        ffn.linear_0.weight = w.linear(dims.ffn, d)
        ffn.linear_0.bias = w.normal((dims.ffn,), 0.02)
        down = w.linear(d, dims.ffn, gain=0.5)
        down_bias = w.normal((d,), 0.02)
        down[readout_and_state] = 0.0
        down_bias[readout_and_state] = 0.0
        ffn.linear_1.weight = down
        ffn.linear_1.bias = down_bias

    # Final norm: the state code comes out as a unit vector, the readout as it
    # stands in the residual stream, the content not at all.
    final_gamma = np.zeros(d, dtype=np.float32)
    final_gamma[state] = 1.0 / math.sqrt(d)
    final_gamma[readout] = norm_scale
    _fill_layer_norm(spec.layer_norm, final_gamma, zeros)

    # Output projection: every row gets a little audio; the planned rows get
    # the code of the state they follow, scaled to their logit.
    projection = np.zeros((n_vocab, d), dtype=np.float32)
    projection[:, :content] = w.normal((n_vocab, content), 0.02)
    readout_std = _READOUT_SCALE / math.sqrt(_READOUT_DIMS)
    projection[:, readout] = w.normal((n_vocab, _READOUT_DIMS), readout_std / 4)

    def favour(token: int, after_state: int, logit: float) -> None:
        projection[token, state] = logit * codes[after_state]

    for position, candidates in enumerate(plan.chain):
        primary, *alternatives = candidates
        favour(primary, position, _TARGET_LOGIT)
        projection[primary, readout] = 0.0
        for token in alternatives:
            favour(token, position, _TARGET_LOGIT - _ALTERNATIVE_GAP)
        projection[alternatives, readout] = w.normal(
            (len(alternatives), _READOUT_DIMS), readout_std
        )
    favour(vocab.eot, len(plan.chain), _TARGET_LOGIT)
    favour(vocab.timestamp_begin, 0, _TIMESTAMP_LOGIT)
    start = plan.sot if plan.sot_state else 0
    if plan.sot_state:
        favour(vocab.ids["<|en|>"], start, _TARGET_LOGIT)
    favour(vocab.ids["<|nocaptions|>"], start, _TARGET_LOGIT - _NO_SPEECH_GAP)
    spec.projection.weight = projection


# --------------------------------------------------------------------------- build


def build_whisper_model(
    out_dir: Path,
    *,
    size: str = "micro",
    tokens: int = 8,
    seed: int = 0,
    quantization: str = "int8",
    multilingual: bool = True,
) -> Path:
    """Build a random-weight Whisper model in CTranslate2 format into ``out_dir``.

    The folder holds ``model.bin``, ``config.json`` (alignment heads, language
    ids, suppressed tokens), ``vocabulary.json``, ``tokenizer.json``,
    ``preprocessor_config.json`` and :data:`MANIFEST_NAME`; faster-whisper's
    ``WhisperModel(str(out_dir), device="cpu", compute_type="int8")`` loads it.
    Decoding it emits exactly ``tokens`` text tokens and then ends, for any
    audio and prompt (see the module docstring for how, and its limits).

    Args:
      out_dir: folder to create; it must not exist yet or be empty.
      size: a key of :data:`SIZES` ("micro", "tiny", "base", "small").
      tokens: text tokens per decoded window, 1 to :data:`MAX_TOKENS`.
      seed: the same arguments give a byte-identical ``model.bin``.
      quantization: weight type, as for ``ctranslate2.specs.ModelSpec.optimize``
        ("int8", "int8_float32", "int16", "float16", "float32"; "bfloat16"
        needs torch).
      multilingual: ``False`` lays the vocabulary out like an English-only
        model (51864 tokens, no language detection in faster-whisper).

    Returns ``out_dir``. Raises ``ValueError`` for bad arguments,
    ``FileExistsError`` when ``out_dir`` is not empty, ``FileNotFoundError``
    when the tokenizer (``tests.kit.paths.tokenizer_dir()``) is missing.
    Building needs ``ctranslate2`` and takes about a second for "micro" and a
    few seconds for "tiny" and "base".
    """
    from ctranslate2.specs import WhisperSpec
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    _require(size in SIZES, f"unknown size {size!r}; known: {', '.join(SIZES)}")
    _require(1 <= tokens <= MAX_TOKENS, f"tokens must be 1 to {MAX_TOKENS}, got {tokens}")
    _require(seed >= 0, f"seed must not be negative, got {seed}")
    _require(
        quantization in ACCEPTED_MODEL_TYPES,
        f"unknown quantization {quantization!r}; known: {', '.join(ACCEPTED_MODEL_TYPES)}",
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    source = tokenizer_dir()
    for name in ("tokenizer.json", "generation_config.json", "preprocessor_config.json"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name} not found (set EARSHOT_TESTDATA)")

    dims = SIZES[size]
    vocab = _load_vocabulary(source, multilingual)
    plan = _Plan(
        chain=_choose_words(vocab, tokens, np.random.default_rng([seed, 1])),
        sot_state=multilingual,
    )

    spec = WhisperSpec(dims.encoder_layers, dims.heads, dims.decoder_layers, dims.heads)
    weights = _Weights(np.random.default_rng([seed, 2]))
    _fill_encoder(spec.encoder, dims, weights)
    _fill_decoder(spec.decoder, dims, vocab, plan, weights)
    spec.register_vocabulary(vocab.tokens)

    config = spec.config
    config.suppress_ids = vocab.suppress_ids
    config.suppress_ids_begin = vocab.suppress_ids_begin
    config.lang_ids = vocab.lang_ids
    # As the converter does for models without known heads: all heads of the
    # last half of the decoder layers.
    config.alignment_heads = [
        [layer, head]
        for layer in range(dims.decoder_layers // 2, dims.decoder_layers)
        for head in range(dims.heads)
    ]

    spec.validate()
    spec.optimize(quantization=quantization)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(out_dir))

    if vocab.tokenizer_json is None:
        shutil.copyfile(source / "tokenizer.json", out_dir / "tokenizer.json")
    else:
        (out_dir / "tokenizer.json").write_text(vocab.tokenizer_json, encoding="utf-8")
    shutil.copyfile(source / "preprocessor_config.json", out_dir / "preprocessor_config.json")
    manifest = {
        "builder": "tests.kit.whisper_builder",
        "builder_version": BUILDER_VERSION,
        "size": size,
        "dims": {**dataclasses.asdict(dims), "ffn": dims.ffn},
        "tokens": tokens,
        "seed": seed,
        "quantization": quantization,
        "multilingual": multilingual,
        "vocabulary_size": len(vocab.tokens),
        "eot_id": vocab.eot,
        "candidate_ids": plan.chain,
        "primary_text": "".join(vocab.tokens[c[0]] for c in plan.chain).replace("Ġ", " "),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """What :func:`build_whisper_model` recorded about a folder it built:
    ``tokens``, ``candidate_ids`` (per text position, the ids that can appear
    there, primary first), ``primary_text``, ``eot_id``, the build arguments.
    Raises ``FileNotFoundError`` for a folder it did not build."""
    manifest: dict[str, Any] = _read_json(Path(model_dir) / MANIFEST_NAME)
    return manifest


# --------------------------------------------------------------------------- cache


def model_cache_dir() -> Path:
    """Where :func:`cached_model` keeps its models: ``$EARSHOT_TEST_MODEL_CACHE``,
    else ``<repo>/.cache/test-models`` (git-ignored). Created on first use."""
    env = os.environ.get("EARSHOT_TEST_MODEL_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return REPO_ROOT / ".cache" / "test-models"


def _tokenizer_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "generation_config.json", "preprocessor_config.json"):
        path = tokenizer_dir() / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (set EARSHOT_TESTDATA)")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX); elsewhere, no lock: the
    atomic rename in :func:`cached_model` still keeps the cache consistent."""
    with open(lock_path, "a+b") as handle:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def cached_model(
    size: str = "micro",
    tokens: int = 8,
    seed: int = 0,
    quantization: str = "int8",
    *,
    multilingual: bool = True,
) -> Path:
    """The folder of a model built by :func:`build_whisper_model` with these
    arguments, built on first use into :func:`model_cache_dir` and reused after.

    Safe for concurrent processes: one builds under a file lock into a
    temporary folder that is renamed into place when complete, the others wait
    and reuse it. The cache key holds the arguments, :data:`BUILDER_VERSION`
    and a fingerprint of the tokenizer files, so stale models are not reused.
    Callers must not modify the returned folder; copy it first.
    """
    root = model_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    language = "multilingual" if multilingual else "en"
    key = (
        f"whisper-{size}-{tokens}tok-seed{seed}-{quantization}-{language}"
        f"-v{BUILDER_VERSION}-{_tokenizer_fingerprint()}"
    )
    final = root / key
    if (final / MANIFEST_NAME).is_file():
        return final
    with _exclusive(root / f".{key}.lock"):
        if (final / MANIFEST_NAME).is_file():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            build_whisper_model(
                staging,
                size=size,
                tokens=tokens,
                seed=seed,
                quantization=quantization,
                multilingual=multilingual,
            )
            staging.chmod(0o755)  # mkdtemp made it private; the cache is shared
            if final.exists():  # a leftover from an interrupted run, never complete
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kit.whisper_builder",
        description="Build a random-weight Whisper model in CTranslate2 format that "
        "transcribes any audio to a fixed number of text tokens.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to create (must be absent or empty)")
    parser.add_argument("--size", choices=sorted(SIZES), default="micro")
    parser.add_argument("--tokens", type=int, default=8, help="text tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--english-only", action="store_true", help="English-only vocabulary")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = build_whisper_model(
            args.out_dir,
            size=args.size,
            tokens=args.tokens,
            seed=args.seed,
            quantization=args.quantization,
            multilingual=not args.english_only,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    size_mb = (path / "model.bin").stat().st_size / 1e6
    text = read_manifest(path)["primary_text"]
    print(f"built {path} in {elapsed:.2f} s (model.bin {size_mb:.1f} MB); decodes like: {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
