"""Image loading (PIL formats and DICOM), LLaVA's pad-to-square, and preprocessing to a tensor.

Any HF-style image processor works: `processor(images=img, return_tensors="pt")["pixel_values"]`.
The default, "square", is the reference's: the processor's own resize and centre crop (CLIP: shortest side to
224, centre crop), as every released checkpoint was trained and evaluated. "pad" first pads the image to a
square with the processor's mean colour (LLaVA-1.5's choice), so that nothing is cropped away.
"""

from __future__ import annotations

import logging
import os
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
        raise ImageTooLargeError(f"image too large to decode {path}: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, AttributeError, KeyError) as e:
        raise ImageLoadError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    except Exception as e:  # pydicom raises its own exception types for broken files
        if type(e).__module__.startswith("pydicom"):
            raise ImageLoadError(f"cannot decode DICOM {path}: {type(e).__name__}: {e}") from e
        raise


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
        raise ImageTooLargeError(f"image too large to decode {path}: {e}") from e
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


def check_record_images(
    records: list[dict], image_folder: str | os.PathLike, source: str, max_pixels: int | None = None,
    progress: bool = False,
) -> int:
    """Check the header of every record's image (`image_header`) before any work; returns how many were checked.

    The first failure raises `ImageLoadError` naming `source`, the record and the file.
    """

    folder = Path(image_folder)
    if not folder.is_dir():
        raise ImageLoadError(f"image folder not found: {folder}")
    pairs = [(i, name) for i, r in enumerate(records) for name in record_images(r)]
    count = len(pairs)
    if progress:

        pairs = tqdm(pairs, desc="checking images", unit="img", mininterval=2.0)
    for i, name in pairs:
        try:
            image_header(folder / name, max_pixels)
        except ImageLoadError as e:
            raise type(e)(f"{source}: {record_label(records[i], i)}: field 'image': {e}") from e
    return count


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
