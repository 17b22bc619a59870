"""Untrusted images sent over the network: data URLs / raw bytes -> RGB image, with size limits.

Decoding goes through `exgra_med.data.images.load_image`, so uploads accept exactly what files do
(PNG, JPEG, ... and DICOM). Every failure is an `UploadError` with an HTTP status and a message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
import warnings

from PIL import Image

from exgra_med.data.images import ImageLoadError, ImageTooLargeError, image_header, load_image

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


class UploadError(ValueError):
    """A rejected upload; `status` is the HTTP status to answer with (400, 413, ...)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_data_url(url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a base64 `data:` URL; remote http(s) URLs are refused (the server fetches nothing)."""
    if url.startswith(("http://", "https://")):
        raise UploadError(
            "image_url must be a base64 data URL (data:image/png;base64,...); remote URLs are not fetched"
        )
    match = _DATA_URL.match(url)
    if match is None or not match["b64"]:
        raise UploadError("image_url must be a base64 data URL of the form data:<mime>;base64,<data>")
    payload = url[match.end() :]
    # base64 inflates by 4/3: refuse before decoding what cannot fit.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise UploadError(f"image too large: more than {max_bytes} bytes (limit --max-image-bytes)", status=413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UploadError(f"image_url holds malformed base64: {e}") from e
    if len(data) > max_bytes:
        raise UploadError(f"image too large: {len(data)} bytes > {max_bytes} (limit --max-image-bytes)", status=413)
    if not data:
        raise UploadError("image_url holds no data")
    return data


def image_from_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (any PIL format or DICOM) to RGB; undecodable or huge images raise UploadError."""
    fd, tmp = tempfile.mkstemp(prefix="exgra-med-upload-", suffix=".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _check_pixels(tmp, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(tmp)
    except ImageTooLargeError as e:
        raise UploadError(_short(e, tmp), status=413) from e
    except ImageLoadError as e:
        raise UploadError(f"the image could not be decoded (PNG, JPEG or DICOM expected): {_short(e, tmp)}") from e
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UploadError(f"image too large: {e}", status=413) from e
    finally:
        os.unlink(tmp)


def _check_pixels(path: str, max_pixels: int) -> None:
    # Read only the header: a small file may still declare an enormous canvas.
    try:
        image_header(path, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise UploadError(f"{_short(e, path)} (limit --max-image-pixels)", status=413) from e
    except ImageLoadError:  # not decodable: load_image reports it
        return


def _short(error: Exception, tmp: str) -> str:
    return str(error).replace(tmp, "<upload>")
