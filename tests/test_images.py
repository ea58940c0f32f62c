"""Safe image handling: name matching, containment, pixel modes, corrupt and huge files.

Images are real PNG/JPEG/TIFF files written with Pillow into a folder whose path has spaces.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fada_batch.data.images import (
    ImageError,
    check_image,
    index_images,
    load_image_rgb,
    name_key,
    resolve_image,
    to_rgb,
)


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "it's my data" / "Fetal Ultrasound" / "Femur"
    folder.mkdir(parents=True)
    return folder


def save(
    path: Path, mode: str = "L", size: tuple[int, int] = (8, 6), color: object = 128, **kw: object
) -> Path:
    Image.new(mode, size, color).save(path, **kw)
    return path


def error_of(call) -> ImageError:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageError) as info:
        call()
    return info.value


# ----------------------------------------------------------------------------- names


def test_index_maps_names_and_stems_case_insensitively(image_dir: Path) -> None:
    a = save(image_dir / "IMG_001.PNG")
    b = save(image_dir / "scan  two.jpg")
    save(image_dir / ".DS_Store.png")
    save(image_dir / "._IMG_001.PNG")
    (image_dir / "notes.txt").write_text("not an image")
    (image_dir / "sub.png").mkdir()
    index = index_images(image_dir)
    assert index == {"img_001.png": a, "img_001": a, "scan two.jpg": b, "scan two": b}


def test_resolve_with_and_without_extension(image_dir: Path) -> None:
    a = save(image_dir / "img_001.png")
    b = save(image_dir / "Scan_002.JPEG")
    index = index_images(image_dir)
    for name in ("img_001", "img_001.png", "IMG_001.PNG", "  img_001 "):
        assert resolve_image(image_dir, name, index) == a
    for name in ("scan_002", "Scan_002.jpeg", "SCAN_002.JPEG"):
        assert resolve_image(image_dir, name, index) == b


def test_name_key() -> None:
    assert name_key(" IMG_001.PNG ") == name_key("img_001") == "img_001"
    assert name_key("img.001") == "img.001"


def test_missing_image_names_the_sheet_row_and_a_close_match(image_dir: Path) -> None:
    save(image_dir / "img_0001.png")
    sheet = image_dir.parent.parent / "Fetal Ultrasound Labeled" / "Femur_image_list.xlsx"
    exc = error_of(
        lambda: resolve_image(image_dir, "img_001.png", index_images(image_dir), sheet=sheet, row=7)
    )
    p = exc.problem
    assert (p.code, p.severity, p.row, p.column, p.value) == (
        "image_missing",
        "warning",
        7,
        "Image Name",
        "img_001.png",
    )
    assert "Femur_image_list.xlsx, row 7, column 'Image Name'" in p.message
    assert str(image_dir) in p.message and "row is skipped" in p.message
    assert "Similar names on disk: img_0001.png" in p.message
    assert "copy the image into that folder, or correct the name" in p.message
    assert str(exc) == p.message


def test_missing_image_with_another_extension_on_disk(image_dir: Path) -> None:
    save(image_dir / "img_001.jpg")
    p = error_of(lambda: resolve_image(image_dir, "img_001.png", index_images(image_dir))).problem
    assert p.code == "image_missing" and "same name but another extension exists: img_001.jpg" in p.message


def test_bare_stem_matching_two_files_is_ambiguous(image_dir: Path) -> None:
    save(image_dir / "img_001.png")
    save(image_dir / "img_001.jpg")
    index = index_images(image_dir)
    p = error_of(lambda: resolve_image(image_dir, "img_001", index)).problem
    assert p.code == "image_name_ambiguous" and "img_001.jpg, img_001.png" in p.message
    assert "write the name with its extension" in p.message
    assert resolve_image(image_dir, "img_001.jpg", index).name == "img_001.jpg"


@pytest.mark.parametrize("name", ["../secret.png", "..\\secret.png", "sub/../../secret.png", "../secret"])
def test_parent_directory_names_are_refused(image_dir: Path, name: str) -> None:
    save(image_dir.parent / "secret.png")
    p = error_of(lambda: resolve_image(image_dir, name, index_images(image_dir), row=3)).problem
    assert (p.code, p.severity, p.row, p.value) == ("unsafe_image_name", "warning", 3, name)
    assert "'..'" in p.message and "leave the image folder" in p.message
    assert "write only the file name" in p.message


@pytest.mark.parametrize("absolute", [True, False])
def test_absolute_paths_are_refused(image_dir: Path, absolute: bool) -> None:
    target = save(image_dir / "img_001.png")  # even a path into the folder itself
    name = str(target) if absolute else "C:\\data\\img_001.png"
    p = error_of(lambda: resolve_image(image_dir, name, index_images(image_dir))).problem
    assert p.code == "unsafe_image_name" and "absolute path" in p.message


def test_symlink_pointing_outside_is_refused(image_dir: Path) -> None:
    outside = save(image_dir.parent / "elsewhere.png")
    inside = save(image_dir / "real.png")
    (image_dir / "link_out.png").symlink_to(outside)
    (image_dir / "link_in.png").symlink_to(inside)
    index = index_images(image_dir)
    p = error_of(lambda: resolve_image(image_dir, "link_out", index, row=4)).problem
    assert (p.code, p.severity, p.row) == ("image_outside_folder", "warning", 4)
    assert "link_out.png" in p.message and "elsewhere.png" in p.message
    assert "copy the image into the image folder instead of linking" in p.message
    assert resolve_image(image_dir, "link_in", index) == image_dir / "link_in.png"


def test_subfolder_names_stay_inside(image_dir: Path) -> None:
    (image_dir / "batch 2").mkdir()
    a = save(image_dir / "batch 2" / "img_009.png")
    assert resolve_image(image_dir, "batch 2/img_009", index_images(image_dir)) == a
    assert resolve_image(image_dir, "batch 2\\img_009.png", index_images(image_dir)) == a


# ----------------------------------------------------------------------------- modes


def rgb_array(path: Path) -> np.ndarray:
    im = load_image_rgb(path)
    assert im.mode == "RGB"
    return np.asarray(im)


def test_16bit_grayscale_is_scaled_not_clipped(image_dir: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = image_dir / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    out = rgb_array(path)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_tiff_big_endian(image_dir: Path) -> None:
    path = image_dir / "deep.tif"
    values = np.array([0, 65535, 4096], dtype=">u2")
    Image.frombytes("I;16B", (3, 1), values.tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    assert rgb_array(path)[0, :, 0].tolist() == [0, 255, 16]


def test_32bit_integer_modes() -> None:
    in_range = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert in_range.mode == "I"
    assert np.asarray(to_rgb(in_range))[0, :, 0].tolist() == [0, 255]
    signed = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))  # stretched min..max
    assert np.asarray(to_rgb(signed))[0, :, 0].tolist() in ([0, 127, 255], [0, 128, 255])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_palette(image_dir: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(image_dir / "pal.png")
    assert rgb_array(image_dir / "pal.png")[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_palette_with_transparency_is_composited_on_black(image_dir: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(image_dir / "pal_t.png", transparency=1)
    assert rgb_array(image_dir / "pal_t.png")[0].tolist() == [[255, 0, 0], [0, 0, 0]]


def test_rgba_and_la_are_composited_on_black(image_dir: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 100, 50, 255), (200, 100, 50, 0), (200, 100, 50, 128)])
    rgba.save(image_dir / "rgba.png")
    assert rgb_array(image_dir / "rgba.png")[0].tolist() == [[200, 100, 50], [0, 0, 0], [100, 50, 25]]
    save(image_dir / "la.png", "LA", (1, 1), (200, 128))
    assert rgb_array(image_dir / "la.png")[0, 0].tolist() == [100, 100, 100]


def test_cmyk_jpeg_and_tiff(image_dir: Path) -> None:
    save(image_dir / "cmyk.jpg", "CMYK", (8, 8), (0, 255, 255, 0), quality=100)
    red = rgb_array(image_dir / "cmyk.jpg")[0, 0]
    assert red[0] >= 250 and red[1] <= 5 and red[2] <= 5
    save(image_dir / "cmyk.tif", "CMYK", (2, 2), (0, 0, 0, 255))
    assert rgb_array(image_dir / "cmyk.tif")[0, 0].tolist() == [0, 0, 0]


def test_gray_bilevel_and_rgb(image_dir: Path) -> None:
    save(image_dir / "gray.png", "L", (2, 2), 77)
    assert rgb_array(image_dir / "gray.png")[0, 0].tolist() == [77, 77, 77]
    save(image_dir / "bw.bmp", "1", (2, 2), 1)
    assert rgb_array(image_dir / "bw.bmp")[0, 0].tolist() == [255, 255, 255]
    save(image_dir / "rgb.png", "RGB", (2, 2), (1, 2, 3))
    assert rgb_array(image_dir / "rgb.png")[0, 0].tolist() == [1, 2, 3]


def test_unconvertible_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        to_rgb(Image.new("La", (1, 1)))


# ----------------------------------------------------------------------------- broken files


def test_corrupt_file(image_dir: Path) -> None:
    path = image_dir / "garbage.png"
    path.write_bytes(b"\x89PNG but not really" + os.urandom(64))
    exc = error_of(lambda: load_image_rgb(path))
    p = exc.problem
    assert (p.code, p.severity, p.file) == ("image_unreadable", "warning", str(path))
    assert "garbage.png" in p.message and "cannot be read as an image" in p.message
    assert "copy or export the image again" in p.message
    (found,) = check_image(path, row=9)
    assert found.code == "image_unreadable" and "listed in row 9" in found.message and found.row == 9


def _encoded(fmt: str, mode: str = "L", size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(image_dir: Path, fmt: str, suffix: str) -> None:
    data = _encoded(fmt)
    path = image_dir / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    p = error_of(lambda: load_image_rgb(path)).problem
    assert p.code == "image_unreadable" and "cut" in p.message
    assert [q.code for q in check_image(path)] == ["image_unreadable"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_good_file_passes_the_check(image_dir: Path) -> None:
    path = image_dir / "ok.jpg"
    path.write_bytes(_encoded("JPEG", "RGB", (320, 240)))
    assert check_image(path) == []
    assert load_image_rgb(path).size == (320, 240)


def test_image_over_the_hard_limit(image_dir: Path) -> None:
    path = save(image_dir / "big.png", "L", (400, 300))
    p = error_of(lambda: load_image_rgb(path, max_pixels=100_000)).problem
    assert (p.code, p.severity) == ("image_too_large", "warning")
    assert "400x300 = 120,000 pixels, over the limit of 100,000" in p.message
    assert "big.png" in p.message and "raise the pixel limit (max_image_pixels)" in p.message
    assert [q.code for q in check_image(path, max_pixels=100_000)] == ["image_too_large"]


def test_image_over_the_soft_limit_is_used_with_a_warning(
    image_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save(image_dir / "large.png", "L", (400, 300))
    with caplog.at_level(logging.WARNING, logger="fada_batch.data.images"):
        assert load_image_rgb(path, warn_pixels=100_000).size == (400, 300)
    assert "over the soft limit of 100,000" in caplog.text
    (p,) = check_image(path, warn_pixels=100_000)
    assert (p.code, p.severity) == ("image_large", "warning") and "it is used" in p.message


def test_decompression_bomb_header_is_refused_without_decoding(image_dir: Path) -> None:
    """A tiny PNG whose header claims 50000 x 50000 pixels (2.5 GP)."""
    data = bytearray(_encoded("PNG", "L", (10, 10)))
    data[16:24] = struct.pack(">II", 50_000, 50_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path = image_dir / "bomb.png"
    path.write_bytes(bytes(data))
    max_before = Image.MAX_IMAGE_PIXELS
    p = error_of(lambda: load_image_rgb(path)).problem
    assert p.code == "image_too_large" and "bomb.png" in p.message
    assert [q.code for q in check_image(path)] == ["image_too_large"]
    # Under a raised limit, Pillow's own guard still refuses; the global stays untouched.
    assert error_of(lambda: load_image_rgb(path, max_pixels=10**10)).problem.code == "image_too_large"
    assert max_before == Image.MAX_IMAGE_PIXELS


def test_missing_file_is_unreadable(image_dir: Path) -> None:
    p = error_of(lambda: load_image_rgb(image_dir / "gone.png")).problem
    assert p.code == "image_unreadable" and "gone.png" in p.message
