"""The Silero voice activity model that ships in faster-whisper, as a
:class:`~earshot.core.voice.FrameModel` for the endpointer.

One onnxruntime session serves every stream and thread; the per-stream state
lives in the callers (:class:`~earshot.core.voice.StreamingVad`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from earshot.core.voice import FloatArray


class SileroModel:
    """The Silero v6 ONNX model: one onnxruntime session, shared by streams.

    Per-stream state (the LSTM's ``h`` and ``c``) lives in the callers, so one
    instance serves every stream and every thread. Prefer :func:`shared_model`.
    """

    def __init__(self, session: Any) -> None:
        self._session = session

    @classmethod
    def load(cls, path: str | None = None) -> SileroModel:
        """Open the ONNX file at ``path`` (default: the copy inside faster-whisper,
        shared with faster-whisper's own ``vad_filter``).

        Raises ``RuntimeError`` if onnxruntime is not installed and onnxruntime's
        errors if the file is missing or is not a Silero v6 model.
        """
        from faster_whisper.vad import SileroVADModel, get_vad_model

        inner = get_vad_model() if path is None else SileroVADModel(path)
        return cls(inner.session)

    def initial_state(self) -> tuple[FloatArray, FloatArray]:
        """Zero LSTM state for a new stream."""
        return (np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))

    def run(
        self, frames: FloatArray, state: tuple[FloatArray, FloatArray]
    ) -> tuple[FloatArray, tuple[FloatArray, FloatArray]]:
        """Score ``frames`` (see :class:`FrameModel`); returns probabilities and
        the new ``(h, c)``."""
        h, c = state
        probs, h_out, c_out = self._session.run(None, {"input": frames, "h": h, "c": c})
        return (
            np.asarray(probs, dtype=np.float32).reshape(-1),
            (np.asarray(h_out, dtype=np.float32), np.asarray(c_out, dtype=np.float32)),
        )


_shared: SileroModel | None = None


def shared_model() -> SileroModel:
    """The process-wide Silero model, loaded on first use (about 0.1 s).

    Call it once at startup so the load cost and any error (``RuntimeError``
    when onnxruntime is missing) happen there, not on a stream's first frame.
    """
    global _shared
    if _shared is None:
        _shared = SileroModel.load()
    return _shared
