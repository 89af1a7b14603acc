"""Helpers for testing a ModelFence deployment: a fast, scriptable fake upstream."""
