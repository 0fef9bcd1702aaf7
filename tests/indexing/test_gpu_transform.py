"""The GPU data path's pure parts on the CPU: JPEG header checks and the torch re-implementation
of open_clip's eval transform."""
from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from clipfp8.indexing.decode import open_image
from clipfp8.indexing.gpu_transform import preprocess_groups, preprocess_images, transform_spec
from clipfp8.indexing.jpeg_header import gpu_refusal, parse_jpeg_header
from tests.indexing import badfiles as bf
from tests.indexing.gpujpeg import VARIANTS, bogus_huffman, exif_block, photo_bytes, with_save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's decoders


@pytest.mark.parametrize("i", range(len(VARIANTS)))
def test_header_gives_pillows_size_and_accepts_plain_jpegs(i: int) -> None:
    size, opts, grey = VARIANTS[i]
    data = photo_bytes(size, i, grey, **dict(opts))
    head = parse_jpeg_header(data)
    assert head is not None and (head.width, head.height) == Image.open(io.BytesIO(data)).size == size
    assert head.components == (1 if grey else 3) and head.orientation == 1
    assert head.sof == (0xC2 if opts.get("progressive") else 0xC0)
    assert gpu_refusal(data, 10**8)[0] is None


@pytest.mark.parametrize("make,reason,rotated", [
    (lambda: with_save((40, 20), exif=exif_block(6, big_endian=False)), "orientation", True),
    (lambda: with_save((40, 20), exif=exif_block(8, big_endian=True)), "orientation", True),
    (lambda: with_save((40, 20), exif=exif_block(3, big_endian=True)), "orientation", False),
    (lambda: with_save((40, 20), xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
     "orientation", True),
    (lambda: with_save((40, 20), exif=exif_block(1, big_endian=True)), None, False),
    # EXIF says 1: Pillow ignores the XMP then, and so does the header check
    (lambda: with_save((40, 20), exif=exif_block(1, big_endian=False),
                       xmp=b'<x:xmpmeta tiff:Orientation="6"/>'), None, False),
])
def test_orientation_is_read_like_pillow(make, reason: str | None, rotated: bool) -> None:
    data = make()
    assert gpu_refusal(data, 10**8)[0] == reason
    assert open_image(data, 10**8).size == ((20, 40) if rotated else (40, 20))


def test_refusals(tmp_path) -> None:
    good = photo_bytes((300, 200), 1)
    assert gpu_refusal(good, 300 * 200)[0] is None
    assert gpu_refusal(good, 300 * 200 - 1)[0] == "oversized"  # the bomb guard, from the header
    assert gpu_refusal(photo_bytes((500, 20), 1), 10**8, max_aspect=20.0)[0] == "aspect"
    assert gpu_refusal(photo_bytes((400, 20), 1), 10**8, max_aspect=20.0)[0] is None
    assert gpu_refusal(bf.cmyk_jpeg(tmp_path / "c.jpg").read_bytes(), 10**8)[0] == "colour"
    assert gpu_refusal(good[:len(good) * 2 // 3], 10**8)[0] == "no_eoi"
    assert gpu_refusal(good + b"\x00" * 16, 10**8)[0] is None  # zero padding after EOI is fine
    assert gpu_refusal(good[:100], 10**8)[0] == "bad_header"
    assert gpu_refusal(b"\x89PNG\r\n", 10**8)[0] == "not_jpeg"
    assert gpu_refusal(b"", 10**8)[0] == "not_jpeg"
    assert gpu_refusal(bogus_huffman(good), 10**8)[0] is None  # only the decoder can tell
    padded = good[:2] + b"\xff\xfe\x00\x02" * 3000 + good[2:]  # 3000 empty comments: a slow walk
    assert gpu_refusal(padded, 10**8)[0] == "bad_header" and open_image(padded, 10**8).size == (300, 200)
    once = with_save((40, 20), exif=exif_block(1, big_endian=False))
    app1 = once.index(b"\xff\xe1")
    seg = once[app1:app1 + 2 + int.from_bytes(once[app1 + 2:app1 + 4], "big")]
    twice = once[:app1] + seg + once[app1:]  # Pillow concatenates EXIF segments: refuse, let it judge
    assert parse_jpeg_header(twice).orientation is None and gpu_refusal(twice, 10**8)[0] == "orientation"


def test_transform_spec_reads_open_clip_eval_transforms() -> None:
    spec = transform_spec(open_clip.image_transform(224, is_train=False))
    assert spec is not None and spec.resize == "shortest" and spec.out_size == (224, 224)
    assert spec.interpolation == "bicubic" and spec.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert spec.resized_size(480, 640) == (224, 298) and spec.resized_size(640, 480) == (298, 224)
    spec = transform_spec(open_clip.image_transform((224, 160), is_train=False))
    assert spec is not None and spec.resize == "keep_ratio" and spec.out_size == (224, 160)
    spec = transform_spec(open_clip.image_transform(96, is_train=False, resize_mode="squash",
                                                    interpolation="bilinear"))
    assert spec is not None and (spec.resize, spec.crop, spec.interpolation) == ("exact", None, "bilinear")
    # shapes the torch path does not re-implement: the caller keeps Pillow
    assert transform_spec(open_clip.image_transform(96, is_train=False, resize_mode="longest")) is None
    assert transform_spec(open_clip.image_transform(96, is_train=True)) is None
    normalize = T.Normalize((0.5,) * 3, (0.5,) * 3)
    assert transform_spec(T.Compose([T.Resize(64), T.ToTensor(), normalize])) is None  # no crop
    assert transform_spec(T.Compose([T.Resize(64), T.CenterCrop(64), T.Grayscale(3), T.ToTensor(),
                                     normalize])) is None
    assert transform_spec(T.Compose([T.Resize(64, interpolation=T.InterpolationMode.NEAREST),
                                     T.CenterCrop(64), T.ToTensor(), normalize])) is None
    assert transform_spec(lambda im: im) is None


@pytest.mark.parametrize("transform", [
    open_clip.image_transform(64, is_train=False),
    open_clip.image_transform(224, is_train=False),
    open_clip.image_transform((72, 48), is_train=False),
    open_clip.image_transform(80, is_train=False, resize_mode="squash", interpolation="bilinear"),
    T.Compose([T.Resize(40), T.CenterCrop(56), T.ToTensor(), T.Normalize((0.4,) * 3, (0.3,) * 3)]),  # pads
], ids=["64", "224", "72x48", "squash", "pad"])
def test_torch_preprocessing_matches_the_pil_transform(transform) -> None:
    """Same decoded pixels in, Pillow-path vs torch-path tensors out: within 2 uint8 levels
    everywhere and ~0 on average (Pillow's fixed-point rounding is the only difference)."""
    spec = transform_spec(transform)
    assert spec is not None
    worst, mean = 0.0, []
    datas = [photo_bytes(size, i, grey, **dict(opts)) for i, (size, opts, grey) in enumerate(VARIANTS)]
    images = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
              for d in datas]
    got = preprocess_images(images, spec, pixel_budget=200_000)  # several chunks per size group
    for d, g in zip(datas, got, strict=True):
        ref = transform(open_image(d, 10**8))
        assert g.shape == ref.shape and g.dtype == torch.float32
        levels = (g - ref).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255.0
        worst = max(worst, float(levels.max()))
        mean.append(float(levels.mean()))
    assert worst <= 2.01 and float(np.mean(mean)) < 0.05, (worst, np.mean(mean))


def test_preprocess_rejects_non_uint8_images() -> None:
    spec = transform_spec(open_clip.image_transform(64, is_train=False))
    with pytest.raises(ValueError, match="expected uint8"):
        preprocess_images([torch.zeros(3, 8, 8)], spec)


@pytest.mark.parametrize("transform", [
    open_clip.image_transform(224, is_train=False),
    open_clip.image_transform((72, 48), is_train=False),
    open_clip.image_transform(80, is_train=False, resize_mode="squash", interpolation="bilinear"),
    T.Compose([T.Resize(40), T.CenterCrop(56), T.ToTensor(), T.Normalize((0.4,) * 3, (0.3,) * 3)]),  # pads
], ids=["224", "72x48", "squash", "pad"])
@pytest.mark.parametrize("hw", [(375, 500), (517, 333), (60, 90)], ids=["landscape", "portrait", "upscaled"])
def test_matrix_product_resize_matches_torchs_kernels(transform, hw: tuple[int, int]) -> None:
    """The CUDA path's resize as two matrix products (only the kept pixels computed) gives
    torch's antialiased kernels' pixels: at most a level apart, and that rarely (sum order)."""
    spec = transform_spec(transform)
    assert spec is not None
    gen = torch.Generator().manual_seed(hw[0])
    coarse = torch.randint(0, 256, (9, 3, hw[0] // 6 + 1, hw[1] // 6 + 1), generator=gen).float()
    images = torch.nn.functional.interpolate(coarse, size=hw, mode="bilinear").round().to(torch.uint8)
    groups = [(list(range(9)), images)]  # one size group, above MATMUL_MIN_IMAGES
    kernel = preprocess_groups(groups, 9, spec, matmul=False)
    product = preprocess_groups(groups, 9, spec, matmul=True)
    levels = (product - kernel).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
    assert product.shape == kernel.shape == (9, 3, *spec.out_size)
    # A level where the exact sum is a tie (x.5) that float noise breaks, two where the first
    # pass's tie feeds the second's. Ties are rare downscaling, common upscaling by a simple ratio.
    upscaled = min(spec.resized_size(*hw)) > min(hw)
    assert float(levels.max()) <= 2.01
    assert float((levels > 0.5).float().mean()) < (0.05 if upscaled else 0.005)
    if spec.crop is not None and spec.resized_size(*hw)[0] < spec.crop[0]:  # the crop pads: torch's path
        assert torch.equal(product, kernel)


@pytest.mark.gpu
def test_cuda_preprocessing_matches_the_cpu_kernels() -> None:
    """On CUDA a same-size group goes through the matrix products (the default there): within
    the same tolerance of torch's kernels on the CPU, for the bench's 500x375 photos."""
    spec = transform_spec(open_clip.image_transform(224, is_train=False))
    assert spec is not None
    gen = torch.Generator().manual_seed(5)
    coarse = torch.randint(0, 256, (16, 3, 64, 84), generator=gen).float()
    images = torch.nn.functional.interpolate(coarse, size=(375, 500), mode="bilinear").round().to(torch.uint8)
    cpu = preprocess_groups([(list(range(16)), images)], 16, spec, matmul=False)
    cuda = preprocess_groups([(list(range(16)), images.cuda())], 16, spec).cpu()
    levels = (cuda - cpu).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
    assert float(levels.max()) <= 2.01 and float((levels > 0.5).float().mean()) < 0.005
