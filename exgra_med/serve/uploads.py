"""Untrusted images sent over the network: data URLs / raw bytes -> RGB image, with size limits; where uploads live.

Decoding goes through `exgra_med.serve.image_memory.ImageDecoder` (`exgra_med.data.images.load_image` within the
server's image memory budget), so uploads accept exactly what files do (PNG, JPEG, ... and DICOM). Every failure is an
`UploadError` with an HTTP status and a message.

One policy for both servers: an image is sent (a data URL to the API, an upload to the web demo), never named by a URL
for the server to fetch (`refuse_remote`). Uploaded bytes are kept, while needed, only in a `PrivateFolder`: mode 0700,
removed when the server stops, and, when a server was killed (SIGKILL, out of memory), by the next one that starts.
`FolderAlias` shows such a folder to web clients under an alias, so that no response names a server path.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from exgra_med.errors import UserError

if TYPE_CHECKING:
    from exgra_med.serve.image_memory import ImageDecoder

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
REMOTE_REFUSED = "remote URLs are not fetched"
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_URL = re.compile(r"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)  # http, https, ftp, file, s3, ...


class UploadError(ValueError):
    """A rejected upload; `status` is the HTTP status to answer with (400, 413, ...)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def refuse_remote(reference: str, expected: str) -> None:
    """UploadError ("`expected`; remote URLs are not fetched") when `reference` is a URL: the servers fetch nothing."""
    if _URL.match(reference):
        raise UploadError(f"{expected}; {REMOTE_REFUSED}")


def refuse_remote_files(value: Any, expected: str = "files must be uploaded to the demo") -> None:
    """`refuse_remote` on every file reference (an object with a string `path`, such as Gradio's FileData) in a JSON
    value."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            refuse_remote(value["path"], expected)
        for item in value.values():
            refuse_remote_files(item, expected)
    elif isinstance(value, list):
        for item in value:
            refuse_remote_files(item, expected)


def decode_data_url(url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a base64 `data:` URL; URLs to fetch (http, file, ...) are refused."""
    refuse_remote(url, "image_url must be a base64 data URL (data:image/png;base64,...)")
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


@contextlib.contextmanager
def image_from_bytes(data: bytes, folder: str | os.PathLike, decoder: ImageDecoder) -> Iterator[Image.Image]:
    """Image bytes (any PIL format or DICOM) decoded to RGB by `decoder` (`exgra_med.serve.image_memory`: the pixel
    limit, the image memory budget, reduced for the model), held for the `with` block; undecodable or huge images raise
    UploadError. The bytes are in a file in `folder` (a `PrivateFolder`) only while they are decoded."""
    fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".img", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with decoder.open(tmp) as image:
            os.unlink(tmp)
            tmp = None
            yield image
    finally:
        if tmp is not None:
            os.unlink(tmp)


def private_root() -> Path:
    """`<temp>/exgra-med-uploads-<uid>`, the folder of this user's `PrivateFolder`s: created with mode 0700; refused
    when it is not a folder owned by this user (someone else may have made it, in a shared /tmp)."""
    root = Path(tempfile.gettempdir()) / f"exgra-med-uploads-{os.getuid()}"
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise UserError(f"{root} is not a folder owned by this user: uploads cannot be kept there (remove it, or "
                        "point TMPDIR elsewhere)")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(root, 0o700)
    return root


class PrivateFolder:
    """A folder of one server's uploads, `private_root()/<kind>-<pid>-<random>` (mode 0700).

    It is locked (flock) while the process lives; `remove()` deletes it, and so does the exit of the process. Creating
    one first removes the unlocked folders, left by servers that were killed (SIGKILL, out of memory) before they
    could clean up: patient images do not outlive the server by more than its restart.
    """

    def __init__(self, kind: str):
        root = private_root()
        remove_leftovers(root)
        self.path, self._lock = _create_locked(root, kind)
        self._pid = os.getpid()
        atexit.register(self.remove)

    def remove(self) -> None:
        """Delete the folder and what it holds (idempotent; a forked child leaves its parent's folder alone)."""
        if self._lock is None or os.getpid() != self._pid:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)  # after the removal: no other server may take the folder for a leftover before
        self._lock = None
        atexit.unregister(self.remove)


def _try_lock(folder: Path) -> int | None:
    """An open descriptor of `folder` holding its exclusive lock, or None (locked by a live process, or gone)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _create_locked(root: Path, kind: str) -> tuple[Path, int]:
    # Made under a staging name, locked, then renamed: a folder under its final name is always locked while its
    # server lives. A staging folder that `remove_leftovers` takes meanwhile is simply made again.
    for _ in range(10):
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        fd = _try_lock(staging)
        if fd is None:
            continue
        folder = root / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(staging, folder)
        except OSError:
            os.close(fd)
            continue
        return folder, fd
    raise UserError(f"cannot create a private upload folder in {root}")


def remove_leftovers(root: Path | None = None) -> list[str]:
    """Delete the folders in `root` (default: `private_root()`) that no live process holds: the uploads of servers
    that were killed. Returns their names."""
    root = root or private_root()
    removed = []
    for entry in sorted(root.iterdir()):
        fd = _try_lock(entry)
        if fd is None:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(entry.name)
    if removed:
        logger.info("removed the uploads left by %d server(s) that did not stop cleanly", len(removed))
    return removed


class FolderAlias:
    """ASGI middleware that shows `folder` to clients as `alias`: the folder's path becomes the alias in JSON, text
    and event-stream responses, and the alias becomes the path in request paths and JSON request bodies.

    Gradio names an uploaded file by its server path (in the upload response, in file URLs, in outputs); behind this
    middleware, clients use the alias and no response names a server path. Other bodies (files) pass unchanged.
    """

    REWRITTEN_TYPES = (b"application/json", b"text/event-stream", b"text/plain")

    def __init__(self, app, folder: str | os.PathLike, alias: str):
        self.app = app
        self.folder, self.alias = str(folder), alias

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = dict(scope)
        if self.alias in scope["path"]:
            scope["path"] = scope["path"].replace(self.alias, self.folder)
            scope["raw_path"] = scope.get("raw_path", b"").replace(self.alias.encode(), self.folder.encode())
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").startswith(b"application/json"):
            receive = await self._rewritten_body(scope, receive)
        await self.app(scope, receive, self._rewriting(send))

    async def _rewritten_body(self, scope, receive):
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive  # the client went away: let the app see it
            body += message.get("body", b"")
            more = message.get("more_body", False)
        body = body.replace(self.alias.encode(), self.folder.encode())
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope["headers"].append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _rewriting(self, send):
        folder, alias = self.folder.encode(), self.alias.encode()
        start: dict | None = None  # held back until the first body chunk, when the new length is known
        rewrite = False
        held = b""  # the end of a chunk that may be the start of the folder's path, continued in the next chunk

        async def send_rewritten(message):
            nonlocal start, rewrite, held
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                rewrite = content_type.startswith(self.REWRITTEN_TYPES)
                if rewrite:
                    start = message
                    return
            if message["type"] != "http.response.body" or not rewrite:
                return await send(message)
            more = message.get("more_body", False)
            body = (held + message.get("body", b"")).replace(folder, alias)
            held = _path_start(body, folder) if more else b""
            body = body[: len(body) - len(held)]
            if start is not None:
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                if not more:
                    headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                start = None
            await send({**message, "body": body})

        return send_rewritten


def _path_start(body: bytes, path: bytes) -> bytes:
    """The longest end of `body` that is a proper start of `path`."""
    for size in range(min(len(path) - 1, len(body)), 0, -1):
        if body.endswith(path[:size]):
            return body[-size:]
    return b""
