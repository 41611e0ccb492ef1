"""Tests for mmtag.data.images: image decoding (every format, every way a file can be bad), the
one image loader, and the checks of a dataset's image files.

Every input is generated under pytest's tmp_path.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from data_helpers import HEADER, assert_data_error, crlf, write
from mmtag.data.augment import parse_image_aug
from mmtag.data import (
    CsvFormat,
    IMAGE_FORMATS,
    ImageDecodeError,
    ImageItems,
    check_images_exist,
    collate_images,
    decode_image,
    decode_thumbnail,
    image_batches,
    image_loader,
    load_image,
    normalize_images,
    open_image_bytes,
    read_csv,
)
from mmtag.encoders import ImageEncoder
from mmtag.errors import DataError


# ----------------------------------------------------------------------------------------------
# 1. load_image
# ----------------------------------------------------------------------------------------------

def assert_image_array(arr: np.ndarray, size: int) -> None:
    assert arr.shape == (3, size, size)
    assert arr.dtype == np.float32
    assert arr.flags["C_CONTIGUOUS"]
    assert float(arr.min()) >= -1.0 and float(arr.max()) <= 1.0


def halves(width: int, height: int, left, right, mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def test_load_image_rgb_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    halves(64, 48, (255, 0, 0), (0, 0, 255)).save(path, quality=95)
    arr = load_image(path, 16)
    assert_image_array(arr, 16)
    left, right = arr[:, :, :5].mean(axis=(1, 2)), arr[:, :, -5:].mean(axis=(1, 2))
    np.testing.assert_allclose(left, [1, -1, -1], atol=0.1)   # red
    np.testing.assert_allclose(right, [-1, -1, 1], atol=0.1)  # blue


def test_decode_then_normalize_is_load_image_bit_for_bit(tmp_path: Path) -> None:
    # Workers send uint8 and the main process normalises whole batches with torch; features
    # must not depend on which path an image took (the cache holds both kinds of result).
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path, quality=90)
    raw = decode_image(path, 24)
    assert raw.dtype == np.uint8 and raw.shape == (3, 24, 24) and raw.flags["C_CONTIGUOUS"]
    want = load_image(path, 24)
    assert np.array_equal(normalize_images(raw), want)
    batch = torch.from_numpy(np.stack([raw, raw]))
    got = normalize_images(batch)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy()[1], want)
    assert batch.dtype == torch.uint8 and int(batch.max()) > 1  # the input is left as it was
    assert normalize_images(got) is got  # already normalised: passed through


def test_load_image_accepts_pil_image_and_str_path(tmp_path: Path) -> None:
    img = Image.new("RGB", (10, 20), (255, 255, 255))
    np.testing.assert_allclose(load_image(img, 4), np.ones((3, 4, 4)), atol=1e-6)
    path = tmp_path / "b.png"
    Image.new("RGB", (10, 20), (0, 0, 0)).save(path)
    np.testing.assert_allclose(load_image(str(path), 4), -np.ones((3, 4, 4)), atol=1e-6)


def test_load_image_rgba_png_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    halves(20, 10, (0, 0, 0, 0), (255, 0, 0, 255), mode="RGBA").save(path)
    assert Image.open(path).mode == "RGBA"
    arr = load_image(path, 20)
    assert_image_array(arr, 20)
    np.testing.assert_allclose(arr[:, :, :8], 1.0, atol=1e-6)  # transparent black → white
    np.testing.assert_allclose(arr[:, :, -8:].mean(axis=(1, 2)), [1, -1, -1], atol=1e-6)


def test_load_image_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    halves(20, 10, 0, 255, mode="L").save(path)
    arr = load_image(path, 10)
    assert_image_array(arr, 10)
    np.testing.assert_array_equal(arr[0], arr[1])
    np.testing.assert_array_equal(arr[1], arr[2])
    assert arr[0, :, :3].max() < -0.9 and arr[0, :, -3:].min() > 0.9


def test_load_image_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "c.jpg"
    halves(32, 16, (0, 0, 0, 0), (0, 0, 0, 255), mode="CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    arr = load_image(path, 16)
    assert_image_array(arr, 16)
    assert arr[:, :, :5].min() > 0.8    # no ink → white
    assert arr[:, :, -5:].max() < -0.8  # full black ink → black


def test_load_image_16bit_png(tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    a = np.zeros((16, 48), dtype=np.uint16)  # thirds: 0, 32768, 65535
    a[:, 16:32] = 32768
    a[:, 32:] = 65535
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "I;16"
    arr = load_image(path, 48)
    assert_image_array(arr, 48)
    assert arr[:, :, :14].max() < -0.99
    assert abs(arr[:, :, 18:30]).max() < 0.02  # mid-range 16-bit → mid grey, not clipped to white
    assert arr[:, :, 34:].min() > 0.99


def test_load_image_palette_gif(tmp_path: Path) -> None:
    path = tmp_path / "e.gif"
    img = Image.new("P", (16, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    img.paste(1, (8, 0, 16, 8))
    img.save(path)
    assert Image.open(path).mode == "P"
    arr = load_image(path, 8)
    assert_image_array(arr, 8)
    np.testing.assert_allclose(arr[:, :, :3].mean(axis=(1, 2)), [1, -1, -1], atol=1e-6)
    np.testing.assert_allclose(arr[:, :, -3:].mean(axis=(1, 2)), [-1, -1, 1], atol=1e-6)


def test_load_image_palette_with_transparency_on_white(tmp_path: Path) -> None:
    path = tmp_path / "t.gif"
    img = Image.new("P", (16, 8), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    img.paste(1, (8, 0, 16, 8))
    img.save(path, transparency=0)
    arr = load_image(path, 8)
    np.testing.assert_allclose(arr[:, :, :3], 1.0, atol=1e-6)  # transparent black → white
    np.testing.assert_allclose(arr[:, :, -3:].mean(axis=(1, 2)), [-1, -1, 1], atol=1e-6)


@pytest.mark.parametrize("orientation", [1, 6])
def test_load_image_applies_exif_orientation(tmp_path: Path, orientation: int) -> None:
    # 40 wide × 20 high: left half black, right half white.
    img = halves(40, 20, (0, 0, 0), (255, 255, 255))
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    img.save(path, quality=95, exif=exif)
    arr = load_image(path, 8).mean(axis=0)
    top, bottom = arr[:3].mean(), arr[-3:].mean()
    left, right = arr[:, :3].mean(), arr[:, -3:].mean()
    if orientation == 1:
        assert left < -0.8 and right > 0.8
        assert abs(top - bottom) < 0.2
    else:
        # Orientation 6: display = rotate 90° clockwise, so the black left half ends up on top.
        assert top < -0.8 and bottom > 0.8
        assert abs(left - right) < 0.2


def _noisy_jpeg_bytes(tmp_path: Path) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


def test_load_image_truncated_jpeg(tmp_path: Path) -> None:
    data = _noisy_jpeg_bytes(tmp_path)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(path, 16)


@pytest.mark.parametrize("content", [b"", b"this is not an image\n"], ids=["empty", "text"])
def test_load_image_not_an_image(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(path, 16)


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_image(tmp_path / "missing.jpg", 16)


def test_load_image_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (60, 40)).save(path)  # 2400 pixels
    assert load_image(path, 8).shape == (3, 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2400 > 2 × limit
    with pytest.raises(ValueError, match="too large"):
        load_image(path, 8)


def test_load_image_refuses_images_just_over_the_pixel_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)  # 1200 pixels: over the limit, under 2 × limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            load_image(path, 8)


def test_dark_16bit_image_stays_dark(tmp_path: Path) -> None:
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)).save(path)
    assert load_image(path, 8).max() < -0.9  # 1000/65535 of full scale, not stretched to white

# ----------------------------------------------------------------------------------------------
# 2. The one image loader (feature extraction and fine-tuning both decode through it)
# ----------------------------------------------------------------------------------------------

def _noise_images(directory: Path, names: list[str]) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for name in names:
        path = directory / name
        Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_image_loader_plain_batches_are_uint8_and_normalise_to_load_image(tmp_path: Path) -> None:
    # Fine-tuning used to decode with load_image (float, per image); the loader hands over uint8
    # and the batch is normalised at once: the model must see the very same floats.
    paths = _noise_images(tmp_path, ["a.jpg", "b.png", "c.jpg"])
    items = ImageItems(paths, 24, parse_image_aug("crop,flip"))  # no seed: the plain view
    batches = list(image_loader(items, image_batches([None, None, None], 2), workers=0))
    assert [b.items for b in batches] == [[0, 1], [2]] and all(not b.errors for b in batches)
    assert all(b.images is not None and b.images.dtype == torch.uint8 for b in batches)
    got = torch.cat([normalize_images(b.images) for b in batches if b.images is not None])
    want = np.stack([load_image(p, 24) for p in paths])
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


def test_image_loader_augmented_view_is_the_augmentation_of_load_image(tmp_path: Path) -> None:
    (path,) = _noise_images(tmp_path, ["a.jpg"])
    augment = parse_image_aug("crop,flip")
    items = ImageItems([path], 24, augment)
    i, view, reason = items[(0, 1234)]
    assert (i, reason) == (0, "") and view is not None and view.dtype == torch.float32
    want = augment(torch.from_numpy(load_image(path, 24)), seed=1234)
    assert torch.equal(view, want)
    again = collate_images([items[(0, 1234)], items[(0, 99)]])
    assert again.images is not None and torch.equal(again.images[0], want)  # seeded: repeatable


def test_image_loader_reports_a_bad_image_with_its_csv_row(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _noise_images(images, ["a.jpg", "c.png"])
    (images / "broken.jpg").write_bytes(b"not an image")
    path = write(tmp_path, HEADER + crlf(b"a.jpg,1,x", b"broken.jpg,2,y", b"c.png,3,z"))
    ds = read_csv(path, images_dir=images).dataset
    items = ImageItems.from_dataset(ds, 16)
    batch = collate_images([items[(j, None)] for j in range(3)])
    assert batch.items == [0, 2] and batch.images is not None and batch.images.shape[0] == 2
    assert [j for j, _ in batch.errors] == [1]
    assert_data_error(items.error(*batch.errors[0]), path, 2, 3, "broken.jpg", "cannot decode")
    # Positions that are not rows (extraction decodes each distinct file once, in its own order)
    reordered = ImageItems([ds.image_path(1), ds.image_path(0)], 16, source=ds, rows=[1, 0])
    assert_data_error(reordered.error(0, "why"), path, 2, 3, "broken.jpg", "why")
    # Bare files (no CSV): the file itself is named
    bare = ImageItems([images / "broken.jpg"], 16)
    err = bare.error(*collate_images([bare[(0, None)]]).errors[0])
    assert err.path == str(images / "broken.jpg") and err.row is None and "cannot decode" in str(err)
    assert collate_images([bare[(0, None)]]).images is None

# ----------------------------------------------------------------------------------------------
# 3. check_images_exist
# ----------------------------------------------------------------------------------------------

def _dataset_with_images(tmp_path: Path, present: list[str]) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in present:
        Image.new("RGB", (4, 4)).save(images / name)
    return images


def test_check_images_exist_all_present(tmp_path: Path) -> None:
    images = _dataset_with_images(tmp_path, ["a.png", "sub/b.png"])
    path = write(tmp_path, HEADER + crlf(b"a.png,1,x", b"sub/b.png,2,y"))
    ds = read_csv(path, images_dir=images).dataset
    kept, skipped = check_images_exist(ds, skip_bad=False)
    assert kept.image_ids == ["a.png", "sub/b.png"]
    assert skipped == []


def test_check_images_exist_missing_file_raises(tmp_path: Path) -> None:
    images = _dataset_with_images(tmp_path, ["a.png", "c.png"])
    (images / "dir.png").mkdir()  # a directory is not an image file
    path = write(tmp_path, HEADER + crlf(b'a.png,1,"x\r\nx"', b"b.png,2,y", b"c.png,3,z"))
    ds = read_csv(path, images_dir=images).dataset
    with pytest.raises(DataError) as info:
        check_images_exist(ds, skip_bad=False)
    assert_data_error(info.value, path, 2, 4, "b.png", "not found")

    path2 = write(tmp_path, HEADER + crlf(b"dir.png,1,x"), "d.csv")
    with pytest.raises(DataError) as info:
        check_images_exist(read_csv(path2, images_dir=images).dataset, skip_bad=False)
    assert_data_error(info.value, path2, 1, 2, "dir.png")


def test_check_images_exist_skip_bad_drops_and_reports(tmp_path: Path) -> None:
    images = _dataset_with_images(tmp_path, ["a.png", "c.png"])
    data = HEADER + crlf(b"a.png,1,x", b"b.png,2,y", b"c.png,3,z", b"d.png,4,w")
    path = write(tmp_path, data)
    ds = read_csv(path, images_dir=images).dataset
    kept, skipped = check_images_exist(ds, skip_bad=True)
    assert kept.image_ids == ["a.png", "c.png"]
    assert kept.captions == ["x", "z"]
    assert kept.labels == [[1], [3]]
    assert kept.rows == [1, 3]
    assert kept.lines == [2, 4]
    assert kept.images_dir == images
    assert [(e.row, e.line) for e in skipped] == [(2, 3), (4, 5)]
    assert "b.png" in str(skipped[0]) and "d.png" in str(skipped[1])
    assert len(ds) == 4  # the input dataset is not modified


def test_check_images_exist_without_images_dir(tmp_path: Path) -> None:
    ds = read_csv(write(tmp_path, HEADER + crlf(b"a.png,1,x"))).dataset
    with pytest.raises(DataError, match="no images directory"):
        check_images_exist(ds, skip_bad=True)


def test_ids_without_their_extension_are_one_error_naming_the_file_and_the_flag(
        tmp_path: Path) -> None:
    images = _dataset_with_images(tmp_path, ["139.jpg", "140.jpg", "sub/7.jpg", "other.png"])
    path = write(tmp_path, HEADER + crlf(b"139,1,x", b"140,2,y", b"sub/7,3,z"))
    ds = read_csv(path, images_dir=images).dataset
    for skip_bad in (False, True):  # the reading is wrong, not the rows: never skipped
        with pytest.raises(DataError) as info:
            check_images_exist(ds, skip_bad=skip_bad)
        assert_data_error(info.value, path, 1, 2, f"image '{images / '139'}' not found, but "
                          f"'{images / '139.jpg'}' is (and so for all 3 rows",
                          "no file extension; pass --image-ext .jpg")
    # --image-ext .jpg: every image found
    fixed = read_csv(path, images_dir=images, csv_format=CsvFormat(image_ext=".jpg")).dataset
    kept, skipped = check_images_exist(fixed, skip_bad=False)
    assert kept.image_ids == ["139", "140", "sub/7"] and skipped == []
    assert kept.image_path(2) == images / "sub" / "7.jpg"


def test_missing_images_stay_row_errors_when_no_extension_explains_them(tmp_path: Path) -> None:
    images = _dataset_with_images(tmp_path, ["1.jpg", "1.png", "2.jpg"])
    ambiguous = write(tmp_path, HEADER + crlf(b"1,1,x"))  # 1.jpg or 1.png?
    with pytest.raises(DataError, match="not found$"):
        check_images_exist(read_csv(ambiguous, images_dir=images).dataset, skip_bad=False)
    partly = write(tmp_path, HEADER + crlf(b"2,1,x", b"3,1,y"), "partly.csv")  # 3.jpg is gone too
    kept, skipped = check_images_exist(read_csv(partly, images_dir=images).dataset, skip_bad=True)
    assert len(kept) == 0 and [e.row for e in skipped] == [1, 2]
    assert all("--image-ext" not in str(e) for e in skipped)
    named = write(tmp_path, HEADER + crlf(b"9.jpg,1,x"), "named.csv")  # has its extension already
    Image.new("RGB", (4, 4)).save(images / "9.jpg.png")
    with pytest.raises(DataError, match="not found$"):
        check_images_exist(read_csv(named, images_dir=images).dataset, skip_bad=False)


def _images_with_symlinks(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    Image.new("RGB", (4, 4)).save(outside / "dir" / "x.png")
    images = tmp_path / "images"
    (images / "real").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(images / "real" / "a.png")
    (images / "inside.png").symlink_to(images / "real" / "a.png")  # stays inside: fine
    (images / "evil.png").symlink_to(outside / "secret.png")
    (images / "linkdir").symlink_to(outside / "dir")
    (images / "dangling.png").symlink_to(outside / "gone.png")
    (images / "loop.png").symlink_to(images / "loop.png")
    return images


def test_symlinks_resolving_outside_the_images_dir_are_refused(tmp_path: Path) -> None:
    images = _images_with_symlinks(tmp_path)
    rows = [b"real/a.png,1,x", b"inside.png,1,x", b"evil.png,1,x", b"linkdir/x.png,1,x",
            b"dangling.png,1,x", b"loop.png,1,x"]
    path = write(tmp_path, HEADER + crlf(*rows))
    ds = read_csv(path, images_dir=images).dataset
    with pytest.raises(DataError) as info:
        check_images_exist(ds, skip_bad=False)
    assert_data_error(info.value, path, 3, 4, "evil.png", "outside the images directory")
    with pytest.raises(DataError, match="outside the images directory"):
        ds.image_path(3)  # every path built from the dataset is checked, not just this pass
    kept, skipped = check_images_exist(ds, skip_bad=True)
    assert kept.image_ids == ["real/a.png", "inside.png"]
    assert [(e.row, e.line) for e in skipped] == [(3, 4), (4, 5), (5, 6), (6, 7)]
    assert all("outside the images directory" in str(e) for e in skipped[:3])
    assert "loop.png" in str(skipped[3])  # a symlink loop is one line too


def test_check_reports_symlinks_resolving_outside(tmp_path: Path) -> None:
    from mmtag.api import check

    images = _images_with_symlinks(tmp_path)
    path = write(tmp_path, HEADER + crlf(b"inside.png,1,x", b"evil.png,1,x"))
    report = check(path, images, progress=False)
    assert [e.row for e in report.bad_rows] == [2] and "outside" in str(report.bad_rows[0])
    assert report.missing_images == [] and report.corrupt_images == []

# ------------------------------------------------------------------ property-based fuzzing
def _encoded(fmt: str) -> bytes:
    import io

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if fmt == "gif-animated":
        frames = [Image.fromarray(rgb).convert("P"), Image.fromarray(255 - rgb).convert("P")]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    elif fmt == "png-rgba":
        Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(buf, "PNG")
    elif fmt == "png-16bit":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf, "PNG")
    elif fmt == "jpeg-cmyk":
        Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    else:
        Image.fromarray(rgb).save(buf, fmt.upper())
    return buf.getvalue()


_FORMATS = ["jpeg", "png", "bmp", "tiff", "webp", "gif-animated", "png-rgba", "png-16bit", "jpeg-cmyk"]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(_FORMATS), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=4),
       ext=st.sampled_from([".jpg", ".png", ".gif", ".bin"]))
def test_fuzz_damaged_images_decode_or_raise_value_error(tmp_path: Path, fmt: str, cut: float,
                                                         flips: list, ext: str) -> None:
    """Any format, truncated anywhere, with bytes flipped, under any extension: load_image gives
    a finite (3, S, S) array in [-1, 1] or a ValueError saying why — nothing else."""
    data = bytearray(_encoded(fmt))
    data = data[: max(0, int(len(data) * cut))] if cut < 0.98 else data
    for where, xor in flips:
        if data:
            data[int(where * (len(data) - 1))] ^= xor
    path = tmp_path / f"img{ext}"
    path.write_bytes(bytes(data))
    try:
        arr = load_image(path, 32)
    except ValueError as exc:
        assert str(exc)
        return
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert np.isfinite(arr).all() and arr.min() >= -1.0 and arr.max() <= 1.0

# ----------------------------------------------------------------------------------------------
# 4. Any image that cannot be decoded is one ImageDecodeError, whatever Pillow raised (issue 14)
# ----------------------------------------------------------------------------------------------

def _dds_with_unknown_pixel_format() -> bytes:
    """A DDS texture header with no pixel-format flags: Pillow's DDS plugin raises
    NotImplementedError when opening it (neither OSError nor ValueError)."""
    return b"DDS " + struct.pack("<I", 124) + struct.pack("<3I", 0, 4, 4) + bytes(108)


def _written(fmt: str) -> bytes | None:
    """A small seeded image written by Pillow in `fmt`, if Pillow can write it in some mode and
    identify it again from its content; else None."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (29, 37, 3), dtype=np.uint8))
    for mode in ("RGB", "L", "1", "F"):
        buf = io.BytesIO()
        try:
            rgb.convert(mode).save(buf, fmt)
            with Image.open(io.BytesIO(buf.getvalue())):
                return buf.getvalue()
        except Exception:  # this format cannot be written or identified in this mode
            continue
    return None


Image.init()
# Every format this Pillow can both write and identify by content, written once (seeded).
PILLOW_WRITTEN = {fmt: data for fmt in sorted(Image.SAVE) if (data := _written(fmt)) is not None}


def _identified(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return str(img.format)


def test_pillow_writes_and_identifies_every_supported_format() -> None:
    # the fuzzing below covers the supported formats, and many more that must be refused
    assert set(IMAGE_FORMATS) <= set(PILLOW_WRITTEN)
    assert len(PILLOW_WRITTEN) > len(IMAGE_FORMATS) + 5


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_supported_format_decodes_in_both_paths(tmp_path: Path, fmt: str) -> None:
    data = PILLOW_WRITTEN[fmt]
    path = tmp_path / "img.bin"  # the content decides, not the name
    path.write_bytes(data)
    assert_image_array(normalize_images(decode_image(path, 16)), 16)
    assert_image_array(normalize_images(decode_image(open_image_bytes(data), 16)), 16)


@pytest.mark.parametrize("fmt", sorted(f for f, d in PILLOW_WRITTEN.items()
                                       if _identified(d) not in IMAGE_FORMATS))
def test_formats_outside_image_formats_are_refused_in_both_paths(tmp_path: Path, fmt: str) -> None:
    """A valid PCX, TGA, DDS, EPS ... file named .jpg is not decoded: only the formats a user
    can mean reach a decoder."""
    data = PILLOW_WRITTEN[fmt]
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG"):
        decode_image(path, 16)
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG"):
        open_image_bytes(data)


def test_dds_named_jpg_whose_decoder_raises_not_implemented(tmp_path: Path) -> None:
    # found by fuzzing: Pillow's DDS plugin raises NotImplementedError, which escaped as a traceback
    path = tmp_path / "photo.jpg"
    path.write_bytes(_dds_with_unknown_pixel_format())
    with pytest.raises(ImageDecodeError):
        load_image(path, 16)
    with pytest.raises(ImageDecodeError):
        decode_image(open_image_bytes(path.read_bytes()), 16)


@pytest.mark.parametrize("exc", [NotImplementedError, AttributeError, TypeError, IndexError,
                                 KeyError, struct.error, EOFError, RuntimeError, ZeroDivisionError,
                                 MemoryError, Image.DecompressionBombError])
def test_decoder_raising_any_exception_type_is_an_image_decode_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[Exception]) -> None:
    """Pillow plugins raise many exception types on corrupt input; whichever one a decoder
    raises, every decode path says ImageDecodeError (a ValueError) with the reason."""
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    data = path.read_bytes()
    thumb = tmp_path / "b.png"
    thumb.write_bytes(data)

    def broken_load(self: object) -> None:
        raise exc("decoder bug")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    for decode in (lambda: decode_image(path, 16), lambda: load_image(path, 16),
                   lambda: decode_image(open_image_bytes(data), 16),
                   lambda: decode_thumbnail(thumb, 16)):
        with pytest.raises(ImageDecodeError) as info:
            decode()
        assert str(info.value)
        assert isinstance(info.value, ValueError)  # the contract serve and every caller rely on


class _TinyImageEncoder(ImageEncoder):
    """A weightless-fast stand-in for a real image encoder, to drive feature extraction."""

    name = "tiny-test-encoder"
    dim = 3
    image_size = 16
    channels_last = False

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.finalize()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.proj(images.flatten(2).transpose(1, 2))
        return tokens.mean(1), tokens


def _images_with_one_dds_named_jpg(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "c.jpg"):
        Image.new("RGB", (20, 20), (200, 10, 10)).save(images / name)
    (images / "b.jpg").write_bytes(_dds_with_unknown_pixel_format())
    csv_path = write(tmp_path, HEADER + crlf(b"a.jpg,1,x", b"b.jpg,2,y", b"c.jpg,3,z"))
    return csv_path, images


def test_extract_strict_and_skip_bad_on_an_image_whose_decoder_raises_oddly(tmp_path: Path) -> None:
    """The train/predict path: a decoder's NotImplementedError is a DataError naming file and
    row, and --skip-bad skips the row (before the fix it aborted even with --skip-bad)."""
    from mmtag.features import FeatureCache, extract

    csv_path, images = _images_with_one_dds_named_jpg(tmp_path)
    ds = read_csv(csv_path, images_dir=images).dataset
    enc = _TinyImageEncoder()
    run = dict(image_encoder=enc, text_encoder=None, workers=0, progress=False)
    with pytest.raises(DataError) as info:
        extract(ds, ["image"], cache=FeatureCache(tmp_path / "c1"), **run)
    assert_data_error(info.value, csv_path, 2, 3, "b.jpg")
    fs = extract(ds, ["image"], cache=FeatureCache(tmp_path / "c2"), skip_bad=True, **run)
    assert fs.dataset.image_ids == ["a.jpg", "c.jpg"]
    assert [(e.row, e.line) for e in fs.skipped] == [(2, 3)] and "b.jpg" in str(fs.skipped[0])
    assert fs.features["image"].shape == (2, 3)


def test_check_lists_an_image_whose_decoder_raises_oddly(tmp_path: Path) -> None:
    from mmtag.api import check

    csv_path, images = _images_with_one_dds_named_jpg(tmp_path)
    report = check(csv_path, images, progress=False)
    assert [e.row for e in report.corrupt_images] == [2] and "b.jpg" in str(report.corrupt_images[0])
    assert report.problems == 1


def test_decode_thumbnail_keeps_aspect_and_upright(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGBA", (400, 100), (0, 0, 0, 0)).save(path)
    thumb = decode_thumbnail(path, 180)
    assert thumb.mode == "RGB" and thumb.size == (180, 45)
    assert thumb.getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as for the model


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """`data` truncated anywhere (half the time) with up to 4 bytes flipped, half of them in the
    first 128 bytes, where the header tells Pillow which decoder to use and how."""
    out = bytearray(data[: int(rng.integers(0, len(data) + 1))] if rng.random() < 0.5 else data)
    for _ in range(int(rng.integers(0, 5))):
        if out:
            limit = min(len(out), 128) if rng.random() < 0.5 else len(out)
            out[int(rng.integers(0, limit))] ^= int(rng.integers(1, 256))
    return bytes(out)


@pytest.mark.parametrize("fmt", sorted(PILLOW_WRITTEN))
def test_fuzz_every_pillow_format_damaged_decodes_or_raises_image_decode_error(
        tmp_path: Path, fmt: str) -> None:
    """Every format Pillow can write and identify, damaged 60 seeded ways and named .jpg, through
    the training and prediction path (decode_image on a file) and the serving path
    (open_image_bytes, then decode_image): a (3, S, S) image or ImageDecodeError, nothing else."""
    rng = np.random.default_rng(sorted(PILLOW_WRITTEN).index(fmt))
    path = tmp_path / "img.jpg"
    for _ in range(60):
        data = _damaged(PILLOW_WRITTEN[fmt], rng)
        path.write_bytes(data)
        try:
            assert_image_array(normalize_images(decode_image(path, 32)), 32)
        except ImageDecodeError as exc:
            assert str(exc)
        try:
            img = open_image_bytes(data)
            assert_image_array(normalize_images(decode_image(img, 32)), 32)
        except ImageDecodeError as exc:
            assert str(exc)
