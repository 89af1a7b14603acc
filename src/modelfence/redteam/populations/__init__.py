"""Simulated client populations (the honest side of every measurement)."""
