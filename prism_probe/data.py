"""Images in: sources, robust decoding, per-encoder preprocessing and batches.

The path from a user's images to the tensors an encoder sees, in four steps:

1. :func:`collect_images` turns a source (a folder, a glob pattern, a text file of paths, a list
   of paths, or ``None`` for the photos bundled with scikit-image) into an :class:`ImageList`: a
   fixed, ordered list of files with a content digest that profiles record.
2. :func:`read_image` decodes one file into an 8-bit RGB :class:`PIL.Image.Image`, whatever it
   holds (EXIF rotation, CMYK, grayscale, palette with transparency, alpha, 16-bit), or raises
   :class:`~prism_probe.errors.ImageReadError` naming the file and the reason.
3. :class:`Preprocess` resizes, crops and normalises one image into a (3, H, W) float tensor the
   way a given encoder expects.
4. :func:`iterate_batches` decodes an :class:`ImageList` (in-process or in DataLoader workers,
   sharded over ranks) into :class:`Batch` objects, skipping and naming unreadable files.

:func:`load_image_folder` reads the ImageFolder layout (one folder per class) for the probes.

Importing this module, :func:`collect_images` and :func:`read_image` need no torch; only
:meth:`Preprocess.__call__` and :func:`iterate_batches` import it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .errors import ImageReadError, ImageSourceError, NoImagesError, PreprocessError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_BACKGROUND",
    "SKIMAGE_PHOTOS",
    "ImageList",
    "collect_images",
    "read_image",
    "to_rgb",
    "Preprocess",
    "Batch",
    "BatchStream",
    "iterate_batches",
    "shard_indices",
    "load_image_folder",
    "ImageReadError",
    "ImageSourceError",
    "NoImagesError",
    "PreprocessError",
]

log = logging.getLogger(__name__)

#: File name endings (compared lower-case) that :func:`collect_images` treats as images.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)

#: Default decompression-bomb guard: Pillow's own warning threshold (about 89 M pixels) doubled,
#: which is where Pillow itself refuses to open a file.
DEFAULT_MAX_PIXELS = 178_956_970

#: Colour that transparent pixels are composited onto. Mid-grey sits near the ImageNet mean, so
#: after normalisation the background is close to zero and adds little spurious energy; white
#: or black would put a strong step at every object edge.
DEFAULT_BACKGROUND = (128, 128, 128)

#: Natural photos (colour and gray) shipped inside scikit-image's ``skimage/data`` folder, used
#: when no source is given. Charts, text, synthetic test patterns and silhouettes are left out;
#: ``motorcycle_right`` is left out because it is the other half of a stereo pair.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "retina.jpg", "rocket.jpg",
)

_GLOB_CHARS = frozenset("*?[")
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageList(Sequence):
    """An ordered, fixed list of image files and where it came from.

    It behaves as a sequence of :class:`~pathlib.Path`; positions in it are the ``indices`` that
    :class:`Batch` reports.

    Attributes
    ----------
    paths : tuple of Path
        The image files, absolute, in the order batches will follow.
    source : str
        A one-line description of the source (folder, pattern or list file, and any subsample),
        for logs and profiles.
    root : Path or None
        The folder that :attr:`names` are relative to (the source folder, or the deepest folder
        holding every file).
    digest : str
        ``sha256`` hex digest of the sorted list of the files' own sha256 digests (one per line).
        It depends only on the files' contents, counted with multiplicity: the same images under
        other names, in another folder or in another order give the same digest; any changed,
        added or removed image changes it. Profiles use it to tell whether two runs saw the same
        image set.
    duplicates : tuple of tuple of str
        Groups of :attr:`names` whose contents are identical (first one first). Duplicates are
        kept in :attr:`paths` unless ``dedupe=True`` was asked, in which case only the first of
        each group remains and the groups say what was dropped.
    missing : tuple of (Path, str)
        Entries of a list (text file or sequence) that do not exist or are not files, with the
        reason. They are not in :attr:`paths`; :class:`BatchStream` reports them with the
        skipped files.
    """

    paths: tuple[Path, ...]
    source: str
    root: Path | None = None
    digest: str = ""
    duplicates: tuple[tuple[str, ...], ...] = ()
    missing: tuple[tuple[Path, str], ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        return self.paths[i]

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    @property
    def names(self) -> list[str]:
        """The paths relative to :attr:`root` (POSIX separators), or absolute without a root."""
        return [_relative_name(p, self.root) for p in self.paths]

    @property
    def n_duplicates(self) -> int:
        """How many files are extra copies of another one (each group counts all but one)."""
        return sum(len(group) - 1 for group in self.duplicates)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary for profiles (no per-file list: that can be large)."""
        return {
            "source": self.source,
            "n_images": len(self.paths),
            "digest": self.digest,
            "n_duplicates": self.n_duplicates,
            "n_missing": len(self.missing),
        }


def collect_images(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None,
    *,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    dedupe: bool = False,
) -> ImageList:
    """Collect image files from a source into a fixed, ordered :class:`ImageList`.

    Parameters
    ----------
    source : str, path, sequence of paths, or None
        One of:

        - a folder: every file below it (recursively) whose name ends in one of
          :data:`IMAGE_EXTENSIONS` (case-insensitive), in sorted path order. Hidden files and
          folders (name starting with ``.``, such as macOS ``._photo.jpg`` resource forks) are
          left out.
        - a glob pattern (``"photos/**/*.jpg"``, ``**`` recursive), matches in sorted order.
        - a single image file.
        - a text file of paths, one per line; relative paths are taken from the text file's
          folder; blank lines and lines starting with ``#`` are ignored.
        - a sequence of paths (relative ones from the current folder).
        - ``None``: the natural photos bundled with scikit-image (:data:`SKIMAGE_PHOTOS`), read
          from the installed package; nothing is downloaded.

        Entries of a text file or a sequence that do not exist are not an error: they are
        recorded in :attr:`ImageList.missing` (and logged), and reported with the skipped files,
        so one stale line does not stop a long run. A source that yields no file at all is an
        error.
    limit : int, optional
        Keep at most this many images: a subsample drawn with ``seed``, kept in the source's
        order. The same source, limit and seed always give the same files.
    seed : int
        Seed for the subsample and for ``shuffle``.
    shuffle : bool
        Put the (subsampled) images in a seeded random order instead of the source's order.
    dedupe : bool
        Drop files whose content equals an earlier file's (before the subsample, so ``limit``
        counts distinct images). Without it, duplicates are kept and reported.

    Returns
    -------
    ImageList
        Paths, digest, duplicate groups, missing entries and a description of the source.

    Raises
    ------
    ImageSourceError
        The source does not exist, is of an unknown kind, or ``limit`` is not positive.
    NoImagesError
        The source holds no image file.

    Notes
    -----
    Every selected file is read once to hash it (for the digest and the duplicate check); with
    ``dedupe=False`` only the files kept by ``limit`` are read. Duplicates are therefore looked
    for among the selected files unless ``dedupe=True``.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ImageSourceError(f"limit={limit!r} is not a positive integer; pass e.g. --limit 100")

    paths, root, description, missing = _resolve_source(source)
    if not paths and missing:
        first, reason = missing[0]
        raise NoImagesError(
            f"none of the {len(missing)} files named in {description} can be read (first: "
            f"{first}: {reason}); paths in a list file are taken relative to the list's folder"
        )
    if not paths:
        where = description
        raise NoImagesError(
            f"no image files in {where}; expected files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} (point the source at a folder of images)"
        )

    hashes: list[str] | None = None
    duplicates: tuple[tuple[str, ...], ...] = ()
    if dedupe:
        hashes = [_file_sha256(p) for p in paths]
        duplicates = _duplicate_groups(paths, hashes, root)
        keep = _first_occurrences(hashes)
        paths = [paths[i] for i in keep]
        hashes = [hashes[i] for i in keep]

    n_found = len(paths)
    if limit is not None and limit < n_found:
        chosen = sorted(random.Random(seed).sample(range(n_found), limit))
        paths = [paths[i] for i in chosen]
        if hashes is not None:
            hashes = [hashes[i] for i in chosen]
        description += f", {limit} of {n_found} (seed {seed})"
    if shuffle:
        # A separate stream from the subsample's, so that shuffling does not change which files
        # a given limit and seed select.
        order = list(range(len(paths)))
        random.Random(f"shuffle-{seed}").shuffle(order)
        paths = [paths[i] for i in order]
        if hashes is not None:
            hashes = [hashes[i] for i in order]
        description += f", shuffled (seed {seed})"

    if hashes is None:
        hashes = [_file_sha256(p) for p in paths]
        duplicates = _duplicate_groups(paths, hashes, root)
    if dedupe and duplicates:
        description += f", {sum(len(g) - 1 for g in duplicates)} duplicates dropped"

    digest = hashlib.sha256("".join(h + "\n" for h in sorted(hashes)).encode()).hexdigest()
    images = ImageList(
        paths=tuple(paths),
        source=description,
        root=root,
        digest=digest,
        duplicates=duplicates,
        missing=tuple(missing),
    )

    log.info("%d images from %s", len(images), description)
    if duplicates:
        log.warning(
            "%d duplicate file(s) %s: %s",
            images.n_duplicates,
            "dropped" if dedupe else "kept (pass dedupe=True to drop them)",
            "; ".join(" = ".join(g) for g in duplicates[:5])
            + (" ..." if len(duplicates) > 5 else ""),
        )
    for path, reason in missing[:5]:
        log.warning("missing image %s: %s", path, reason)
    if len(missing) > 5:
        log.warning("... and %d more missing images", len(missing) - 5)
    return images


def _resolve_source(source) -> tuple[list[Path], Path | None, str, list[tuple[Path, str]]]:
    """Turn any accepted source into (paths, root, description, missing)."""
    if source is None:
        return _skimage_photos()

    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            root = path.resolve()
            return _scan_folder(root), root, f"folder {root}", []
        if path.is_file():
            if _is_image_name(path):
                resolved = path.resolve()
                return [resolved], resolved.parent, f"file {resolved}", []
            return _read_list_file(path.resolve())
        if _GLOB_CHARS & set(text):
            matches = sorted(
                Path(m).resolve()
                for m in glob.glob(os.path.expanduser(text), recursive=True)
                if _is_image_name(Path(m)) and Path(m).is_file()
            )
            return matches, _common_folder(matches), f"pattern {text!r}", []
        raise ImageSourceError(
            f"image source {text!r} does not exist; pass a folder, a glob pattern, "
            "a text file of paths, or a list of paths"
        )

    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        entries = []
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise ImageSourceError(
                    f"image list entry {item!r} is not a path; pass a list of str or Path"
                )
            entries.append(Path(item).expanduser())
        paths, missing = _check_entries(entries, "in the list")
        return paths, _common_folder(paths), f"list of {len(entries)} paths", missing

    raise ImageSourceError(
        f"image source of type {type(source).__name__} is not supported; pass a folder, a glob "
        "pattern, a text file of paths, a list of paths, or None for the bundled photos"
    )


def _skimage_photos() -> tuple[list[Path], Path | None, str, list[tuple[Path, str]]]:
    """The bundled scikit-image photos, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImageSourceError(
            "no image source given and scikit-image is not installed; pass a folder of images "
            "or install scikit-image for its bundled photos"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = [folder / name for name in SKIMAGE_PHOTOS if (folder / name).is_file()]
    return paths, folder, f"scikit-image photos in {folder}", []


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _scan_folder(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Pruning in place stops os.walk from descending into hidden folders (.git, .cache).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _read_list_file(list_file: Path):
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageSourceError(
            f"cannot read the list of images {list_file} ({exc}); pass a UTF-8 text file with "
            "one image path per line"
        ) from None

    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line).expanduser()
        entries.append(entry if entry.is_absolute() else list_file.parent / entry)
    paths, missing = _check_entries(entries, f"listed in {list_file.name}")
    return paths, _common_folder(paths), f"list {list_file}", missing


def _check_entries(entries: list[Path], where: str):
    paths, missing = [], []
    for entry in entries:
        if entry.is_file():
            paths.append(entry.resolve())
        elif entry.exists():
            missing.append((entry, f"{where} but is not a file"))
        else:
            missing.append((entry, f"{where} but not found"))
    return paths, missing


def _common_folder(paths: Sequence[Path]) -> Path | None:
    if not paths:
        return None
    try:
        return Path(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError:  # different drives on Windows
        return None


def _relative_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    except OSError:
        # An unreadable file still needs a stable entry; decoding will skip and name it later.
        return hashlib.sha256(f"unreadable:{path}".encode()).hexdigest()
    return digest.hexdigest()


def _first_occurrences(hashes: Sequence[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, h in enumerate(hashes):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return keep


def _duplicate_groups(paths, hashes, root) -> tuple[tuple[str, ...], ...]:
    groups: dict[str, list[str]] = {}
    for path, h in zip(paths, hashes):
        groups.setdefault(h, []).append(_relative_name(path, root))
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transposition that shows the photo upright.
_ORIENTATION_OPS = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def read_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: int | tuple[int, int] | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB image.

    Parameters
    ----------
    path : str or path
        The image file.
    max_pixels : int or None
        Decompression-bomb guard: refuse files whose header claims more pixels than this
        (checked before anything is decoded). ``None`` turns the guard off, but Pillow's own
        hard limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``) still applies.
    target_size : int or (h, w), optional
        The smallest size the caller needs, in upright orientation. JPEGs are then decoded at a
        reduced scale (1/2, 1/4 or 1/8, through Pillow's ``draft``) as long as both sides stay
        at least this large, so a later antialiased resize still downsamples. Other formats
        ignore it.
    background : (r, g, b)
        Colour that transparent pixels are composited onto (default mid-grey,
        :data:`DEFAULT_BACKGROUND`).

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, loaded, EXIF orientation applied. See :func:`to_rgb` for how each mode
        is converted. Multi-frame files (GIF, TIFF) give their first frame.

    Raises
    ------
    ImageReadError
        The file is missing, empty, not an image, truncated, corrupt, in an unsupported mode,
        or larger than ``max_pixels``. The message names the file and the reason.

    Notes
    -----
    Embedded ICC colour profiles are not applied: pixel values are taken as sRGB, so colours of
    Adobe RGB or profiled CMYK files are approximate.
    """
    path = Path(path)
    want = _as_hw(target_size, "target_size") if target_size is not None else None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found; check the path") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes); remove it or re-download it")

    try:
        with warnings.catch_warnings():
            # The pixel guard below replaces Pillow's warning with an error the caller can skip.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Damaged metadata (e.g. "Corrupt EXIF data") warns once per file; the pixels are
            # still usable, and a batch run over thousands of files should not print each one.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(path) as im:
                return _decode(im, path, max_pixels, want, background)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: refused as a decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not an image Pillow can identify (wrong extension, or not an image file)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise ImageReadError(f"{path}: cannot be decoded: {reason}") from None


def _decode(im, path: Path, max_pixels, want, background) -> Image.Image:
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageReadError(f"{path}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            f"{path}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(decompression-bomb guard); raise max_pixels if the file is trusted"
        )

    orientation = _orientation(im)
    # MPO (multi-picture JPEG, common from phone cameras) decodes its first frame as a JPEG.
    if want is not None and im.format in ("JPEG", "MPO"):
        h, w = want
        if orientation in (5, 6, 7, 8):  # stored sideways: the stored width is the upright height
            h, w = w, h
        # draft() keeps both sides >= the requested (w, h), so the image is never decoded below
        # the size the antialiased resize needs.
        im.draft(None, (w, h))

    im.load()  # Multi-frame files open on their first frame, which is the one kept.
    for op in _ORIENTATION_OPS.get(orientation, ()):
        im = im.transpose(op)
    return to_rgb(im, background=background, name=str(path))


def _orientation(im) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
        return 1
    return value if value in _ORIENTATION_OPS else 1


def to_rgb(
    im: Image.Image, *, background: tuple[int, int, int] = DEFAULT_BACKGROUND, name: str = "image"
) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB.

    Parameters
    ----------
    im : PIL.Image.Image
        A loaded image.
    background : (r, g, b)
        Colour transparent pixels are composited onto.
    name : str
        How to name the image in an error message.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``.

    Notes
    -----
    - ``RGBA``, ``LA``, ``PA``, and ``P`` / ``L`` / ``RGB`` with a transparency entry: alpha
      composited onto ``background`` (``out = a·fg + (1 − a)·bg``).
    - ``CMYK``: Pillow's conversion, ``R = (255 − K)(1 − C/255)`` and likewise for G, B (no ICC).
    - ``I;16*`` (16-bit PNG/TIFF): scaled by the nominal range, ``v8 = round(v16 / 257)``, so
      65535 → 255 and 32896 → 128 (never clipped at 255). ``I`` (32-bit integer): the same if
      every value lies in 0…65535, otherwise rescaled from its own min…max. ``F`` (float): ×255
      if every value lies in 0…1, otherwise rescaled from its own min…max.
    - ``L``, ``1``, ``YCbCr``, ``RGBX`` and other modes: Pillow's ``convert("RGB")``.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(im)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageReadError(f"{name}: image mode {mode!r} cannot be converted to RGB ({exc})")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    import numpy as np

    values = np.asarray(im)
    if values.ndim == 3:  # e.g. "I;16" RGB variants some plugins produce
        values = values[..., :3]
    values = values.astype(np.float64)
    if im.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        lo, hi = float(values.min()), float(values.max())
        nominal_hi = 65535.0 if im.mode.startswith("I") else 1.0
        if lo >= 0.0 and hi <= nominal_hi:
            scaled = values * (255.0 / nominal_hi)
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return gray.convert("RGB")


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

_RESIZE_MODES = ("shorter", "squash", "none")
_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """How one encoder wants its images: size, resize rule, interpolation and value scaling.

    Calling it maps a PIL image to a float32 tensor (3, H, W).

    Parameters
    ----------
    size : int or (h, w)
        Output size in pixels; an int means square. Non-square sizes are allowed: (448, 224)
        for a patch-14 model gives a 32 × 16 token grid.
    resize : {"shorter", "squash", "none"}
        ``"shorter"``: scale (keeping the aspect ratio, antialiased) so the image just covers
        ``size / crop_pct``, then center-crop ``size``. For a square size this is "resize the
        shorter side to ``floor(size / crop_pct)``", as timm and torchvision do.
        ``"squash"``: resize to exactly ``floor(size / crop_pct)`` ignoring the aspect ratio,
        then center-crop ``size`` (with ``crop_pct=1``: resize to exactly ``size``; timm's
        ``crop_mode="squash"``).
        ``"none"``: no resizing; an image of any other size raises :class:`PreprocessError`
        (which :func:`iterate_batches` reports as a skipped file).
    crop_pct : float
        Fraction of the resized image kept by the center crop, in (0, 1].
    interpolation : {"bicubic", "bilinear"}
        Resampling filter. Pillow widens the filter when downsampling, so every resize is
        antialiased.
    mean, std : 3 floats, optional
        Per-channel normalisation applied after scaling to [0, 1]: ``(x − mean) / std``.
    value_range : (lo, hi), optional
        Instead of mean/std, map [0, 1] linearly onto [lo, hi]: (-1, 1) for diffusers VAEs,
        (0, 1) for tiny autoencoders. With neither given, values stay in [0, 1].
    """

    size: int | tuple[int, int]
    resize: str = "shorter"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise fields once so that equality and to_dict() are canonical.
        set_ = object.__setattr__
        set_(self, "size", _as_hw(self.size, "Preprocess size"))
        if self.resize not in _RESIZE_MODES:
            raise PreprocessError(
                f"Preprocess resize={self.resize!r} is not one of {', '.join(_RESIZE_MODES)}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise PreprocessError(
                f"Preprocess interpolation={self.interpolation!r} is not supported; "
                f"use one of {', '.join(_INTERPOLATIONS)}"
            )
        crop = float(self.crop_pct)
        if not (0.0 < crop <= 1.0):
            raise PreprocessError(
                f"Preprocess crop_pct={self.crop_pct!r} must lie in (0, 1]; 1.0 keeps the whole "
                "resized image"
            )
        set_(self, "crop_pct", crop)
        if (self.mean is None) != (self.std is None):
            raise PreprocessError("Preprocess needs both mean and std, or neither")
        if self.mean is not None and self.value_range is not None:
            raise PreprocessError(
                "Preprocess takes mean/std or value_range, not both; value_range=(-1, 1) is "
                "the same as mean=std=(0.5, 0.5, 0.5)"
            )
        if self.mean is not None:
            set_(self, "mean", _three_floats(self.mean, "mean"))
            set_(self, "std", _three_floats(self.std, "std"))
            if any(s <= 0 for s in self.std):
                raise PreprocessError(f"Preprocess std={self.std} must be positive")
        if self.value_range is not None:
            vr = tuple(float(v) for v in self.value_range)
            if len(vr) != 2 or not vr[0] < vr[1]:
                raise PreprocessError(
                    f"Preprocess value_range={self.value_range!r} must be (lo, hi) with lo < hi"
                )
            set_(self, "value_range", vr)

    @property
    def scale_size(self) -> tuple[int, int]:
        """(h, w) the image is resized to before the center crop: ``floor(size / crop_pct)``."""
        h, w = self.size  # type: ignore[misc]
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)

    @property
    def decode_hint(self) -> tuple[int, int] | None:
        """Smallest (h, w) a decoder may reduce the image to (``target_size`` of read_image)."""
        return None if self.resize == "none" else self.scale_size

    def resize_image(self, img: Image.Image) -> Image.Image:
        """Apply the resize and center crop only (PIL in, PIL of ``size`` out)."""
        out_h, out_w = self.size  # type: ignore[misc]
        w, h = img.size
        if self.resize == "none":
            if (h, w) != (out_h, out_w):
                raise PreprocessError(
                    f"image is {h}x{w} (h x w) but resize='none' needs exactly "
                    f"{out_h}x{out_w}; use resize='shorter' or 'squash'"
                )
            return img

        resample = _INTERPOLATIONS[self.interpolation]
        scale_h, scale_w = self.scale_size
        if self.resize == "squash":
            new_w, new_h = scale_w, scale_h
        elif scale_h * w >= scale_w * h:
            # Height is the binding side: it gets exactly scale_h and the width follows, with
            # int() truncation as torchvision's Resize(int) does, but never below scale_w.
            new_h, new_w = scale_h, max(scale_w, int(scale_h * w / h))
        else:
            new_w, new_h = scale_w, max(scale_h, int(scale_w * h / w))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)

        if (new_h, new_w) != (out_h, out_w):
            # Offsets rounded as torchvision's CenterCrop does, for parity with timm transforms.
            top = int(round((new_h - out_h) / 2.0))
            left = int(round((new_w - out_w) / 2.0))
            img = img.crop((left, top, left + out_w, top + out_h))
        return img

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Preprocess one image.

        Parameters
        ----------
        img : PIL.Image.Image
            Any mode (converted with :func:`to_rgb` if not RGB), any size.

        Returns
        -------
        torch.Tensor
            float32, (3, H, W) with (H, W) = ``size``, scaled as configured.
        """
        import numpy as np
        import torch

        if img.mode != "RGB":
            img = to_rgb(img)
        img = self.resize_image(img)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(255.0))
        x = x.permute(2, 0, 1).contiguous()
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        elif self.value_range is not None:
            lo, hi = self.value_range
            x = x * (hi - lo) + lo
        return x

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (lists for tuples); :meth:`from_dict` inverts it."""
        h, w = self.size  # type: ignore[misc]
        return {
            "size": [h, w],
            "resize": self.resize,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "value_range": list(self.value_range) if self.value_range is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Rebuild from :meth:`to_dict` output (unknown keys are an error)."""
        known = {"size", "resize", "crop_pct", "interpolation", "mean", "std", "value_range"}
        unknown = set(d) - known
        if unknown:
            raise PreprocessError(
                f"unknown Preprocess field(s) {', '.join(sorted(unknown))}; "
                f"expected {', '.join(sorted(known))}"
            )
        kw = dict(d)
        for key in ("size", "mean", "std", "value_range"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        return cls(**kw)

    @classmethod
    def from_timm_config(
        cls, cfg: dict[str, Any], size: int | tuple[int, int] | None = None
    ) -> Preprocess:
        """Build from a timm ``resolve_data_config`` dict, without importing timm.

        Parameters
        ----------
        cfg : dict
            Keys ``input_size`` ((3, H, W)), ``interpolation``, ``mean``, ``std``, ``crop_pct``
            and ``crop_mode``, as ``timm.data.resolve_data_config(model=m)`` returns them.
            Missing ``crop_pct`` takes timm's default 0.875; missing ``crop_mode`` is
            ``"center"``; missing ``mean``/``std`` leave values in [0, 1].
        size : int or (h, w), optional
            Override the input size (e.g. 224 for a DINOv2 built with ``img_size=224``); the
            crop fraction is kept.

        Returns
        -------
        Preprocess
            ``crop_mode="center"`` becomes ``resize="shorter"`` and ``"squash"`` becomes
            ``resize="squash"``. For square sizes the result matches timm's eval transform.
        """
        if size is None:
            if "input_size" not in cfg:
                raise PreprocessError(
                    "timm data config has no 'input_size'; pass size= or a config from "
                    "timm.data.resolve_data_config"
                )
            input_size = tuple(cfg["input_size"])
            if len(input_size) != 3 or input_size[0] != 3:
                raise PreprocessError(
                    f"timm input_size={input_size} is not (3, H, W); only RGB models are "
                    "supported"
                )
            size = (int(input_size[1]), int(input_size[2]))

        crop_mode = cfg.get("crop_mode") or "center"
        modes = {"center": "shorter", "squash": "squash"}
        if crop_mode not in modes:
            raise PreprocessError(
                f"timm crop_mode={crop_mode!r} is not supported; use 'center' or 'squash'"
            )
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATIONS:
            raise PreprocessError(
                f"timm interpolation={interpolation!r} is not supported; set it to 'bicubic' "
                "or 'bilinear' in the config"
            )
        mean, std = cfg.get("mean"), cfg.get("std")
        return cls(
            size=size,
            resize=modes[crop_mode],
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            interpolation=interpolation,
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
        )


def _as_hw(size, what: str) -> tuple[int, int]:
    if isinstance(size, bool):
        raise PreprocessError(f"{what}={size!r} is not a size; pass an int or (h, w)")
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
        ok = all(int(v) == v for v in size)
    except (TypeError, ValueError):
        raise PreprocessError(f"{what}={size!r} is not a size; pass an int or (h, w)") from None
    if not ok or h < 1 or w < 1:
        raise PreprocessError(f"{what}={size!r} must be positive integers (h, w)")
    return h, w


def _three_floats(values, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise PreprocessError(f"Preprocess {what}={values!r} must be 3 numbers (R, G, B)")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A batch of preprocessed images.

    Attributes
    ----------
    pixels : torch.Tensor
        float32, (B, 3, H, W).
    indices : torch.Tensor
        int64, (B,): positions of these images in the :class:`ImageList`, so labels or names
        can be looked up (``labels[batch.indices]``).
    paths : tuple of Path
        The files, in batch order.
    skipped : list of (Path, str)
        Files passed over while this batch was assembled (unreadable), with the reason.
    """

    pixels: torch.Tensor
    indices: torch.Tensor
    paths: tuple[Path, ...]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> range:
    """Positions 0…n−1 that rank ``rank`` of ``world_size`` handles.

    Sharding is strided: rank r takes r, r + W, r + 2W, … . Shards are disjoint, their union is
    every position, and their sizes differ by at most one (``len(shard_indices(n, r, W))`` is
    known to every rank without communication). Striding rather than contiguous blocks spreads
    each class or folder of a sorted list over all ranks. Nothing is padded or repeated, so
    per-rank statistics merge into exactly the whole list's.

    Parameters
    ----------
    n : int
        Length of the list.
    rank, world_size : int
        This process's rank and the number of ranks, ``0 <= rank < world_size``.

    Returns
    -------
    range
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise PreprocessError(
            f"rank={rank}, world_size={world_size}: need world_size >= 1 and "
            "0 <= rank < world_size"
        )
    return range(rank, n, world_size)


class _DecodeItems:
    """Map-style dataset: item k decodes shard position k. Picklable for worker processes."""

    def __init__(self, paths, indices, preprocess, max_pixels, background):
        self.paths = paths
        self.indices = indices
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.background = background

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        path = self.paths[index]
        try:
            img = read_image(
                path,
                max_pixels=self.max_pixels,
                target_size=self.preprocess.decode_hint,
                background=self.background,
            )
            return index, self.preprocess(img), None
        except (ImageReadError, PreprocessError) as exc:
            return index, None, str(exc)


def _as_list(items):
    return items


def _worker_init(_worker_id: int) -> None:
    import torch

    # One thread per decoding worker: several workers each running a full intra-op thread pool
    # would oversubscribe the cores the encoder computes on.
    torch.set_num_threads(1)


class BatchStream:
    """The iterator :func:`iterate_batches` returns; after iterating it holds the tallies.

    It can be iterated once; call :func:`iterate_batches` again for another pass.

    Attributes
    ----------
    images : ImageList
        The list being decoded.
    indices : range
        Positions of this rank's shard (see :func:`shard_indices`).
    n_total : int
        Files in this rank's shard, known before iterating.
    n_read : int
        Images decoded and yielded so far.
    skipped : list of (Path, str)
        Files that could not be used, with the reason: first the list's
        :attr:`ImageList.missing` entries (on rank 0 only, so a sum over ranks counts each
        once, added when iteration starts), then this shard's unreadable files in list order.
    """

    def __init__(
        self, images, preprocess, *, batch_size, workers, rank, world_size, progress,
        max_pixels, background,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PreprocessError(f"batch_size={batch_size!r} must be a positive integer")
        if not isinstance(workers, int) or workers < 0:
            raise PreprocessError(f"workers={workers!r} must be 0 (in-process) or more")
        self.images = images
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.indices = shard_indices(len(images), rank, world_size)
        self.n_total = len(self.indices)
        self.n_read = 0
        self.skipped: list[tuple[Path, str]] = []
        self._progress = progress
        self._dataset = _DecodeItems(
            tuple(images), self.indices, preprocess, max_pixels, background
        )
        self._iter: Iterator[Batch] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter)

    def summary(self) -> str:
        """One line for logs: how many images were used and skipped, and the first few reasons."""
        line = f"{self.n_read} of {self.n_total} images read, {len(self.skipped)} skipped"
        if self.skipped:
            line += ": " + "; ".join(reason for _, reason in self.skipped[:3])
            if len(self.skipped) > 3:
                line += f"; ... ({len(self.skipped) - 3} more)"
        return line

    def _items(self):
        if self.workers == 0:
            for k in range(len(self._dataset)):
                yield self._dataset[k]
            return

        from torch.utils.data import DataLoader

        # Workers hand back small lists of decoded items; batches are assembled here so that a
        # skipped file does not shorten a batch (only the last one can be short).
        loader = DataLoader(
            self._dataset,
            batch_size=max(1, min(self.batch_size, 16)),
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_as_list,
            worker_init_fn=_worker_init,
        )
        for chunk in loader:
            yield from chunk

    def _batches(self) -> Iterator[Batch]:
        import torch

        if self.rank == 0:
            self.skipped.extend(self.images.missing)
        tensors: list[torch.Tensor] = []
        indices: list[int] = []
        pending: list[tuple[Path, str]] = []
        done = 0
        for index, tensor, reason in self._items():
            done += 1
            if tensor is None:
                entry = (self.images.paths[index], reason)
                self.skipped.append(entry)
                pending.append(entry)
                log.warning("skipped %s", reason)
            else:
                tensors.append(tensor)
                indices.append(index)
            if len(tensors) == self.batch_size or done == self.n_total:
                if self._progress is not None:
                    self._progress(done, self.n_total)
                if tensors:
                    yield self._make_batch(tensors, indices, pending)
                    tensors, indices, pending = [], [], []

        if tensors:  # only reachable if the source yielded fewer items than announced
            yield self._make_batch(tensors, indices, pending)
        if self.n_read == 0 and self.n_total > 0 and self.world_size == 1:
            first = self.skipped[-1][1] if self.skipped else "unknown reason"
            raise NoImagesError(
                f"none of the {self.n_total} files from {self.images.source} could be read "
                f"(e.g. {first}); check that they are images and not damaged"
            )
        log.info("%s", self.summary())

    def _make_batch(self, tensors, indices, pending) -> Batch:
        import torch

        self.n_read += len(tensors)
        return Batch(
            pixels=torch.stack(tensors),
            indices=torch.tensor(indices, dtype=torch.int64),
            paths=tuple(self.images.paths[i] for i in indices),
            skipped=list(pending),
        )


def iterate_batches(
    images: ImageList,
    preprocess: Preprocess,
    *,
    batch_size: int = 32,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> BatchStream:
    """Decode and preprocess a rank's share of an image list, batch by batch.

    Parameters
    ----------
    images : ImageList
        From :func:`collect_images` (a plain sequence of paths is accepted too).
    preprocess : Preprocess
        The encoder's preprocessing; its ``decode_hint`` lets JPEGs decode at reduced scale.
    batch_size : int
        Images per batch. Every batch is full except possibly the last: unreadable files are
        replaced by the next readable ones, not left as holes.
    workers : int
        0 decodes in this process; more starts that many torch DataLoader worker processes,
        each limited to one torch thread. Batches come in list order either way.
    rank, world_size : int
        Strided sharding (:func:`shard_indices`): this call handles positions ``rank``,
        ``rank + world_size``, … only.
    progress : callable (done, total), optional
        Called after each batch with the number of this shard's files processed so far (read or
        skipped) and the shard's size.
    max_pixels : int or None
        Decompression-bomb guard passed to :func:`read_image`.
    background : (r, g, b)
        Colour transparent pixels are composited onto.

    Returns
    -------
    BatchStream
        An iterator of :class:`Batch`. After (or during) iteration, ``stream.skipped`` lists
        every file that could not be read, with the reason, and ``stream.n_read`` /
        ``stream.n_total`` count this rank's images; ``stream.summary()`` is a log line.
        Ranks have no way to know each other's skips: sum ``n_read`` over ranks (e.g. an
        all-reduce) when a global count is needed.

    Raises
    ------
    NoImagesError
        At the end of iteration, when ``world_size == 1`` and not one file could be read. (With
        several ranks, one rank's shard may legitimately be all unreadable; check the sum.)
    """
    if not isinstance(images, ImageList):
        images = ImageList(paths=tuple(Path(p) for p in images), source="list of paths")
    if not isinstance(preprocess, Preprocess):
        raise PreprocessError(
            f"preprocess must be a Preprocess, not {type(preprocess).__name__}; build one with "
            "Preprocess(size=...) or Preprocess.from_timm_config(cfg)"
        )
    return BatchStream(
        images, preprocess, batch_size=batch_size, workers=workers, rank=rank,
        world_size=world_size, progress=progress, max_pixels=max_pixels, background=background,
    )


# --------------------------------------------------------------------------------------------
# ImageFolder layout
# --------------------------------------------------------------------------------------------


def load_image_folder(
    root: str | os.PathLike, *, allow_empty: bool = False
) -> tuple[ImageList, list[int], list[str]]:
    """Read an ImageFolder layout: ``root/<class>/**/<image>``.

    Parameters
    ----------
    root : str or path
        Folder whose sub-folders are the classes. Hidden folders and files directly in ``root``
        are ignored.
    allow_empty : bool
        Keep a class folder with no images (its label stays reserved, it has no examples)
        instead of raising.

    Returns
    -------
    paths : ImageList
        All images, grouped by class in label order, sorted within each class.
    labels : list of int
        ``labels[i]`` is the class of ``paths[i]``: the position of its folder among the class
        folders sorted by name (for CIFAR-10 this is the standard label order).
    class_names : list of str
        The class folder names, sorted.

    Raises
    ------
    ImageSourceError
        ``root`` is not a folder, has no class folders, or a class folder holds no image
        (named, unless ``allow_empty``).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ImageSourceError(
            f"image folder {root_path} does not exist; pass a folder with one sub-folder per "
            "class"
        )
    root_path = root_path.resolve()
    class_names = sorted(
        d.name for d in root_path.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not class_names:
        raise ImageSourceError(
            f"{root_path} has no class folders; lay images out as {root_path}/<class>/<image>"
        )

    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(class_names):
        files = _scan_folder(root_path / name)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        message = (
            f"class folder(s) with no images in {root_path}: {', '.join(empty)}; add images "
            "or remove the folder(s)"
        )
        if not allow_empty:
            raise ImageSourceError(message + " (or pass allow_empty=True)")
        log.warning("%s", message)
    if not paths:
        raise NoImagesError(f"no images in any class folder of {root_path}")

    hashes = [_file_sha256(p) for p in paths]
    images = ImageList(
        paths=tuple(paths),
        source=f"image folder {root_path} ({len(class_names)} classes)",
        root=root_path,
        digest=hashlib.sha256("".join(h + "\n" for h in sorted(hashes)).encode()).hexdigest(),
        duplicates=_duplicate_groups(paths, hashes, root_path),
    )
    log.info("%d images in %d classes from %s", len(images), len(class_names), root_path)
    return images, labels, class_names
