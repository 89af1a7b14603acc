"""Forensics: who leaked this text, and was this suspect model trained on a client's answers."""
