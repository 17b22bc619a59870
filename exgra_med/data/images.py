"""Image loading (PIL formats and DICOM), LLaVA's pad-to-square, and preprocessing to a tensor.

Any HF-style image processor works: `processor(images=img, return_tensors="pt")["pixel_values"]`.
The default, "square", is the reference's: the processor's own resize and centre crop (CLIP: shortest side to
224, centre crop), as every released checkpoint was trained and evaluated. "pad" first pads the image to a
square with the processor's mean colour (LLaVA-1.5's choice), so that nothing is cropped away.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from exgra_med.data.records import record_images, record_label
from exgra_med.errors import UserError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}
ASPECT_RATIOS = ("square", "pad")
DEFAULT_ASPECT_RATIO = "square"  # the reference's image_aspect_ratio default
# How images are checked before training: every pixel decoded, the header read, or nothing ("auto": decode up to
# DECODE_AUTO_MAX_IMAGES images, about two minutes on 8 cores at ~10 ms an image; the header beyond).
IMAGE_CHECKS = ("auto", "decode", "header", "none")
DECODE_AUTO_MAX_IMAGES = 100_000


class ImageLoadError(OSError, UserError):
    """An image that is missing or cannot be decoded; the message names the path."""


class ImageTooLargeError(ImageLoadError):
    """An image whose declared canvas exceeds the pixel limit (a decompression bomb)."""


class ImageProcessor(Protocol):
    """What the dataset needs from an image processor (any `transformers` image processor fits)."""

    image_mean: Any

    def __call__(self, images: Any, return_tensors: str) -> Any: ...


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as f:  # DICOM Part 10 files carry "DICM" after a 128-byte preamble
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _first(value: Any) -> float:
    """WindowCenter/WindowWidth may hold several values; the first is the default window."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def dicom_to_pil(path: str | os.PathLike) -> Image.Image:
    """Decode a DICOM file to an 8-bit RGB image: rescale slope/intercept, then the stored window
    (WindowCenter/WindowWidth) or min-max scaling, with MONOCHROME1 inverted. Multi-frame: first frame."""
    # lazy: pydicom only for DICOM files
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if photometric.startswith("MONOCHROME"):
        values = pixels.astype(np.float64)
        values = values * float(getattr(ds, "RescaleSlope", 1.0) or 1.0) + float(
            getattr(ds, "RescaleIntercept", 0.0) or 0.0
        )
        if "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) > 0:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            low, high = center - width / 2.0, center + width / 2.0
        else:
            low, high = float(values.min()), float(values.max())
        scale = max(high - low, 1e-6)
        gray = np.round(np.clip((values - low) / scale, 0.0, 1.0) * 255.0).astype(np.uint8)
        if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
            gray = 255 - gray
        return Image.fromarray(gray).convert("RGB")
    if photometric == "RGB" and pixels.ndim == 3:
        return Image.fromarray(pixels.astype(np.uint8))
    # YBR and palette images: pydicom's colour conversion handles them.
    # lazy: pydicom only for DICOM files
    from pydicom.pixels import convert_color_space

    rgb = convert_color_space(pixels, photometric, "RGB")
    return Image.fromarray(np.asarray(rgb, dtype=np.uint8))


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` (any PIL format, or DICOM) as an RGB image; failures raise `ImageLoadError`
    naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        if _is_dicom(path):
            return dicom_to_pil(path)
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:  # not an OSError: a small file that declares a huge canvas
        raise _too_large(path, e, image_pixel_limit()) from e
    except (UnidentifiedImageError, OSError, ValueError, AttributeError, KeyError) as e:
        raise ImageLoadError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    except Exception as e:  # pydicom raises its own exception types for broken files
        if type(e).__module__.startswith("pydicom"):
            raise ImageLoadError(f"cannot decode DICOM {path}: {type(e).__name__}: {e}") from e
        raise


def _too_large(path: Path, error: Exception, limit: int) -> ImageTooLargeError:
    """The error of a canvas PIL refused to open, stated against the limit in force (PIL's own message quotes its
    internal limit, not the one the command was given)."""
    declared = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(declared[1])} pixels" if declared else "a larger canvas"
    return ImageTooLargeError(f"image too large: {path} declares {size} > {limit}")


def image_pixel_limit() -> int:
    """The largest canvas PIL decodes (beyond it `Image.open` raises DecompressionBombError): 2 x MAX_IMAGE_PIXELS."""
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * int(limit) if limit else 2**62


def image_header(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int, str]:
    """(width, height, format) of an image file, read from its header only (no pixel decoding).

    Raises `ImageLoadError` naming the path when the file is missing, not an image (PIL format or DICOM), empty, or
    larger than `max_pixels` (default `image_pixel_limit()`), i.e. a decompression bomb.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        if _is_dicom(path):
            # lazy: pydicom only for DICOM files
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            width, height, kind = int(ds.Columns), int(ds.Rows), "DICOM"
        else:
            with Image.open(path) as img:
                width, height, kind = img.width, img.height, str(img.format)
    except Image.DecompressionBombError as e:
        raise _too_large(path, e, min(image_pixel_limit(), max_pixels or image_pixel_limit())) from e
    except (UnidentifiedImageError, OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise ImageLoadError(f"cannot read image header {path}: {type(e).__name__}: {e}") from e
    except Exception as e:  # pydicom's own exception types
        if type(e).__module__.startswith("pydicom"):
            raise ImageLoadError(f"cannot read DICOM header {path}: {type(e).__name__}: {e}") from e
        raise
    limit = image_pixel_limit() if max_pixels is None else max_pixels
    if width < 1 or height < 1:
        raise ImageLoadError(f"image {path} has an empty canvas ({width}x{height})")
    if width * height > limit:
        raise ImageTooLargeError(f"image too large: {path} is {width}x{height} pixels > {limit}")
    return width, height, kind


def decode_check(path: str | os.PathLike, max_pixels: int | None = None) -> None:
    """Check `path` as training reads it: its header (`image_header`), then every pixel decoded (`load_image`), which
    finds what a header scan cannot (a truncated or corrupt file). Raises `ImageLoadError` naming the path."""
    image_header(path, max_pixels)
    load_image(path)


def image_check_mode(mode: str, n_images: int) -> str:
    """The check `mode` ("auto" resolved by the number of images) applies: "decode", "header" or "none"."""
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"image check must be one of {IMAGE_CHECKS}, got {mode!r}")
    if mode == "auto":
        return "decode" if n_images <= DECODE_AUTO_MAX_IMAGES else "header"
    return mode


@dataclasses.dataclass(frozen=True)
class BadImage:
    """An image of a record that failed the check: the record's position and id, its field and file, and the error."""

    index: int
    record_id: Any
    field: str
    file: str
    error: ImageLoadError = dataclasses.field(compare=False)

    @property
    def reason(self) -> str:
        return str(self.error)

    def where(self, records: list[dict], source: str) -> str:
        """`source: record ...: field '...'`, as errors name a record's image."""
        return f"{source}: {record_label(records[self.index], self.index)}: field '{self.field}'"


def find_bad_images(
    records: list[dict], image_folder: str | os.PathLike, mode: str = "header", max_pixels: int | None = None,
    progress: bool = False, workers: int | None = None,
) -> list[BadImage]:
    """Every record image that fails the `mode` check ("header": `image_header`; "decode": `decode_check`; "none"),
    in record order. `workers` threads (default: the CPU count, at most 8) share the work; PIL decodes without the
    GIL."""
    if mode == "none":
        return []
    if mode not in ("header", "decode"):
        raise ValueError(f"image check must be header, decode or none, got {mode!r}")
    folder = Path(image_folder)
    check = decode_check if mode == "decode" else image_header
    items = [(i, "image" if not isinstance(r.get("image"), list) else f"image[{k}]", name)
             for i, r in enumerate(records) for k, name in enumerate(record_images(r))]

    def run(item: tuple[int, str, str]) -> BadImage | None:
        index, field_name, name = item
        try:
            check(folder / name, max_pixels)
        except ImageLoadError as e:
            return BadImage(index, records[index].get("id"), field_name, name, e)
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    chunk = 256 * workers  # submitted a chunk at a time: memory stays bounded on millions of images
    bad: list[BadImage] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(items), desc=f"checking images ({mode})", unit="img", mininterval=2.0,
            disable=not progress) as bar:
        for start in range(0, len(items), chunk):
            bad += [b for b in pool.map(run, items[start:start + chunk]) if b is not None]
            bar.update(min(chunk, len(items) - start))
    return bad


def check_record_images(
    records: list[dict], image_folder: str | os.PathLike, source: str, max_pixels: int | None = None,
    progress: bool = False, mode: str = "header", workers: int | None = None,
) -> int:
    """Check every record's image before any work (`mode`: "header" reads headers, "decode" every pixel; see
    `find_bad_images`); returns how many were checked.

    The first failure raises `ImageLoadError` naming `source`, the record, the field and the file (and how many more
    failed).
    """
    folder = Path(image_folder)
    if not folder.is_dir():
        raise ImageLoadError(f"image folder not found: {folder}")
    bad = find_bad_images(records, folder, mode, max_pixels, progress, workers)
    if bad:
        first, more = bad[0], len(bad) - 1
        tail = f" (and {more} more bad image{'s' if more > 1 else ''})" if more else ""
        raise type(first.error)(f"{first.where(records, source)}: {first.error}{tail}") from first.error
    return sum(len(record_images(r)) for r in records)


def expand2square(img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad `img` to a square, centred, filling with `background_color` (LLaVA's "pad" aspect ratio)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background_color)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def preprocess_image(
    img: Image.Image, processor: ImageProcessor, aspect_ratio: str = DEFAULT_ASPECT_RATIO
) -> torch.Tensor:
    """`img` -> pixel tensor (3, H, W). "square" (default, the reference) leaves the resize and centre crop to the
    processor; "pad" pads to a square with the processor's mean colour first."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    if aspect_ratio == "pad":
        img = expand2square(img, tuple(int(x * 255) for x in processor.image_mean))
    pixel_values = processor(images=img, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixel_values[0])  # (3, H, W)
