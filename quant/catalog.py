"""What ``--model``/``--pretrained`` accept: open_clip's architectures and pretrained tags, with
their sizes, read from open_clip's bundled configs (nothing is downloaded).

Parameter counts come from building the architecture on PyTorch's ``meta`` device (shapes only,
no memory, ~0.1-0.3 s each on a small CPU); architectures whose text tower is a Hugging Face
model need that model's config from the hub, so theirs stay unknown (None).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipfp8.quant.core.fileio import cache_root

log = logging.getLogger(__name__)

@dataclass
class ArchInfo:
    """One open_clip architecture. ``image_size``: input side in pixels; ``params``: total
    parameter count (None when not computed); ``tags``: pretrained tags, ``cached``: those whose
    weights are already in the local cache (usable offline)."""

    name: str
    embed_dim: int
    image_size: int
    vision: str
    text: str
    params: int | None = None
    tags: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _side(size: Any) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _vision(cfg: dict[str, Any]) -> str:
    if cfg.get("timm_model_name"):
        return f"timm:{cfg['timm_model_name']}"
    if isinstance(cfg.get("layers"), (list, tuple)):
        return f"ResNet {'-'.join(str(n) for n in cfg['layers'])} w{cfg.get('width', 64)}"
    return f"ViT w{cfg.get('width', 768)} L{cfg.get('layers', 12)} /{cfg.get('patch_size', 16)}"


def _text(cfg: dict[str, Any]) -> str:
    if cfg.get("hf_model_name"):
        return f"hf:{cfg['hf_model_name']}"
    return f"w{cfg.get('width', 512)} L{cfg.get('layers', 12)}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """timm/open_clip warn about deprecated options of a few configs while building: not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def count_params(name: str) -> int | None:
    """Parameters of open_clip architecture ``name``, built on the ``meta`` device (no memory,
    no download); None for a Hugging Face text tower (its config lives on the hub) or a failure."""
    import torch

    from clipfp8.quant.core.open_clip_import import import_open_clip

    open_clip = import_open_clip(hf=False)  # builds timm towers too: timm is bound in if it was left out

    cfg = open_clip.get_model_config(name)
    if cfg is None or cfg.get("text_cfg", {}).get("hf_model_name"):
        return None
    kwargs = copy.deepcopy(cfg)
    # open_clip.factory.create_model's choice of class, without its weight loading.
    if kwargs.pop("custom_text", False):
        cls = open_clip.CoCa if "multimodal_cfg" in kwargs else open_clip.CustomTextCLIP
    else:
        cls = open_clip.CLIP
    try:
        with _quiet(), torch.device("meta"):
            model = cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - a listing must not fail on one exotic config
        log.debug("could not build %s on the meta device: %s", name, e)
        return None
    return sum(p.numel() for p in model.parameters())


def _cached_tags(name: str, tags: list[str]) -> list[str]:
    from clipfp8.quant.core.hub import cached_file, pretrained_source

    out = []
    for tag in tags:
        src = pretrained_source(name, tag)
        if src is not None and cached_file(src) is not None:
            out.append(tag)
    return out


def params_cache_file() -> Path:
    return cache_root() / "open_clip_params.json"


def _load_counts(path: Path, version: str) -> dict[str, int | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("open_clip") == version and isinstance(data.get("params"), dict)
    return dict(data["params"]) if ok else {}


def param_counts(names: list[str], cache: Path | None = None) -> dict[str, int | None]:
    """``count_params`` of each name, through the JSON cache (rewritten when anything was added;
    a cache that cannot be written is only logged: the counts are still returned)."""
    import open_clip

    from clipfp8.quant.core.fileio import atomic_write_text

    path = cache or params_cache_file()
    counts = _load_counts(path, open_clip.__version__)
    todo = [n for n in names if n not in counts]
    if len(todo) > 8:
        log.info("counting the parameters of %d architectures (once; cached in %s)", len(todo), path)
    for name in todo:
        counts[name] = count_params(name)
    if todo:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"open_clip": open_clip.__version__, "params": counts}))
        except OSError as e:
            log.debug("could not write %s: %s", path, e)
    return {n: counts[n] for n in names}


def list_architectures(contains: str | None = None, params: bool = True) -> list[ArchInfo]:
    """open_clip architectures whose name (or one of whose pretrained tags) contains ``contains``
    (case-insensitive; all when None), sorted by name. A tag match keeps only the matching tags.
    ``params`` False skips the parameter counts (the slow part)."""
    import open_clip

    needle = (contains or "").lower()
    out = []
    for name in sorted(open_clip.list_models(), key=str.lower):
        tags = list(open_clip.list_pretrained_tags_by_model(name))
        if needle and needle not in name.lower():
            tags = [t for t in tags if needle in t.lower()]
            if not tags:
                continue
        cfg = open_clip.get_model_config(name) or {}
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        out.append(ArchInfo(name=name, embed_dim=int(cfg.get("embed_dim", 0)),
                            image_size=_side(vision.get("image_size", 224)), vision=_vision(vision),
                            text=_text(text), tags=tags, cached=_cached_tags(name, tags)))
    if params:
        counts = param_counts([a.name for a in out])
        for a in out:
            a.params = counts[a.name]
    return out


def format_params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_table(archs: list[ArchInfo]) -> str:
    """A plain-text table, one architecture per line; cached tags carry a ``*``. The params
    column is left out when no count is known (``--no-params``)."""
    width = max([len(a.name) for a in archs] + [12])
    vwidth = max([len(a.vision) for a in archs] + [6])
    show_params = any(a.params is not None for a in archs)
    params_head = f"{'params':>7}  " if show_params else ""
    head = f"{'architecture':<{width}}  {params_head}{'embed':>5}  {'image':>5}  {'vision':<{vwidth}}  pretrained tags"
    lines = [head]
    for a in archs:
        tags = ", ".join(t + ("*" if t in a.cached else "") for t in a.tags) or "- (--checkpoint or --random-init)"
        params = f"{format_params(a.params):>7}  " if show_params else ""
        lines.append(f"{a.name:<{width}}  {params}{a.embed_dim:>5}  {a.image_size:>5}  {a.vision:<{vwidth}}  {tags}")
    return "\n".join(lines)


__all__ = ["ArchInfo", "list_architectures", "count_params", "param_counts", "params_cache_file", "format_table",
           "format_params"]
