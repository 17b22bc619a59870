"""The memory a server spends on images at once: one budget of bytes, reserved before an image is decoded.

A small file may declare a canvas that takes hundreds of MB to decode and preprocess (a solid 6300x6300 PNG: 130 kB
sent, ~0.5 GB at its peak), and servers decode requests in parallel before the generation queue counts them. So every
image a server decodes first reserves, from its header, the bytes its decode holds at the peak (`plan_decode`) and
those its preprocessing will hold (`PREPROCESS_BYTES_PER_PIXEL` of the image the processor gets), against one budget
(`--max-image-memory-mb`), and keeps them until the request is encoded for the model. A request that does not fit
waits, first come first served, up to `IMAGE_MEMORY_WAIT_S` (30 s); then it is refused with HTTP 429 and `Retry-After`
(as TGI answers an overloaded server), and so is a request that finds `--max-queue` others already waiting. An image
that alone needs more than the whole budget gets a 413. Images are decoded only as large as the model's processor
needs (`load_image`'s `side`), and memory freed by decoding goes back to the system (`release_freed_memory`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator

from PIL import Image

from exgra_med.data.images import (
    ImageLoadError,
    ImageTooLargeError,
    load_image,
    plan_decode,
    processor_input_side,
)
from exgra_med.serve.options import DEFAULT_MAX_IMAGE_MEMORY_MB, IMAGE_MEMORY_WAIT_S
from exgra_med.serve.uploads import UploadError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# What an image processor holds per pixel of the image it gets (CLIP: a uint8 array, float32 copies while it
# rescales and normalises; measured ~9 bytes a pixel, rounded up).
PREPROCESS_BYTES_PER_PIXEL = 16
MB = 1024 * 1024


class ImageMemoryBusyError(UploadError):
    """No room in the image memory budget within `IMAGE_MEMORY_WAIT_S` (HTTP 429, retry after `retry_after` seconds)."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(message, status=429)
        self.retry_after = retry_after


class ImageMemoryBudget:
    """Bytes of image memory in use at once, at most `limit` (thread-safe).

    `reserve(n)` holds `n` bytes for the duration of a `with` block: at once when they fit and nobody waits before,
    else after the earlier waiters (first come, first served), or raises `ImageMemoryBusyError` after `wait_s`
    seconds or when `max_waiting` requests wait already; `n > limit` raises an `UploadError` (413) at once.
    """

    def __init__(self, limit: int, wait_s: float = IMAGE_MEMORY_WAIT_S, max_waiting: int = 32):
        if limit < 1:
            raise ValueError(f"the image memory budget must be >= 1 byte, got {limit}")
        self.limit, self.wait_s, self.max_waiting = int(limit), wait_s, max_waiting
        self.used = 0  # bytes reserved now
        self.peak = 0  # the most bytes reserved at once so far
        self.active = 0  # reservations held now
        self._waiting: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget while the block runs; give them back, and the freed memory to the system, at
        its end."""
        if nbytes > self.limit:
            raise UploadError(f"image too large to decode: it needs about {_mb(nbytes)} MB of memory, more than this "
                              f"server's image memory budget of {_mb(self.limit)} MB (limit --max-image-memory-mb)",
                              status=413)
        ticket = object()
        with self._changed:
            if len(self._waiting) >= self.max_waiting:
                raise self._busy(f"{len(self._waiting)} requests already wait for image memory")
            self._waiting.append(ticket)
            try:
                fits = self._changed.wait_for(
                    lambda: self._waiting[0] is ticket and self.used + nbytes <= self.limit, timeout=self.wait_s)
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next waiter may be first now
            if not fits:
                raise self._busy(f"waited {self.wait_s:g} s for image memory")
            self.used += nbytes
            self.active += 1
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self.active -= 1
                self._changed.notify_all()
            # Each decoding thread frees into its own malloc arena, which no other thread reuses: trimmed now, or the
            # server keeps up to one image per thread.
            release_freed_memory()

    def _busy(self, why: str) -> ImageMemoryBusyError:
        return ImageMemoryBusyError(
            f"server busy: {why} ({_mb(self.used)} of {_mb(self.limit)} MB in use, limit --max-image-memory-mb); "
            f"retry in {RETRY_AFTER_S} s")


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:.0f}"


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_freed_memory() -> bool:
    """Return the heap memory freed since the last call to the system (glibc's `malloc_trim`); False where there is
    no glibc. Without it, a server that decoded large images keeps their freed pages (most of them; measured in
    docs/serving.md)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class ImageDecoder:
    """Decodes a server's images within its `budget`, reduced for a processor of input `side` (`load_image`), after
    the `max_pixels` header check; every failure is an `UploadError` (400, 413 or 429) naming no server path."""

    def __init__(self, budget: ImageMemoryBudget, side: int | None, max_pixels: int):
        self.budget, self.side, self.max_pixels = budget, side, max_pixels

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike, side: int | None = None) -> Iterator[Image.Image]:
        """The image at `path`, decoded under a reservation of the budget held until the block ends (run the
        processor inside it); `side` overrides the decoder's."""
        side = self.side if side is None else side
        start = time.perf_counter()
        try:
            plan = plan_decode(path, side, self.max_pixels)
        except ImageTooLargeError as e:
            raise UploadError(f"{_short(e, path)} (limit --max-image-pixels)", status=413) from e
        except ImageLoadError as e:
            raise UploadError(f"the image could not be decoded (PNG, JPEG or DICOM expected): {_short(e, path)}") from e
        with self.budget.reserve(plan.peak_bytes + plan.pixels * PREPROCESS_BYTES_PER_PIXEL):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = load_image(path, side)
            except ImageLoadError as e:
                raise UploadError(f"the image could not be decoded (PNG, JPEG or DICOM expected): "
                                  f"{_short(e, path)}") from e
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                raise UploadError(f"image too large: {e}", status=413) from e
            logger.debug("decoded a %dx%d image as %dx%d in %.2f s", plan.width, plan.height, *image.size,
                         time.perf_counter() - start)
            yield image


def _short(error: Exception, path: str | os.PathLike) -> str:
    return str(error).replace(str(path), "<upload>")


def server_decoder(engine, max_pixels: int, max_image_memory_mb: int = DEFAULT_MAX_IMAGE_MEMORY_MB,
                   max_waiting: int = 32) -> ImageDecoder:
    """The `ImageDecoder` of a server of `engine`: a budget of `max_image_memory_mb`, images reduced for the model's
    image processor (`processor_input_side`)."""
    side = processor_input_side(getattr(engine.backend, "image_processor", None))
    return ImageDecoder(ImageMemoryBudget(max_image_memory_mb * MB, max_waiting=max_waiting), side, max_pixels)
