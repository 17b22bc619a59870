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
# An image is reduced before its processor only down to this many times the processor's input side (`load_image`).
REDUCING_GAP = 3.0
REDUCIBLE_MODES = ("RGB", "RGBA", "L", "LA")


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


def load_image(path: str | os.PathLike, side: int | None = None) -> Image.Image:
    """Open `path` (any PIL format, or DICOM) as an RGB image; failures raise `ImageLoadError` naming the path.

    `side` (see `processor_input_side`): an image whose shorter side is at least 2 x REDUCING_GAP x `side` is reduced by
    an integer factor while it is decoded (JPEG: DCT scaling, `Image.draft`) or right after (`Image.reduce`, a box
    average), keeping its shorter side >= REDUCING_GAP x `side`; smaller images come back exactly as without `side`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        if _is_dicom(path):
            image = dicom_to_pil(path)
            return image if reduction_factor(*image.size, side) == 1 else _reduced(image, side)
        with Image.open(path) as img:
            _draft(img, side)
            img.load()
            return _reduced(img, side)
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


def processor_input_side(processor: Any) -> int | None:
    """The largest side, in pixels, that `processor` (an HF image processor) resizes or crops an image to: the largest
    integer in its size settings (`size`, `crop_size`, `max_image_size`, grid pinpoints; times the crops of Gemma's
    pan and scan). Dynamic-resolution processors state pixel counts there (Qwen2-VL's `max_pixels`), which only makes
    the answer larger. None when it does not resize or says nothing: such images are never reduced."""
    if processor is None or getattr(processor, "do_resize", True) is False:
        return None
    values: list[int] = []
    for name in ("size", "crop_size", "max_image_size"):
        setting = getattr(processor, name, None)
        if dataclasses.is_dataclass(setting) and not isinstance(setting, type):  # transformers' SizeDict
            setting = dataclasses.asdict(setting)
        if isinstance(setting, dict):
            values += [v for v in setting.values() if isinstance(v, int) and not isinstance(v, bool)]
        elif isinstance(setting, int) and not isinstance(setting, bool):
            values.append(setting)
    for pinpoint in getattr(processor, "image_grid_pinpoints", None) or []:
        values += [v for v in pinpoint if isinstance(v, int)]
    values += [int(v) for v in (getattr(processor, "max_pixels", None),) if isinstance(v, int)]
    if not values:
        return None
    side = max(values)
    if getattr(processor, "do_pan_and_scan", False):
        side *= max(int(getattr(processor, "pan_and_scan_max_num_crops", 1) or 1), 1)
    return side


def reduction_factor(width: int, height: int, side: int | None) -> int:
    """The integer factor a `width` x `height` image is reduced by for a processor of input `side` (1: none): the
    largest that keeps the shorter side >= REDUCING_GAP x `side`, so that the processor's own resampling still does
    the work (Pillow: from a gap of 3 the result is indistinguishable from resampling the full image)."""
    if not side:
        return 1
    return max(1, int(min(width, height) // (REDUCING_GAP * side)))


def _draft(img: Image.Image, side: int | None) -> None:
    # JPEG: decode at 1/2, 1/4 or 1/8 scale (DCT scaling), never below the reduced size; other formats ignore it.
    factor = reduction_factor(img.width, img.height, side)
    if factor > 1 and img.format == "JPEG":
        img.draft(None, (img.width // factor, img.height // factor))


def _reduced(img: Image.Image, side: int | None) -> Image.Image:
    """`img` as a new RGB image, reduced by `reduction_factor`; the full-size canvas is not kept."""
    factor = reduction_factor(img.width, img.height, side)
    if factor == 1:
        return img.convert("RGB")
    if img.mode not in REDUCIBLE_MODES:  # P, 1, I;16, CMYK, ...: Image.reduce takes 8-bit L/RGB(A) and I/F only
        img = img.convert("RGB")
    img = img.reduce(factor)  # RGB(A) and L commute with the conversion to RGB: the same pixels either way
    return img if img.mode == "RGB" else img.convert("RGB")


_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # PIL stores others in 4


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What `load_image(path, side)` does to an image, from its header: the canvas decoded (after a JPEG draft), the
    size it comes back at, and the bytes it holds at its peak (the canvas, an RGB copy where one is needed first)."""

    width: int
    height: int
    mode: str
    size: tuple[int, int]
    peak_bytes: int

    @property
    def pixels(self) -> int:
        """Pixels of the image `load_image` returns."""
        return self.size[0] * self.size[1]


def plan_decode(path: str | os.PathLike, side: int | None = None, max_pixels: int | None = None) -> DecodePlan:
    """The `DecodePlan` of `load_image(path, side)`, read from the header; raises as `image_header` does."""
    width, height, kind = image_header(path, max_pixels)
    if kind == "DICOM":
        # pydicom's array, float64 values, a windowed copy and its rounding (dicom_to_pil), then L and RGB.
        mode, canvas, per_pixel = "RGB", (width, height), 2 + 8 * 3 + 1 + 4
    else:
        with Image.open(path) as img:
            _draft(img, side)  # sets the size a JPEG decodes at, without decoding
            mode, canvas = img.mode, img.size
        per_pixel = _PIXEL_BYTES.get(mode, 4)
        if reduction_factor(*canvas, side) == 1 or mode not in REDUCIBLE_MODES:
            per_pixel += 4  # the RGB copy, made while the decoded canvas is alive
    factor = reduction_factor(*canvas, side)
    size = (-(-canvas[0] // factor), -(-canvas[1] // factor))
    peak = canvas[0] * canvas[1] * per_pixel + (size[0] * size[1] * 4 if factor > 1 else 0)
    return DecodePlan(width, height, mode, size, peak)


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
