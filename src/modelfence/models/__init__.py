"""The model files ModelFence itself runs, found and loaded in one place.

Detection embeds queries with MiniLM (:mod:`modelfence.models.embedder`), embedding
watermarks draw trigger words from its vocabulary (``assets/minilm-vocab.txt``), and text
forensics tokenises with the SmolLM2 tokenizer from its GGUF file
(:mod:`modelfence.models.gguf`). The demo upstream serves the same models.
"""
