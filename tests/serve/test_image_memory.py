"""The image memory budget of a server (`exgra_med.serve.image_memory`): the accounting alone, and a real `serve-api`
on 127.0.0.1 sent large-canvas PNGs (6300 x 6300 pixels, ~130 kB each) concurrently, whose peak RSS must stay within
the budget it was given."""

from __future__ import annotations

import base64
import struct
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from exgra_med.data.images import ImageLoadError
from exgra_med.serve.image_memory import ImageMemoryBudget, ImageMemoryBusyError
from exgra_med.serve.uploads import UploadError
from tests.conftest import start_api_server

MB = 1024 * 1024
SIDE = 6300  # under the default 40 Mpx limit; ~150 MB decoded (PIL keeps RGB in 4 bytes a pixel)
COLOUR = (200, 30, 30)
BUDGET_MB = 200  # one such decode at a time
REQUESTS = 4
# Beyond the budget: request bodies, the server's threads, allocator slack; far below one more decode (~150 MB).
SLACK_MB = 120


def _run_in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_budget_counts_reservations_and_admits_waiters_in_order():
    budget = ImageMemoryBudget(100, wait_s=30)
    order, entered = [], threading.Event()
    with budget.reserve(60):
        assert (budget.used, budget.active) == (60, 1)

        def waiter(name: str, nbytes: int):
            def run():
                with budget.reserve(nbytes):
                    order.append((name, budget.used))
                    entered.set()
            return run

        # 50 does not fit beside 60: it waits, and so does 10 behind it (first come, first served), although it fits.
        big = _run_in_thread(waiter("big", 50))
        while len(budget._waiting) < 1:
            threading.Event().wait(0.001)
        small = _run_in_thread(waiter("small", 10))
        while len(budget._waiting) < 2:
            threading.Event().wait(0.001)
        assert order == [] and budget.used == 60
    big.join(10)
    small.join(10)
    assert [name for name, _ in order] == ["big", "small"]
    assert all(used <= 100 for _, used in order)
    assert (budget.used, budget.active, budget.peak) == (0, 0, max(60, *(u for _, u in order)))


def test_budget_refuses_what_never_fits_and_what_waits_too_long():
    budget = ImageMemoryBudget(100, wait_s=0.05, max_waiting=1)
    with pytest.raises(UploadError) as error:
        with budget.reserve(101):
            pass
    assert error.value.status == 413 and "--max-image-memory-mb" in str(error.value)
    with budget.reserve(80):
        with pytest.raises(ImageMemoryBusyError) as busy:  # 30 more do not fit within wait_s
            with budget.reserve(30):
                pass
        assert busy.value.status == 429 and "--max-image-memory-mb" in str(busy.value)
    assert (budget.used, budget.active) == (0, 0)  # a refused reservation holds nothing


def test_budget_refuses_beyond_max_waiting_at_once():
    budget = ImageMemoryBudget(100, wait_s=30, max_waiting=1)
    with budget.reserve(100):
        waiter = _run_in_thread(lambda: budget.reserve(1).__enter__())
        while len(budget._waiting) < 1:
            threading.Event().wait(0.001)
        with pytest.raises(ImageMemoryBusyError, match="1 requests already wait"):
            with budget.reserve(1):
                pass
    waiter.join(10)


def _solid_png(side: int) -> bytes:
    """A `side` x `side` RGB PNG of one colour, written row block by row block (PIL's encoder takes 2 s at 6300)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, deflate = (b"\x00" + bytes(COLOUR) * side) * 100, zlib.compressobj(9)
    row_bytes = 3 * side + 1
    idat = b"".join(deflate.compress(rows[: min(100, side - start) * row_bytes]) for start in range(0, side, 100))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat + deflate.flush()) + chunk(b"IEND", b"")


def _png_body(side: int) -> dict:
    png = _solid_png(side)
    assert len(png) < 200_000  # a small request, whatever the canvas
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    return {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."}, {"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 4}


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's peak RSS from /proc")
@pytest.mark.slow
def test_concurrent_large_images_stay_within_the_budget(tiny_model_dir):
    """4 concurrent 6300x6300 PNGs (before the budget: ~0.5 GB each to decode, convert and preprocess at full size,
    all at once) against --max-image-memory-mb 200: the server's peak RSS during the burst stays within the budget and
    a stated slack, every request gets the answer (200) or the documented refusal (429), and the memory is given back.
    """
    proc, url = start_api_server(tiny_model_dir, "--max-new-tokens", "4", "--max-image-memory-mb", str(BUDGET_MB),
                                 drain=True)
    body = _png_body(SIDE)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            # Warm up (the first request's one-off allocations) with a small image of the same solid colour: the
            # model sees the same pixels for the large one, reduced or not, so this is the answer to expect.
            first = http.post("/chat/completions", json=_png_body(64))
            assert first.status_code == 200, first.text
            expected = first.json()["choices"][0]["message"]["content"]
            baseline_kb = _status_kb(proc.pid, "VmRSS")
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the burst only
            with ThreadPoolExecutor(REQUESTS) as pool:
                replies = list(pool.map(lambda _: http.post("/chat/completions", json=body), range(REQUESTS)))
            peak_kb, after_kb = _status_kb(proc.pid, "VmHWM"), _status_kb(proc.pid, "VmRSS")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, [r.text for r in replies]
    assert 200 in statuses
    for reply in replies:
        if reply.status_code == 200:
            assert reply.json()["choices"][0]["message"]["content"] == expected
        else:
            assert "--max-image-memory-mb" in reply.json()["error"]["message"]
            assert reply.headers["retry-after"] == "1"
    growth_mb, kept_mb = (peak_kb - baseline_kb) / 1024, (after_kb - baseline_kb) / 1024
    assert growth_mb <= BUDGET_MB + SLACK_MB, f"peak RSS grew by {growth_mb:.0f} MB, budget {BUDGET_MB} MB"
    assert kept_mb <= SLACK_MB, f"{kept_mb:.0f} MB still held after the burst"


def test_the_web_demo_decodes_within_the_same_budget(tmp_path):
    """The demo's uploads go through the API's decoder: reduced for the model, refused beyond the budget with a message
    naming the flag and no server path; both servers take --max-image-memory-mb."""
    from exgra_med.serve.api import build_parser as api_parser
    from exgra_med.serve.image_memory import ImageDecoder
    from exgra_med.serve.web import build_parser as web_parser
    from exgra_med.serve.web import open_upload

    path = tmp_path / "scan.png"
    path.write_bytes(_solid_png(700))
    roomy = ImageDecoder(ImageMemoryBudget(10 * MB), side=64, max_pixels=10**6)
    with open_upload(str(path), roomy) as image:
        assert image.size == (234, 234) and roomy.budget.active == 1  # held while the image is in use
    assert roomy.budget.used == 0 and roomy.budget.peak == 700 * 700 * 4 + 234 * 234 * (4 + 16)
    with pytest.raises(ImageLoadError, match="--max-image-memory-mb") as error:
        with open_upload(str(path), ImageDecoder(ImageMemoryBudget(MB), side=32, max_pixels=10**6)):
            pass
    assert str(tmp_path) not in str(error.value)
    for parser in (api_parser(), web_parser()):
        assert parser.parse_args(["--model", "m", "--max-image-memory-mb", "300"]).max_image_memory_mb == 300
