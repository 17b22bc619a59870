"""The Gradio demo over real HTTP (gradio_client): the API's upload limits (bytes, pixels, decompression bombs),
conversations beyond the context refused with a message, no server paths in messages, uploads deleted on stop, files
named by URL refused with nothing fetched."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from exgra_med.model.auto import LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine

SETTINGS = GenerationSettings(max_new_tokens=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tiny_model_dir):
    from exgra_med.serve.web import launch_demo

    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))
    app, url = launch_demo(engine, "127.0.0.1", _free_port(), SETTINGS, examples_dir=None,
                           max_image_bytes=200_000, max_pixels=1_000_000)
    yield app, url, engine
    app.close()
    engine.close()


def _ask(url: str, image, question: str = "What color is the shape?", history=None) -> str:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    _, chat = client.predict(question, handle_file(str(image)) if image else None, history or [],
                             api_name="/respond")
    from exgra_med.serve.web import _text

    return _text(chat[-1]["content"])  # a string, or (Gradio 6) a list of text parts


def test_upload_limits_and_messages_without_paths(demo, tmp_path, bomb_png):
    app, url, engine = demo
    small = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(small)
    assert _ask(url, small) == engine.answer([("human", "What color is the shape?")], Image.open(small), SETTINGS)

    wide = tmp_path / "wide.png"  # 4 megapixels in a few kilobytes
    Image.new("RGB", (2000, 2000), (0, 0, 0)).save(wide)
    assert wide.stat().st_size < 200_000
    for image, expected in [(wide, "2000x2000 pixels > 1000000"), (bomb_png, "image too large")]:
        reply = _ask(url, image)
        assert reply.startswith("(cannot read the image: ") and expected in reply, reply
        assert str(app.upload_dir) not in reply and "/tmp" not in reply, reply

    noisy = tmp_path / "noise.bmp"  # 300 KB on disk: refused at upload (Gradio's max_file_size)
    Image.frombytes("RGB", (320, 320), bytes(range(256)) * 1200).save(noisy)
    assert noisy.stat().st_size > 200_000
    with pytest.raises(Exception, match="(?i)file size|too large|exceed"):
        _ask(url, noisy)


def test_a_forged_long_history_is_refused(demo):
    _, url, _ = demo
    history = [{"role": "user", "content": [{"type": "text", "text": "word " * 200000}]},
               {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    reply = _ask(url, None, "and?", history)
    assert "too long" in reply and "Clear history" in reply


def test_uploads_are_deleted_when_the_demo_stops(tiny_model_dir, tmp_path):
    from exgra_med.serve.web import launch_demo

    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))
    app, url = launch_demo(engine, "127.0.0.1", _free_port(), SETTINGS, examples_dir=None)
    try:
        image = tmp_path / "patient.png"
        Image.new("RGB", (32, 32), (10, 200, 10)).save(image)
        assert _ask(url, image)
        assert any(p.name == "patient.png" for p in app.upload_dir.rglob("*"))
    finally:
        app.close()
        engine.close()
    assert not app.upload_dir.exists()


@pytest.fixture
def remote_image(monkeypatch):
    """An HTTP server on 127.0.0.1 standing for a remote host: it serves a PNG at any path and records the requests
    it gets. Gradio's SSRF guard refuses loopback hosts, so it is told this one is public, as any internet host is."""
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import gradio.processing_utils

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(buf, format="PNG")
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(buf.getvalue())))
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(gradio.processing_utils, "PUBLIC_HOSTNAME_WHITELIST",
                        [*gradio.processing_utils.PUBLIC_HOSTNAME_WHITELIST, "127.0.0.1"])
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def _call(url: str, api: str, data: list) -> str:
    """One event through Gradio's REST API (POST, then the event's stream): the stream's text."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as http:
        event = http.post(f"gradio_api/call/{api}", json={"data": data})
        event.raise_for_status()
        return http.get(f"gradio_api/call/{api}/{event.json()['event_id']}").text


def test_files_named_by_url_are_refused_and_nothing_is_fetched(demo, remote_image):
    """The API's policy: a file sent as a Gradio FileData whose path is a URL (which Gradio would download) is refused
    with a message, whether it is the image input, a file in the chat history, or the preview's input."""
    _, url, _ = demo
    remote, requests = remote_image
    image = {"path": f"{remote}/scan.png", "url": f"{remote}/scan.png", "orig_name": "scan.png",
             "meta": {"_type": "gradio.FileData"}}
    history = [{"role": "user", "content": [{"type": "file", "file": image}]},
               {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    for api, data in [("respond", ["What color is it?", image, []]),
                      ("respond", ["What color is it?", None, history]),
                      ("preview", [image])]:
        stream = _call(url, api, data)
        assert requests == [], (api, stream[-300:])  # the "remote" host got nothing
        assert "event: error" in stream and "remote URLs are not fetched" in stream, (api, stream[-500:])
