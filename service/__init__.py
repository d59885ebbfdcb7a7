"""Earshot: self-hosted streaming speech-to-text."""
