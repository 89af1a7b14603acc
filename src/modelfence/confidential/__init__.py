"""Confidential execution of the sensitive model parts: sealed tensors (``sealing.py``),
released by a key broker only to an attested, isolated worker."""
