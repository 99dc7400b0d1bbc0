"""Tests of prism_probe.data: sources, decoding, preprocessing, batching, ImageFolder.

Every fixture image is built here in tmp_path with pixel values chosen so that the right answer
is known; real images are read in place from ../shared (skipped when it is absent).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from prism_probe import data
from prism_probe.data import (
    DEFAULT_BACKGROUND,
    ImageList,
    Preprocess,
    collect_images,
    iterate_batches,
    load_image_folder,
    read_image,
    shard_indices,
)
from prism_probe.errors import (
    ImageReadError,
    ImageSourceError,
    NoImagesError,
    PreprocessError,
    PrismError,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENET = SHARED / "data" / "imagenet-sample"
CIFAR = SHARED / "data" / "cifar10-small"

needs_imagenet = pytest.mark.skipif(
    not IMAGENET.is_dir(), reason=f"real ImageNet sample not found at {IMAGENET}"
)
needs_cifar = pytest.mark.skipif(
    not CIFAR.is_dir(), reason=f"CIFAR-10 sample not found at {CIFAR}"
)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _noise_jpeg(path: Path, size=(64, 48), seed=0, quality=90) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return _save(Image.fromarray(arr), path, format="JPEG", quality=quality)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cmyk", [(0, 255, 255, 0), (0, 0, 0, 128), (255, 0, 0, 0), (0, 128, 0, 64)]
)
def test_cmyk_jpeg_converts_to_known_rgb(tmp_path, cmyk):
    path = _save(Image.new("CMYK", (16, 16), cmyk), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"

    img = read_image(path)

    c, m, y, k = cmyk
    nk = 255 - k
    # R = (255 - K)(1 - C/255), likewise G from M and B from Y.
    expected = [nk - c * nk / 255, nk - m * nk / 255, nk - y * nk / 255]
    assert img.mode == "RGB"
    assert np.abs(_pixels(img)[8, 8] - expected).max() <= 2


def test_grayscale_and_bilevel_become_equal_channels(tmp_path):
    gray = _save(Image.new("L", (8, 8), 77), tmp_path / "gray.png")
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((3, 2), 1)
    bilevel = _save(bilevel, tmp_path / "bilevel.png")

    assert (_pixels(read_image(gray)) == 77).all()
    out = _pixels(read_image(bilevel))
    assert out.shape == (8, 8, 3)
    assert out[2, 3].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_palette_png_with_transparency_composites_on_background(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.putdata([0, 0, 1, 1, 2, 2, 0, 0])
    # Index 0 opaque red, index 1 fully transparent green, index 2 blue at alpha 128.
    path = _save(im, tmp_path / "palette.png", transparency=bytes([255, 0, 128]))

    out = _pixels(read_image(path))

    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 2].tolist() == list(DEFAULT_BACKGROUND)
    a = 128 / 255
    half_blue = [128 * (1 - a), 128 * (1 - a), 255 * a + 128 * (1 - a)]  # 63.75, 63.75, 191.75
    assert np.abs(out[1, 0] - half_blue).max() <= 1


def test_rgba_and_la_composite_and_background_is_configurable(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    path = _save(rgba, tmp_path / "rgba.png")
    la = _save(Image.new("LA", (4, 4), (200, 0)), tmp_path / "la.png")

    out = _pixels(read_image(path))
    white = _pixels(read_image(path, background=(255, 255, 255)))

    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[1, 1].tolist() == [128, 128, 128]
    assert white[1, 1].tolist() == [255, 255, 255]
    assert _pixels(read_image(la))[2, 2].tolist() == [128, 128, 128]


def test_16bit_png_scales_by_range_not_clip(tmp_path):
    values = np.array([[0, 32896, 65535, 25700]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")

    out = _pixels(read_image(path))

    assert out[0, :, 0].tolist() == [0, 128, 255, 100]
    assert (out[..., 0] == out[..., 2]).all()


def test_32bit_int_and_float_images(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    wide = Image.fromarray(np.array([[-10, 90]], dtype=np.int32), mode="I")
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")

    assert _pixels(data.to_rgb(ints))[0, :, 0].tolist() == [0, 255]
    assert _pixels(data.to_rgb(wide))[0, :, 0].tolist() == [0, 255]  # own min..max
    assert _pixels(data.to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_6_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 10, 40, 20))  # top half red, bottom half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)

    img = read_image(path)
    out = _pixels(img)

    # Orientation 6: rotate 90° clockwise to view; the stored top (red) ends on the right.
    assert img.size == (20, 40)
    assert np.abs(out[20, 15] - [255, 0, 0]).max() < 40
    assert np.abs(out[20, 4] - [0, 0, 255]).max() < 40
    reference = _pixels(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.array_equal(out, reference)


def test_draft_decoding_reduces_jpeg_but_keeps_target_size(tmp_path):
    path = _noise_jpeg(tmp_path / "big.jpg", size=(512, 384))

    assert read_image(path).size == (512, 384)
    assert read_image(path, target_size=32).size == (64, 48)  # 1/8 scale, still >= 32
    assert read_image(path, target_size=(50, 50)).size == (128, 96)  # 1/8 would give 48
    assert read_image(path, target_size=(384, 600)).size == (512, 384)  # never enlarged
    for target in [(33, 47), (97, 31), (200, 10)]:
        w, h = read_image(path, target_size=target).size
        assert h >= target[0] and w >= target[1]


def test_multi_frame_files_give_first_frame_and_mpo_drafts(tmp_path):
    noise = np.random.default_rng(2).integers(0, 256, (384, 512, 3), dtype=np.uint8)
    mpo = tmp_path / "camera.mpo"
    Image.fromarray(noise).save(mpo, format="MPO", save_all=True,
                                append_images=[Image.new("RGB", (512, 384), (255, 0, 0))])
    palette = [0, 0, 0, 255, 255, 255]
    white, black = Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 0)
    white.putpalette(palette)
    black.putpalette(palette)
    gif = tmp_path / "anim.gif"
    white.save(gif, save_all=True, append_images=[black])

    assert read_image(mpo, target_size=32).size == (64, 48)
    assert _pixels(read_image(gif))[0, 0].tolist() == [255, 255, 255]


def test_draft_hint_follows_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.random.default_rng(1).integers(0, 256, (400, 800, 3), dtype=np.uint8)
    path = _save(Image.fromarray(stored), tmp_path / "tall.jpg", exif=exif)

    # Upright the photo is 400 wide, 800 tall; (h=100, w=50) allows exactly 1/8 scale.
    assert read_image(path, target_size=(100, 50)).size == (50, 100)


def test_unreadable_files_raise_one_error_naming_file(tmp_path):
    good = _noise_jpeg(tmp_path / "good.jpg", size=(128, 128)).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")

    cases = {truncated: "truncated", empty: "empty", text: "not an image",
             tmp_path / "absent.jpg": "not found"}
    for path, reason in cases.items():
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert path.name in str(info.value)
        assert reason in str(info.value)
        assert isinstance(info.value, PrismError)
        assert "\n" not in str(info.value)


def test_decompression_bomb_guard(tmp_path):
    path = _save(Image.new("RGB", (16, 16)), tmp_path / "bomb.png")

    with pytest.raises(ImageReadError, match="max_pixels=100"):
        read_image(path, max_pixels=100)
    assert read_image(path, max_pixels=256).size == (16, 16)
    assert read_image(path, max_pixels=None).size == (16, 16)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _make_tree(root: Path) -> list[Path]:
    files = [
        _noise_jpeg(root / "b" / "two.JPG", seed=2),
        _noise_jpeg(root / "a" / "deep" / "one.jpeg", seed=1),
        _save(Image.new("RGB", (8, 8), (1, 2, 3)), root / "zeta.png"),
    ]
    (root / "readme.txt").write_text("not an image")
    _noise_jpeg(root / ".hidden" / "skip.jpg", seed=3)
    (root / "a" / "._one.jpeg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    return sorted(files)


def test_folder_is_recursive_case_insensitive_sorted_and_skips_hidden(tmp_path):
    expected = _make_tree(tmp_path)

    images = collect_images(tmp_path)

    assert list(images) == expected
    assert images.names == ["a/deep/one.jpeg", "b/two.JPG", "zeta.png"]
    assert images.root == tmp_path.resolve()
    assert str(tmp_path) in images.source
    assert images.missing == () and images.duplicates == ()
    assert len(images.digest) == 64


def test_glob_pattern_and_single_file(tmp_path):
    _make_tree(tmp_path)

    images = collect_images(str(tmp_path / "**" / "*.jp*g"))
    single = collect_images(tmp_path / "zeta.png")

    assert [p.name for p in images] == ["one.jpeg"]  # glob is case-sensitive: two.JPG is out
    assert list(single) == [(tmp_path / "zeta.png").resolve()]


def test_text_file_of_paths_records_missing_entries(tmp_path):
    files = _make_tree(tmp_path / "imgs")
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# a comment\n"
        "../imgs/zeta.png\n"
        "\n"
        f"{files[0]}\n"
        "  ../imgs/missing.jpg  \n"
    )

    images = collect_images(listing)

    assert list(images) == [(tmp_path / "imgs" / "zeta.png").resolve(), files[0]]
    assert len(images.missing) == 1
    missing_path, reason = images.missing[0]
    assert missing_path.name == "missing.jpg" and "not found" in reason
    assert images.to_dict()["n_missing"] == 1


def test_missing_list_entries_are_reported_by_the_batch_stream(tmp_path):
    files = _make_tree(tmp_path)
    images = collect_images([*files, tmp_path / "gone.png"])

    stream = iterate_batches(images, Preprocess(size=8))
    batches = list(stream)

    assert sum(len(b) for b in batches) == 3
    assert [p.name for p, _ in stream.skipped] == ["gone.png"]


def test_bad_sources_are_errors(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        collect_images(tmp_path / "nowhere")
    with pytest.raises(NoImagesError, match=str(tmp_path)):
        collect_images(tmp_path)
    with pytest.raises(ImageSourceError, match="limit"):
        collect_images(None, limit=0)
    with pytest.raises(ImageSourceError, match="not a path"):
        collect_images([1, 2])


def test_duplicates_reported_kept_or_dropped(tmp_path):
    first = _noise_jpeg(tmp_path / "a.jpg", seed=5)
    shutil.copy(first, tmp_path / "b.jpg")
    _noise_jpeg(tmp_path / "c.jpg", seed=6)

    kept = collect_images(tmp_path)
    dropped = collect_images(tmp_path, dedupe=True)

    assert kept.duplicates == (("a.jpg", "b.jpg"),)
    assert kept.n_duplicates == 1 and len(kept) == 3
    assert [p.name for p in dropped] == ["a.jpg", "c.jpg"]
    assert dropped.duplicates == (("a.jpg", "b.jpg"),)
    assert dropped.digest != kept.digest  # a multiset digest counts the copy


def test_digest_depends_on_contents_only(tmp_path):
    for i in range(3):
        _noise_jpeg(tmp_path / "one" / f"{i}.jpg", seed=i)
        _noise_jpeg(tmp_path / "two" / f"renamed_{2 - i}.jpg", seed=i)
    _noise_jpeg(tmp_path / "three" / "0.jpg", seed=0)
    _noise_jpeg(tmp_path / "three" / "1.jpg", seed=1)
    _noise_jpeg(tmp_path / "three" / "2.jpg", seed=9)

    one = collect_images(tmp_path / "one")
    two = collect_images(tmp_path / "two")
    three = collect_images(tmp_path / "three")
    shuffled = collect_images(tmp_path / "one", shuffle=True, seed=3)

    assert one.digest == two.digest == shuffled.digest
    assert three.digest != one.digest


def test_subsample_is_seeded_deterministic_and_order_stable(tmp_path):
    for i in range(20):
        _save(Image.new("L", (4, 4), i), tmp_path / f"{i:02d}.png")
    full = collect_images(tmp_path)

    a = collect_images(tmp_path, limit=5, seed=1)
    b = collect_images(tmp_path, limit=5, seed=1)
    c = collect_images(tmp_path, limit=5, seed=2)
    shuffled = collect_images(tmp_path, limit=5, seed=1, shuffle=True)

    assert list(a) == list(b) and a.digest == b.digest
    assert list(a) != list(c)
    positions = [full.paths.index(p) for p in a]
    assert positions == sorted(positions)
    assert set(shuffled) == set(a) and list(shuffled) != list(a)
    assert "5 of 20 (seed 1)" in a.source
    assert collect_images(tmp_path, limit=50).paths == full.paths


def test_skimage_default_photos_are_readable():
    images = collect_images(None)

    assert len(images) >= 8
    assert {"astronaut.png", "chelsea.png", "coffee.png"} <= set(images.names)
    for path in images:
        img = read_image(path)
        assert img.mode == "RGB" and min(img.size) >= 100


def test_collect_and_read_do_not_import_torch():
    code = (
        "import sys; from prism_probe import data; "
        "p = data.collect_images(None)[0]; data.read_image(p); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@needs_imagenet
def test_real_imagenet_images_read():
    images = collect_images(IMAGENET, limit=12, seed=0)

    assert len(images) == 12 and len(collect_images(IMAGENET).paths) == 250
    for path in images:
        full = read_image(path)
        small = read_image(path, target_size=64)
        assert full.mode == small.mode == "RGB"
        assert min(full.size) >= 64 and min(small.size) >= 64
        assert small.size[0] <= full.size[0]


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_constant_image_maps_to_normalised_value():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    colour = (200, 100, 50)
    pre = Preprocess(size=(24, 16), mean=mean, std=std)

    x = pre(Image.new("RGB", (97, 61), colour))

    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 24, 16)
    for ch in range(3):
        expected = (colour[ch] / 255 - mean[ch]) / std[ch]
        assert torch.allclose(x[ch], torch.full((24, 16), expected), atol=1e-5)


def test_value_range_maps_0_and_255_to_ends():
    img = Image.new("RGB", (2, 1))
    img.putpixel((1, 0), (255, 255, 255))

    minus_one = Preprocess(size=(1, 2), resize="none", value_range=(-1, 1))(img)
    unit = Preprocess(size=(1, 2), resize="none", value_range=(0, 1))(img)
    plain = Preprocess(size=(1, 2), resize="none")(img)

    assert minus_one[:, 0, 0].tolist() == [-1.0] * 3
    assert minus_one[:, 0, 1].tolist() == [1.0] * 3
    assert torch.equal(unit, plain)
    assert plain.min() == 0.0 and plain.max() == 1.0


def test_shorter_side_resize_and_center_crop_match_torchvision():
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    pre = Preprocess(size=224, crop_pct=0.875, interpolation="bicubic")
    reference = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
    ])

    assert pre.scale_size == (256, 256)
    assert torch.equal(pre(img), reference(img))


def test_non_square_size_and_squash():
    img = Image.new("RGB", (300, 200), (9, 9, 9))

    tall = Preprocess(size=(448, 224))(img)
    squash = Preprocess(size=(10, 30), resize="squash").resize_image(img)

    assert tuple(tall.shape) == (3, 448, 224)  # a 32 x 16 grid for patch 14
    assert squash.size == (30, 10)


def test_shorter_crop_keeps_the_center():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (75, 0, 225, 100))  # white middle half

    out = np.asarray(Preprocess(size=50).resize_image(img))

    # Resized to 150x50 the band spans columns 37.5..112.5; the crop keeps columns 50..100,
    # far enough inside for the bicubic filter to see only white.
    assert out.shape == (50, 50, 3)
    assert (out == 255).all()


def test_downsizing_is_antialiased():
    checker = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(checker).convert("RGB")

    for interpolation in ("bicubic", "bilinear"):
        x = Preprocess(size=32, interpolation=interpolation)(img)
        # Aliasing would leave a strong pattern; an antialiased filter averages to grey.
        assert abs(float(x.mean()) - 0.5) < 0.02 and float(x.std()) < 0.02


def test_resize_none_requires_exact_size():
    pre = Preprocess(size=32, resize="none")

    assert tuple(pre(Image.new("RGB", (32, 32))).shape) == (3, 32, 32)
    with pytest.raises(PreprocessError, match="32x32"):
        pre(Image.new("RGB", (33, 32)))
    assert pre.decode_hint is None


def test_preprocess_to_dict_roundtrip_and_validation():
    pre = Preprocess(size=(448, 224), crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=[0.5] * 3)
    d = json.loads(json.dumps(pre.to_dict()))

    assert d["size"] == [448, 224] and d["mean"] == [0.5, 0.5, 0.5]
    assert Preprocess.from_dict(d) == pre
    bad = [
        dict(size=0), dict(size=(1, 2, 3)), dict(size=8, resize="fit"),
        dict(size=8, crop_pct=1.2), dict(size=8, interpolation="nearest"),
        dict(size=8, mean=(0.5,) * 3), dict(size=8, mean=(0,) * 3, std=(0, 1, 1)),
        dict(size=8, mean=(0,) * 3, std=(1,) * 3, value_range=(-1, 1)),
        dict(size=8, value_range=(1, -1)),
    ]
    for kw in bad:
        with pytest.raises(PreprocessError):
            Preprocess(**kw)


def test_from_timm_config():
    cfg = {
        "input_size": (3, 518, 518), "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0, "crop_mode": "center",
    }

    pre = Preprocess.from_timm_config(cfg)
    at_224 = Preprocess.from_timm_config(cfg, size=224)
    squash = Preprocess.from_timm_config({**cfg, "crop_mode": "squash", "crop_pct": 0.95})

    assert pre.size == (518, 518) and pre.resize == "shorter" and pre.crop_pct == 1.0
    assert pre.mean == (0.485, 0.456, 0.406) and pre.value_range is None
    assert at_224.size == (224, 224)
    assert squash.resize == "squash" and squash.scale_size == (545, 545)
    assert Preprocess.from_timm_config({"input_size": (3, 32, 32)}).crop_pct == 0.875
    with pytest.raises(PreprocessError, match="border"):
        Preprocess.from_timm_config({**cfg, "crop_mode": "border"})
    with pytest.raises(PreprocessError, match="input_size"):
        Preprocess.from_timm_config({"input_size": (1, 32, 32)})


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _mixed_folder(root: Path, n_good: int = 7) -> tuple[list[str], list[str]]:
    good = []
    for i in range(n_good):
        _save(Image.new("RGB", (20 + i, 16), (i * 10, 0, 0)), root / f"{i:02d}_good.png")
        good.append(f"{i:02d}_good.png")
    (root / "03_empty.jpg").write_bytes(b"")
    full = _noise_jpeg(root / "tmp.jpg").read_bytes()
    (root / "tmp.jpg").unlink()
    (root / "05_truncated.jpg").write_bytes(full[: len(full) // 3])
    return good, ["03_empty.jpg", "05_truncated.jpg"]


def test_batches_skip_unreadable_files_and_stay_full(tmp_path):
    good, bad = _mixed_folder(tmp_path)
    images = collect_images(tmp_path)
    calls = []

    stream = iterate_batches(images, Preprocess(size=16), batch_size=3,
                             progress=lambda done, total: calls.append((done, total)))
    batches = list(stream)

    assert [len(b) for b in batches] == [3, 3, 1]
    assert all(b.pixels.shape[1:] == (3, 16, 16) and b.pixels.dtype == torch.float32
               for b in batches)
    indices = torch.cat([b.indices for b in batches]).tolist()
    assert [images.names[i] for i in indices] == good
    assert sorted(p.name for p, _ in stream.skipped) == bad
    assert any("empty" in r for _, r in stream.skipped)
    assert stream.n_read == 7 and stream.n_total == 9
    assert "7 of 9 images read, 2 skipped" in stream.summary()
    assert sum(len(b.skipped) for b in batches) == 2
    assert calls[-1] == (9, 9)
    # The red channel encodes which file a row came from: pixels follow the indices.
    first = batches[0].pixels[:, 0, 8, 8]
    assert torch.allclose(first, torch.tensor([0.0, 10 / 255, 20 / 255]), atol=1e-6)


def test_workers_give_the_same_batches(tmp_path):
    _mixed_folder(tmp_path)
    images = collect_images(tmp_path)
    pre = Preprocess(size=16, value_range=(-1, 1))

    inline = list(iterate_batches(images, pre, batch_size=4))
    stream = iterate_batches(images, pre, batch_size=4, workers=2)
    pooled = list(stream)

    assert [b.indices.tolist() for b in pooled] == [b.indices.tolist() for b in inline]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(inline, pooled))
    assert len(stream.skipped) == 2


def test_sharding_is_disjoint_and_covers_the_list(tmp_path):
    for n, world in [(10, 3), (2, 4), (7, 1), (0, 2)]:
        shards = [list(shard_indices(n, r, world)) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1

    good, _ = _mixed_folder(tmp_path)
    images = collect_images(tmp_path)
    seen = []
    for rank in range(3):
        stream = iterate_batches(images, Preprocess(size=8), batch_size=2, rank=rank,
                                 world_size=3)
        got = [i for b in stream for i in b.indices.tolist()]
        assert stream.n_total == len(shard_indices(len(images), rank, 3))
        assert all(i % 3 == rank for i in got)
        seen += got
    assert sorted(images.names[i] for i in seen) == good
    with pytest.raises(PrismError):
        shard_indices(5, 3, 3)


def test_folder_with_no_readable_file_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"garbage")

    stream = iterate_batches(collect_images(tmp_path), Preprocess(size=8))

    with pytest.raises(NoImagesError, match=str(tmp_path)):
        list(stream)
    assert len(stream.skipped) == 2


def test_wrong_size_with_resize_none_is_skipped(tmp_path):
    _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    _save(Image.new("RGB", (9, 8)), tmp_path / "b.png")

    stream = iterate_batches(collect_images(tmp_path), Preprocess(size=8, resize="none"))

    assert [b.indices.tolist() for b in stream] == [[0]]
    assert "resize='none'" in stream.skipped[0][1]


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


def test_load_image_folder_labels_follow_sorted_classes(tmp_path):
    for cls, n in [("dog", 2), ("cat", 3), ("bird", 1)]:
        for i in range(n):
            _save(Image.new("L", (4, 4), i), tmp_path / cls / f"{i}.png")

    paths, labels, classes = load_image_folder(tmp_path)

    assert classes == ["bird", "cat", "dog"]
    assert labels == [0, 1, 1, 1, 2, 2]
    assert [p.parent.name for p in paths] == ["bird", "cat", "cat", "cat", "dog", "dog"]
    assert isinstance(paths, ImageList)

    (tmp_path / "emu").mkdir()
    with pytest.raises(ImageSourceError, match="emu"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, allow_empty=True)[2][1] == "cat"


@needs_cifar
def test_load_cifar_small():
    paths, labels, classes = load_image_folder(CIFAR / "test")

    assert classes[:3] == ["airplane", "automobile", "bird"] and len(classes) == 10
    assert len(paths) == len(labels) == 1000
    assert np.bincount(labels).tolist() == [100] * 10
    assert read_image(paths[0]).size == (32, 32)


# --------------------------------------------------------------------------------------------
# Fuzz
# --------------------------------------------------------------------------------------------

_MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]


def _damage(blob: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    b = bytearray(blob)
    if kind == 0:  # truncate
        return bytes(b[: rng.randrange(1, len(b))])
    if kind == 1:  # flip bytes anywhere, headers included
        for _ in range(rng.randrange(1, 40)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # overwrite a chunk with noise
        start = rng.randrange(len(b))
        n = min(len(b) - start, rng.randrange(1, 2000))
        b[start:start + n] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(b)
    start = rng.randrange(len(b))  # splice garbage in
    return bytes(b[:start]) + bytes(rng.randrange(256) for _ in range(64)) + bytes(b[start:])


def _check_all_read_or_reported(folder: Path, n: int) -> None:
    for path in sorted(folder.iterdir()):
        try:
            img = read_image(path, target_size=16, max_pixels=50_000_000)
        except ImageReadError as exc:
            assert path.name in str(exc)
        else:
            assert img.mode == "RGB" and min(img.size) >= 1

    images = collect_images(folder)
    stream = iterate_batches(images, Preprocess(size=16), batch_size=8,
                             max_pixels=50_000_000)
    try:
        n_yielded = sum(len(b) for b in stream)
    except NoImagesError:
        n_yielded = 0
    assert n_yielded == stream.n_read
    assert stream.n_read + len(stream.skipped) == len(images) == n


def test_fuzz_random_bytes_never_crash(tmp_path):
    rng = random.Random(1234)
    exts = [".jpg", ".png", ".gif", ".bmp", ".tif", ".webp"]
    n = 300
    for i in range(n):
        head = rng.choice(_MAGIC)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
        (tmp_path / f"{i:03d}{rng.choice(exts)}").write_bytes(head + body)

    _check_all_read_or_reported(tmp_path, n)


def test_fuzz_damaged_real_jpegs(tmp_path):
    sources = sorted(IMAGENET.glob("*.JPEG"))[:6] + sorted((CIFAR / "train").glob("*/000*.jpg"))
    if not sources:
        pytest.skip(f"real JPEGs not found under {SHARED / 'data'}")
    rng = random.Random(99)
    n = 120
    blobs = [p.read_bytes() for p in sources]
    for i in range(n):
        (tmp_path / f"{i:03d}.jpg").write_bytes(_damage(rng.choice(blobs), rng))

    _check_all_read_or_reported(tmp_path, n)


def test_list_file_whose_every_entry_is_missing_says_so(tmp_path):
    """Not 'no image files': the list names files, none of which exist."""
    from prism_probe.data import collect_images
    from prism_probe.errors import NoImagesError

    lst = tmp_path / "list.txt"
    lst.write_text("gone1.png\ngone2.png\n")
    with pytest.raises(NoImagesError, match=r"none of the 2 files named in .*gone1.png"):
        collect_images(lst)
