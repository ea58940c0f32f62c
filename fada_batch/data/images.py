"""Safe image handling: names that stay inside the image folder, any pixel mode to RGB.

- `index_images` lists a category's image folder once; `resolve_image` turns a name from the
  label sheet into a path, matching case-insensitively with or without the extension, and
  refuses names that leave the folder (``../``, absolute paths, links pointing outside).
- `load_image_rgb` opens one image for training: it checks the pixel count before decoding
  (decompression-bomb guard), verifies and fully loads the file (so truncated files fail
  here, not in the middle of a batch) and converts every mode to 8-bit RGB.
- `check_image` is the pre-flight version: the same checks, reported as `Problem`s.

Conversion rules (`to_rgb`):
- ``L``/``1``/``P``/``CMYK``/``YCbCr``: Pillow's own conversion.
- ``RGBA``/``LA``/``PA``/``P`` with transparency: composited on black (the background of
  an ultrasound scan), so transparent pixels become black rather than arbitrary colours.
- 16-bit grayscale (``I;16*``): scaled linearly from 0..65535 to 0..255 (Pillow's own
  ``convert("L")`` clips every value above 255 to white). ``I`` (32-bit) is treated the
  same when its values fit 0..65535, else stretched from its min..max; ``F`` likewise for
  0..1. Scaling is per format, not per image, so brightness is comparable across images.

Nothing here changes Pillow's global settings (no ``LOAD_TRUNCATED_IMAGES``, no
``MAX_IMAGE_PIXELS``); the limits are arguments.
"""

from __future__ import annotations

import difflib
import logging
import re
import unicodedata
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from fada_batch.data.problems import Problem, make_problem

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Ultrasound frames are about 1 MP. Over the soft limit an image is used but reported; over
# the hard limit it is refused. Pillow itself refuses over 2 * 89.5 MP whatever we say.
DEFAULT_WARN_PIXELS = 25_000_000
DEFAULT_MAX_PIXELS = 100_000_000

_EXT_LIST = ", ".join(IMAGE_EXTENSIONS)
_WS = re.compile(r"\s+")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class ImageError(Exception):
    """An image that cannot be used; `problem` says which, why and how to fix it."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def strip_image_extension(name: str) -> str:
    """`name` without a known image extension (any case); other suffixes are kept."""
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _norm(name: str) -> str:
    """Matching form of a name: one Unicode form, case-folded, whitespace runs collapsed,
    ends stripped. macOS writes file names decomposed (NFD: `e` + combining accent) while a
    sheet holds composed text (NFC: `é`); both give the same key (Unicode's canonical
    caseless match, NFD(casefold(NFD(x))), kept in NFC)."""
    folded = unicodedata.normalize("NFD", _WS.sub(" ", name).strip()).casefold()
    return unicodedata.normalize("NFC", folded)


def name_key(name: str) -> str:
    """The identity of an image name: `img_001`, `IMG_001.png` and `img_001.PNG` agree, and
    so do the composed and decomposed forms of `café.png`."""
    return _norm(strip_image_extension(name.strip()))


def index_images(image_dir: Path) -> dict[str, Path]:
    """Map each image in `image_dir` (not sub-folders) by lower-cased name and by stem.

    Keys are in matching form (case-folded, whitespace collapsed): ``"img_001.png"`` and
    ``"img_001"`` both map to ``image_dir / "IMG_001.PNG"``. A stem shared by several files
    (``a.png`` and ``a.jpg``) is left out, so a bare ``a`` is reported as ambiguous instead
    of picking one. Hidden files (``.DS_Store``, macOS ``._*`` copies) are skipped.

    Raises:
        OSError: when the folder cannot be listed.
    """
    files = sorted(
        p
        for p in image_dir.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    index: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        index.setdefault(_norm(path.name), path)
        by_stem[_norm(path.stem)].append(path)
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            index.setdefault(stem, paths[0])
    return index


def indexed_files(index: dict[str, Path]) -> list[Path]:
    """The distinct files of an index, sorted."""
    return sorted(set(index.values()))


def _is_unsafe_name(name: str) -> bool:
    """Absolute (POSIX, Windows drive or UNC) or containing a `..` component."""
    slashed = name.replace("\\", "/")
    if slashed.startswith("/") or _WINDOWS_DRIVE.match(name) or PureWindowsPath(name).anchor:
        return True
    return ".." in slashed.split("/")


def resolve_image(
    image_dir: Path,
    name: str,
    index: dict[str, Path],
    *,
    sheet: Path | None = None,
    row: int | None = None,
    suggest: bool = True,
) -> Path:
    """The file for image `name` from the label sheet, guaranteed inside `image_dir`.

    `name` matches case-insensitively, with or without an extension from `IMAGE_EXTENSIONS`.
    A name with a sub-folder (``sub/a.png``) is looked up there, still inside `image_dir`.

    Args:
        image_dir: the category's image folder.
        name: the image name as written in the sheet.
        index: `index_images(image_dir)`.
        sheet, row: where the name comes from, for the problem message.
        suggest: look for similar names when one is missing (slow on huge folders).

    Returns:
        The path inside `image_dir` (not resolved through links, for readable messages).

    Raises:
        ImageError: with code ``unsafe_image_name``, ``image_outside_folder``,
            ``image_missing`` or ``image_name_ambiguous``.
    """
    raw = name.strip()
    where = {"file": sheet, "row": row, "column": "Image Name", "value": name}
    if _is_unsafe_name(raw):
        raise ImageError(
            make_problem(
                "unsafe_image_name",
                f"The image name is an absolute path or contains '..', so it would leave the "
                f"image folder '{image_dir}'; the row is skipped.",
                fix="write only the file name (e.g. 'img_001.png') and put the file in the image folder.",
                **where,
            )
        )
    try:
        path = _lookup(image_dir, raw, index)
    except (OSError, ValueError):  # a name the file system refuses (too long, NUL byte)
        path = None
    if isinstance(path, list):
        raise ImageError(
            make_problem(
                "image_name_ambiguous",
                f"The name has no extension and matches several files in '{image_dir}': "
                f"{', '.join(p.name for p in path)}; the row is skipped.",
                fix="write the name with its extension in the sheet.",
                **where,
            )
        )
    if path is None:
        hint = _missing_hint(raw, index) if suggest else ""
        raise ImageError(
            make_problem(
                "image_missing",
                f"No such image in '{image_dir}' (names match case-insensitively, with or "
                f"without one of the extensions {_EXT_LIST}); the row is skipped.{hint}",
                fix="copy the image into that folder, or correct the name in the sheet.",
                **where,
            )
        )
    _check_inside(image_dir, path, where)
    return path


def _check_inside(image_dir: Path, path: Path, where: dict[str, Any]) -> None:
    """Refuse a file that resolves (through links) outside `image_dir`.

    Raises:
        ImageError: with code ``image_outside_folder``.
    """
    if path.parent == image_dir and not path.is_symlink():
        return  # a plain file right in the folder: inside, whatever the folder resolves to (one lstat, not two realpaths)
    root = image_dir.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a link loop: treat as leaving the folder
        real = path
        inside = False
    else:
        inside = real.is_relative_to(root)
    if not inside:
        raise ImageError(
            make_problem(
                "image_outside_folder",
                f"'{path}' is a link to '{real}', outside the image folder '{root}'; the row is skipped.",
                fix="copy the image into the image folder instead of linking to it.",
                **where,
            )
        )


def _lookup(image_dir: Path, raw: str, index: dict[str, Path]) -> Path | list[Path] | None:
    """The file for `raw`, the files a bare stem matches ambiguously, or None."""
    slashed = raw.replace("\\", "/")
    if "/" in slashed:
        candidate = image_dir.joinpath(*slashed.split("/"))
        if candidate.is_file():
            return candidate
        if candidate.suffix.lower() not in IMAGE_EXTENSIONS:
            matches = [
                candidate.with_name(candidate.name + ext)
                for ext in IMAGE_EXTENSIONS
                if candidate.with_name(candidate.name + ext).is_file()
            ]
            return matches[0] if len(matches) == 1 else matches or None
        return None
    key = _norm(raw)
    if key in index:
        return index[key]
    if strip_image_extension(raw) == raw:  # a bare stem: ambiguous if several files share it
        matches = [p for p in indexed_files(index) if _norm(p.stem) == key]
        if len(matches) > 1:
            return matches
    return None


def _missing_hint(raw: str, index: dict[str, Path]) -> str:
    """A sentence naming files that the user may have meant, or ''."""
    stem = name_key(raw)
    same_stem = [p.name for p in indexed_files(index) if _norm(p.stem) == stem]
    if same_stem:
        return f" A file with the same name but another extension exists: {', '.join(same_stem)}."
    names = sorted({p.name for p in index.values()})
    close = difflib.get_close_matches(raw, names, n=3, cutoff=0.8)
    if close:
        return f" Similar names on disk: {', '.join(close)}."
    return ""


def _size_problem(
    path: Path, size: tuple[int, int], *, max_pixels: int, warn_pixels: int, row: int | None
) -> Problem | None:
    width, height = size
    pixels = width * height
    listed = _listed(row)
    if pixels > max_pixels:
        return _file_problem(
            "image_too_large",
            f"The image{listed} is {width}x{height} = {pixels:,} pixels, over the limit of "
            f"{max_pixels:,} (a guard against decompression bombs); it is not used.",
            fix="downscale the image, or raise the pixel limit (max_image_pixels) if the size is genuine.",
            path=path,
            row=row,
        )
    if pixels > warn_pixels:
        return _file_problem(
            "image_large",
            f"The image{listed} is {width}x{height} = {pixels:,} pixels, over the soft "
            f"limit of {warn_pixels:,}; it is used, but loads slowly.",
            fix="nothing if intended; downscale the image to speed up training.",
            path=path,
            row=row,
        )
    return None


def _file_problem(code: str, what: str, *, fix: str, path: Path, row: int | None) -> Problem:
    """A problem located by an image file.

    `row` (the sheet row listing the image) is kept as a field and said in `what`, but not
    put after the image path in the message, where it would read as a row of the image.
    """
    return replace(make_problem(code, what, fix=fix, file=path), row=row)


def _listed(row: int | None) -> str:
    return f" (listed in row {row} of the label sheet)" if row is not None else ""


def _unreadable(path: Path, exc: BaseException, row: int | None) -> ImageError:
    return ImageError(
        _file_problem(
            "image_unreadable",
            f"The file{_listed(row)} cannot be read as an image "
            f"({type(exc).__name__}: {exc}); it is not used.",
            fix="copy or export the image again: it is corrupt, truncated or not an image.",
            path=path,
            row=row,
        )
    )


def _open_and_verify(path: Path, *, max_pixels: int, warn_pixels: int, row: int | None) -> Problem | None:
    """Check header, size and structure without decoding; the soft-limit warning or None.

    Raises:
        ImageError: unreadable, or over the hard pixel limit.
    """
    try:
        with warnings.catch_warnings():
            # Our limits decide; Pillow's own warning (over 89.5 MP) would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
                problem = _size_problem(path, size, max_pixels=max_pixels, warn_pixels=warn_pixels, row=row)
                if problem is not None and problem.code == "image_too_large":
                    raise ImageError(problem)
                im.verify()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses before we see the size: over twice its own limit.
        raise ImageError(
            _file_problem(
                "image_too_large",
                f"The image{_listed(row)} is far over the pixel limit ({exc}); it is not used.",
                fix="downscale the image; it may also be a decompression bomb.",
                path=path,
                row=row,
            )
        ) from exc
    except Exception as exc:  # Pillow raises many types for bad files; all mean unreadable
        raise _unreadable(path, exc, row) from exc
    return problem


def _decode(path: Path, *, row: int | None, fast: bool) -> Image.Image:
    """Fully decode the first frame and convert to RGB.

    With `fast`, JPEGs decode at 1/8 scale: still every byte is read, so truncation is
    caught, at a fraction of the cost.

    Raises:
        ImageError: unreadable or unsupported mode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if fast and im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                mode = im.mode
                try:
                    return to_rgb(im)
                except (ValueError, TypeError) as exc:
                    raise ImageError(
                        _file_problem(
                            "image_mode_unsupported",
                            f"The image{_listed(row)} has pixel mode {mode!r}, which cannot "
                            f"be converted to RGB ({exc}); it is not used.",
                            fix="save it as 8-bit RGB or grayscale PNG or JPEG.",
                            path=path,
                            row=row,
                        )
                    ) from exc
    except ImageError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc, row) from exc


def load_image_rgb(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    warn_pixels: int = DEFAULT_WARN_PIXELS,
) -> Image.Image:
    """Open an image for training as 8-bit RGB (see the module docstring for the rules).

    Args:
        path: the image file (already resolved with `resolve_image`).
        max_pixels: refuse images with more pixels than this.
        warn_pixels: log a warning for images with more pixels than this.

    Raises:
        ImageError: corrupt, truncated, over `max_pixels`, or an unsupported mode; its
            `problem` names the file and the fix.
    """
    soft = _open_and_verify(path, max_pixels=max_pixels, warn_pixels=warn_pixels, row=None)
    if soft is not None:
        logger.warning("%s", soft.message)
    return _decode(path, row=None, fast=False)


def check_image(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    warn_pixels: int = DEFAULT_WARN_PIXELS,
    row: int | None = None,
    decode: bool = True,
) -> list[Problem]:
    """Pre-flight check of one image; an empty list when it will load.

    Reads the header and verifies the file; with `decode` (the default) also decodes it,
    JPEGs at 1/8 scale, which is what catches truncated JPEGs and is cheap for ultrasound-
    sized frames.

    Args:
        path: the image file.
        max_pixels, warn_pixels: as for `load_image_rgb`.
        row: the label-sheet row listing the image, for the message.
        decode: also decode the pixels (slower, catches truncation in all formats).

    Returns:
        Problems: ``image_large`` alone means usable; any other code means not usable.
    """
    try:
        soft = _open_and_verify(path, max_pixels=max_pixels, warn_pixels=warn_pixels, row=row)
        if decode:
            _decode(path, row=row, fast=True)
    except ImageError as exc:
        return [exc.problem]
    return [] if soft is None else [soft]


def blocks_image(problem: Problem) -> bool:
    """True when `problem` means the image is not used (everything but ``image_large``)."""
    return problem.code != "image_large"


def to_rgb(im: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from a loaded image of any common mode.

    Raises:
        ValueError: for a mode Pillow cannot convert to RGB.
    """
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_8bit_gray(im).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grayscale image linearly to 8-bit ``L``."""
    arr = np.asarray(im).astype(np.float64)  # (H, W)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = 0.0, 65535.0
    if im.mode == "F":
        hi = 1.0
    if im.mode in ("I", "F") and arr.size and (arr.min() < lo or arr.max() > hi):
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        scaled = np.zeros_like(arr)
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)  # clip only guards rounding
    return Image.fromarray(out)
