"""Package data shipped in the wheel as ``clipfp8.data``: the embedded default model
(``default_model/``) and the public-domain sample corpus (``samples/``). Read through
``importlib.resources`` (``clipfp8.quant.core.resources``), never through a path of the repository."""
