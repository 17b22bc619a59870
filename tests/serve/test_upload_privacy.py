"""Where uploaded images live: only in a private folder (mode 0700) under `<temp>/exgra-med-uploads-<uid>/`, removed
when a server stops, and, when a server was killed (SIGKILL, out of memory), by the next server that starts. Responses
name uploads by an alias, never by a server path. Real `exgra-med web` / `serve-api` processes with their own TMPDIR."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from PIL import Image


def _png(color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmpdir: Path, *command: str, ready: str) -> tuple[subprocess.Popen, str]:
    """A server CLI in a subprocess whose temporary folder is `tmpdir`; returns (process, URL) once it serves."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
               TMPDIR=str(tmpdir))
    proc = subprocess.Popen([sys.executable, "-m", "exgra_med.cli", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(ready):
            return proc, line.split(" on ", 1)[1].split()[0]
    proc.kill()
    pytest.fail("server did not start:\n" + "".join(lines[-30:]))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_uploads_stay_private_and_a_killed_servers_are_removed_at_the_next_start(tiny_model_dir, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    root = tmpdir / f"exgra-med-uploads-{os.getuid()}"
    web, url = _start(tmpdir, "web", "--model", str(tiny_model_dir), "--port", str(_free_port()),
                      "--max-new-tokens", "3", ready="ExGra-Med demo on")
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            upload = http.post("gradio_api/upload", files={"files": ("patient.png", _png(), "image/png")})
            assert upload.status_code == 200
            # The response names the upload without a server path; the alias works as a reference.
            (reference,) = upload.json()
            assert reference.endswith("/patient.png") and not reference.startswith("/"), reference
            assert str(tmpdir) not in upload.text and "exgra-med-uploads" not in upload.text, upload.text
            event = http.post("gradio_api/call/respond", json={"data": [
                "What color is the shape?", {"path": reference, "meta": {"_type": "gradio.FileData"}}, []]})
            answer = http.get(f"gradio_api/call/respond/{event.json()['event_id']}").text
            assert "event: complete" in answer and str(tmpdir) not in answer, answer[-500:]
        (stored,) = tmpdir.rglob("patient.png")
        assert stored.is_relative_to(root) and _mode(root) == 0o700
        server_folder = root / stored.relative_to(root).parts[0]
        assert server_folder.name.startswith(f"web-{web.pid}-") and _mode(server_folder) == 0o700
    finally:
        web.kill()  # SIGKILL: no clean-up runs
        web.wait(timeout=30)
    # What a killed server leaves: its folder, inside the private root, and nothing else in the temporary folder
    # (but torch's compiler cache, which holds no data).
    assert [p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")] == [root.name]
    assert [p.name for p in root.iterdir()] == [server_folder.name]

    # The next server (any of them) removes it as it starts; its own folder goes when it stops.
    api, api_url = _start(tmpdir, "serve-api", "--model", str(tiny_model_dir), "--port", "0", ready="serving model")
    try:
        assert httpx.get(f"{api_url}/models", timeout=30).status_code == 200  # up, and handling SIGTERM
        assert not server_folder.exists() and not list(tmpdir.rglob("patient.png"))
        assert [p.name.split("-")[:2] for p in root.iterdir()] == [["api", str(api.pid)]]
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
    assert list(root.iterdir()) == []


def test_the_api_decodes_uploads_in_its_private_folder(tiny_model_dir, tmp_path, monkeypatch):
    """The bytes of an `image_url` are decoded from a file in the server's private folder (mode 0700, under the
    private root), never a file in the shared temporary folder, and the file goes once decoded."""
    from fastapi.testclient import TestClient

    import exgra_med.serve.image_memory as image_memory
    from exgra_med.model.auto import LoadOptions
    from exgra_med.serve.api import create_app
    from exgra_med.serve.engine import GenerationSettings, InferenceEngine

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[tuple[Path, int, int]] = []
    load_image = image_memory.load_image

    def recording_load_image(path, side=None):
        path = Path(path)
        seen.append((path, _mode(path.parent), _mode(path.parent.parent)))
        return load_image(path, side)

    monkeypatch.setattr(image_memory, "load_image", recording_load_image)
    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))
    try:
        client = TestClient(create_app(engine, GenerationSettings(max_new_tokens=2)))
        url = f"data:image/png;base64,{base64.b64encode(_png()).decode()}"
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What color is the shape?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    finally:
        engine.close()
    assert reply.status_code == 200, reply.text
    ((path, folder_mode, root_mode),) = seen
    assert path.parent.parent == tmp_path / f"exgra-med-uploads-{os.getuid()}"
    assert folder_mode == 0o700 and root_mode == 0o700 and not path.exists()


def test_a_private_root_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    """In a shared /tmp, another user may create the root first: uploads are then refused a home, in one line."""
    from exgra_med.errors import UserError
    from exgra_med.serve.uploads import PrivateFolder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"exgra-med-uploads-{os.getuid()}").symlink_to(tmp_path)
    with pytest.raises(UserError, match="not a folder owned by this user"):
        PrivateFolder("api")


def test_leftovers_go_and_live_servers_folders_stay(tmp_path, monkeypatch):
    """A folder no process holds (a killed server's) is removed when a folder is made; one held is kept."""
    from exgra_med.serve.uploads import PrivateFolder, private_root

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = PrivateFolder("web")
    (live.path / "scan.png").write_bytes(b"live")
    dead = private_root() / "web-999999-deadbeef"
    dead.mkdir()
    (dead / "scan.png").write_bytes(b"left behind")
    other = PrivateFolder("api")
    assert not dead.exists() and (live.path / "scan.png").read_bytes() == b"live"
    assert sorted(p.name for p in private_root().iterdir()) == sorted([live.path.name, other.path.name])
    live.remove()
    other.remove()
    assert list(private_root().iterdir()) == []


def test_the_alias_hides_the_folder_in_split_chunks_and_translates_requests():
    """FolderAlias: the folder's path becomes the alias even when a streamed chunk ends inside it, lengths are
    corrected, file bodies pass unchanged, and the alias in a request path or JSON body becomes the path again."""
    import asyncio

    from exgra_med.serve.uploads import FolderAlias

    folder, alias = "/srv/tmp/exgra-med-uploads-7/web-1-ab", "upload-xyz"
    seen = {}

    async def app(scope, receive, send):
        seen["path"], seen["body"] = scope["path"], (await receive())["body"]
        seen["length"] = dict(scope["headers"]).get(b"content-length")
        kind = b"image/png" if scope["path"].endswith(".png") else b"text/event-stream"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind), (b"content-length", b"999")]})
        text = f'data: {{"path": "{folder}/h/x.png"}}\n\n'.encode()
        await send({"type": "http.response.body", "body": text[:20], "more_body": True})  # cut inside the path
        await send({"type": "http.response.body", "body": text[20:], "more_body": False})

    def run(path: str, body: bytes) -> tuple[list[dict], dict]:
        sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "raw_path": path.encode(),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        asyncio.run(FolderAlias(app, folder, alias)(scope, receive, send))
        return sent, dict(seen)

    request = f'{{"data": [{{"path": "{alias}/h/x.png"}}]}}'.encode()
    sent, got = run("/gradio_api/queue/join", request)
    assert got["body"] == request.replace(alias.encode(), folder.encode())
    assert got["length"] == str(len(got["body"])).encode()
    body = b"".join(m["body"] for m in sent[1:])
    assert body == f'data: {{"path": "{alias}/h/x.png"}}\n\n'.encode()
    assert b"content-length" not in dict(sent[0]["headers"])  # streamed: the length is no longer known
    sent, got = run(f"/gradio_api/file={alias}/h/x.png", b"{}")
    assert got["path"] == f"/gradio_api/file={folder}/h/x.png"
    assert folder.encode() in b"".join(m["body"] for m in sent[1:])  # a file's own bytes pass as they are
