"""Decoding, validation and preprocessing of input images.

Policy for bad input: every problem raises ``BadImageError`` with a short
reason code (``empty``, ``too_large_file``, ``not_an_image``, ``truncated``,
``decompression_bomb``, ``extreme_shape``, ``unreadable``; reading a folder
adds ``symlink``, ``not_a_file``, ``outside_root``); callers record the
reason and move on to the next image. Only the formats in
``ALLOWED_FORMATS`` are decoded. Nothing here ever lets PIL warn-and-continue on a
decompression bomb or silently load a truncated file.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from moderation.config import ResizeMode
from moderation.errors import BadImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Truncated files must fail, not decode to grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Decoders an upload may reach: raster formats users upload. Nothing that shells out
# (PostScript/EPS runs Ghostscript) or that nobody uploads.
Image.init()  # registers every plugin, so the list below can name them
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)
# A 116 KB PNG of 1 x 60,000,000 pixels is within any pixel limit and still costs gigabytes:
# sides and aspect ratio are limited too.
MAX_SIDE_PX = 30_000
MAX_ASPECT = 50.0


@dataclass(frozen=True, slots=True)  # millions of them in a nightly build at scale
class ImageRef:
    """One input image: its id (file stem or key stem), where it lives, and its content hash.

    ``fingerprint`` is what the listing says about the bytes without reading
    them (size and ETag or mtime; "" when unknown): equal fingerprints of one
    location mean unchanged bytes (:mod:`moderation.reference_changes`).
    """

    image_id: str
    location: str  # file path or object key
    sha256: str = ""
    fingerprint: str = ""


@dataclass(frozen=True)
class Failure:
    """An image that was skipped, and why."""

    image_id: str
    location: str
    reason: str
    detail: str = ""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path | str) -> str:
    """The sha256 (hex) of a local file, read in blocks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_id_from(location: str) -> str:
    """The id of an image: its file name without the suffix."""
    name = location.rsplit("/", 1)[-1]
    stem = Path(name).stem
    return stem or name


def decode_image(data: bytes, max_pixels: int = 64_000_000, max_bytes: int = 50_000_000,
                 min_size: int | None = None) -> Image.Image:
    """Decode ``data`` into an 8-bit RGB image, upright per its EXIF orientation.

    Handles palette, alpha (composited on white), CMYK, greyscale and 16-bit
    images. With ``min_size``, a large JPEG is decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8) that still leaves both sides at least ``min_size``
    pixels: much faster for phone-sized uploads, and the image is resized
    below that anyway. Raises BadImageError with a reason code on any problem.
    """
    if not data:
        raise BadImageError("empty", "zero-byte file")
    if len(data) > max_bytes:
        raise BadImageError("too_large_file", f"{len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's own bomb limit (89 MP by default) would override ours both ways and quote its
            # own number: ours, checked on the header right below, is the only one.
            Image.MAX_IMAGE_PIXELS = None
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError("decompression_bomb", f"{w}x{h} pixels > limit {max_pixels}")
            if w < 1 or h < 1:
                raise BadImageError("not_an_image", "zero-sized image")
            if max(w, h) > MAX_SIDE_PX or max(w, h) / min(w, h) > MAX_ASPECT:
                raise BadImageError("extreme_shape", f"{w}x{h} pixels: a side over {MAX_SIDE_PX} px or an "
                                                     f"aspect ratio over {MAX_ASPECT:g}")
            if min_size and img.format == "JPEG" and min(w, h) >= 2 * min_size:
                img.draft(img.mode if img.mode in ("CMYK", "L") else "RGB", (min_size, min_size))
            img.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise BadImageError("not_an_image", "not a recognised image format (accepted: "
                                            f"{', '.join(ALLOWED_FORMATS)})") from None
    except OSError as exc:
        msg = str(exc)
        reason = "truncated" if "truncated" in msg or "broken data stream" in msg else "unreadable"
        raise BadImageError(reason, msg) from None
    except Exception as exc:  # PIL raises assorted errors on hostile files
        raise BadImageError("unreadable", f"{type(exc).__name__}: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise mode and orientation: 8-bit RGB, EXIF rotation applied."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose the image
        pass
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples map to 8 bits by their absolute level (v / 257), not by
        # stretching each image's own maximum to white. Mode "I" may hold 8-bit
        # data, or 16-bit data (older PIL reads 16-bit PNGs that way).
        arr = np.asarray(img, dtype=np.float64)
        if mode != "I" or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        mode = img.mode
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize(img: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    if mode == ResizeMode.SQUARE:
        return img.resize((size, size), Image.BILINEAR)
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ImageNet-normalised float tensor (3, H, W)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return arr.sub_(mean).div_(std)


def preprocess(img: Image.Image, size: int, mode: ResizeMode) -> torch.Tensor:
    return to_tensor(resize(img, size, mode))


def preprocess_uint8(img: Image.Image, size: int, mode: ResizeMode) -> torch.Tensor:
    """Resized image as a uint8 tensor (3, H, W): a quarter of the bytes of a float tensor
    to pass between processes; :func:`normalise_batch` finishes the job on the device."""
    return torch.from_numpy(np.asarray(resize(img, size, mode), dtype=np.uint8).copy()).permute(2, 0, 1)


def normalise_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float, on the batch's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std


def list_image_entries(folder: Path) -> list[Path]:
    """Every entry under ``folder`` whose name has an image suffix, sorted, links not followed.

    Includes what is not a regular file (symbolic links, dangling or not,
    FIFOs, device files) so that reading it records a failure with its
    reason instead of the entry vanishing silently. Linked folders are not
    descended. Raises NotADirectoryError (with the path) if ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images")
    out = []
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        out += [Path(dirpath) / name for name in filenames if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(out)


def list_image_files(folder: Path) -> list[Path]:
    """The regular image files under ``folder`` (no links, FIFOs or devices), sorted.

    Raises NotADirectoryError (with the path) if ``folder`` is not a folder.
    """
    return [p for p in list_image_entries(folder) if stat.S_ISREG(os.lstat(p).st_mode)]


def read_image_file(root: Path, path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of an image file inside ``root``, refusing what an image folder must not lead to.

    Raises BadImageError with reason ``symlink`` (links are never followed:
    a link could point at /etc/shadow or another folder's photos),
    ``not_a_file`` (FIFO, device, socket, folder), ``outside_root``, or
    ``too_large_file`` (checked on the file's size before anything is read,
    and the read itself stops past ``max_bytes``). OSError for a file that
    vanished.
    """
    path = Path(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise BadImageError("symlink", "a symbolic link; links are not followed out of an image folder: "
                                       "copy the file in instead")
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError("not_a_file", "not a regular file (a FIFO, device, socket or folder)")
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise BadImageError("outside_root", f"resolves outside the image folder {root}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise BadImageError("too_large_file", f"{st.st_size} bytes > limit {max_bytes}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(-1 if max_bytes is None else max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # grew since the stat
        raise BadImageError("too_large_file", f"more than {max_bytes} bytes")
    return data
