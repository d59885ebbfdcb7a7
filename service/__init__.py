"""Earshot: self-hosted streaming speech-to-text."""

__version__ = "0.1.0"
