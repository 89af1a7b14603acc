"""Extraction attacks, each driving the gateway like a real thief would."""
