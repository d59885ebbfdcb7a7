"""The pure core of Earshot: bytes, messages and clock values in, events out.

Nothing here does I/O, starts threads or tasks, or loads a model runtime; the
import contract in pyproject.toml keeps it so (docs/architecture.md).
"""

__version__ = "0.1.0"
