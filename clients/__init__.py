"""Clients of the Earshot service."""
