"""The Gradio demo in a real headless Chromium (selenium): the page loads with the research-use notice, an uploaded
image and a question produce the model's answer, history clears, DICOM previews; no file outside uploads and
examples is served. Skipped when chromium / chromedriver / selenium are absent (CI installs them)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from exgra_med.constants import RESEARCH_USE_NOTICE
from exgra_med.model.auto import LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000"]
SETTINGS = GenerationSettings(max_new_tokens=6)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium + chromium-driver (apt-get install -y chromium chromium-driver)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tiny_model_dir):
    """(engine, base URL) of a running demo bound to 127.0.0.1."""
    from exgra_med.serve.web import launch_demo

    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))
    app, url = launch_demo(engine, "127.0.0.1", _free_port(), SETTINGS, ASSETS)
    assert url.startswith("http://127.0.0.1:")
    yield engine, url
    app.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _bot_messages(driver) -> list[str]:
    # One script call reads all messages at once: no stale element while Gradio re-renders the chat.
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#chatbot [data-testid=\"bot\"]'))"
        ".map(e => e.innerText.trim());"
    )


def test_upload_ask_answer_clear(demo, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine, url = demo
    question = "What shape is in the image?"
    image = ASSETS / "red_circle.png"
    expected = engine.answer([("human", question)], image, SETTINGS)
    assert expected
    wait = WebDriverWait(browser, 90)
    browser.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    assert RESEARCH_USE_NOTICE in browser.find_element(By.ID, "notice").text
    browser.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]").send_keys(str(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-preview img"))
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: _bot_messages(d) == [expected])
    shot = tmp_path / "web_demo.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    # Second turn, then the clear button empties the conversation.
    expected2 = engine.answer([("human", question), ("gpt", expected), ("human", "Is it red?")], image, SETTINGS)
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("Is it red?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: _bot_messages(d) == [expected, expected2])
    browser.find_element(By.ID, "clear").click()
    wait.until(lambda d: _bot_messages(d) == [])


def test_dicom_upload_previews_and_answers(demo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine, url = demo
    dicom = ASSETS / "ct_slice.dcm"
    expected = engine.answer([("human", "What kind of scan is this?")], dicom, SETTINGS)
    wait = WebDriverWait(browser, 90)
    browser.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    browser.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]").send_keys(str(dicom))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-preview img"))
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What kind of scan is this?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: _bot_messages(d) == [expected])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_serves_no_file_outside_uploads_and_examples(demo, tiny_model_dir):
    _, url = demo
    assert _status(f"{url}gradio_api/file={ASSETS / 'red_circle.png'}") == 200
    for outside in (tiny_model_dir / "config.json", Path(__file__), Path(os.__file__)):
        assert _status(f"{url}gradio_api/file={outside}") in (403, 404), outside
