"""Per-client output watermarks: keys, marks (labels, probabilities, embeddings, text), detectors."""
