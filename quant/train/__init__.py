"""Training of the embedded default model (``data/default_model``): shard reading and the compact
training pack (``prep``), the architecture and its trainable part (``model``), the GPU training loop
(``train``), a straightforward evaluation (``evaluate``) and installation (``ship``).
See docs/training.md."""
