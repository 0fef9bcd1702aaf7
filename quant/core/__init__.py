"""The core every layer stands on: specs (``config``), model loading (``models``), the
``Encoder`` interface and its precision registry (``encoder``), errors, file I/O, the caption
reader and bundled resources. It imports nothing from the layers above it."""
