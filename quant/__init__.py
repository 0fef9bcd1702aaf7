"""quant: load open_clip CLIP models, quantize them to FP8 with NVIDIA ModelOpt, audit, evaluate,
export and run them. Owns the ``Encoder`` interface every precision implements."""
from quant.config import EncoderSpec, ModelSpec, PRECISIONS
from quant.encoder import Encoder, EncoderIdentity, TorchEncoder, create_encoder
from quant.models import LoadedModel, load_model

__all__ = ["EncoderSpec", "ModelSpec", "PRECISIONS", "Encoder", "EncoderIdentity", "TorchEncoder",
           "create_encoder", "LoadedModel", "load_model"]
