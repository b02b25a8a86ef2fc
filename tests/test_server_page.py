"""The server's page in a real headless browser: Debian's chromium and chromium-driver, driven by Selenium
(no tool downloads a browser). Pick an image, submit an edit, watch the progress bar move, see the result
with its download link; then a file that is not an image gives an inline error. Without the browser the
test fails, naming the packages: CI installs them."""
import time
from pathlib import Path

import pytest

import engine.server.worker as worker_mod
from tests.test_pipeline_text import text_snapshot  # noqa: F401 (fixture)
from tests.test_server import png, running, serve_args, small_area  # noqa: F401 (fixture)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS, STEP_SECONDS = 8, 0.15       # the edit is slowed so the page polls (every 150 ms) several steps
pytestmark = pytest.mark.usefixtures("one_thread", "small_area")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    monkeypatch.setenv("SE_OFFLINE", "true")       # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def slow_edit(monkeypatch):
    real = worker_mod.edit

    def edit(models, images, *tensors, progress=None):
        def step(i):
            time.sleep(STEP_SECONDS)
            progress(i)
        return real(models, images, *tensors, progress=step)
    monkeypatch.setattr(worker_mod, "edit", edit)


def state(driver):
    return driver.execute_script(
        "const $ = (id) => document.getElementById(id);"
        "return {value: $('progress').value, max: $('progress').max, status: $('status').textContent,"
        " error: $('error').textContent, width: $('result').naturalWidth, height: $('result').naturalHeight,"
        " shown: !$('result').classList.contains('hidden'), href: $('download').getAttribute('href'),"
        " name: $('download').getAttribute('download')}")


def wait(driver, done, timeout=30):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        s = state(driver)
        seen.append(s)
        if done(s):
            return s, seen
        time.sleep(0.02)
    raise AssertionError(f"the page did not get there; last state {seen[-1]}")


def test_page_edits_and_shows_errors(text_snapshot, browser, slow_edit, tmp_path):
    from selenium.webdriver.common.by import By
    (tmp_path / "cat.png").write_bytes(png(100, 80))
    (tmp_path / "notes.txt").write_text("not an image")
    with running(serve_args(text_snapshot)) as (url, _):
        browser.get(url + "/")
        info, _ = wait(browser, lambda s: True)
        assert "QwenImageEditPipeline" in browser.find_element(By.ID, "info").text
        browser.find_element(By.ID, "images").send_keys(str(tmp_path / "cat.png"))
        browser.find_element(By.ID, "prompt").send_keys("make it snowy")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys(str(STEPS))
        browser.find_element(By.ID, "go").click()
        done, seen = wait(browser, lambda s: s["shown"] and s["width"] > 0)
        values = [s["value"] for s in seen if s["max"] == STEPS]
        moving = sorted({v for v in values if 0 < v < STEPS})
        print(f"progress values seen: {sorted(set(values))}")
        assert len(moving) >= 2 and values == sorted(values), values     # it moved, and only forward
        assert done["value"] == STEPS and done["status"] == f"done: step {STEPS} of {STEPS}" and not done["error"]
        assert (done["width"], done["height"]) == (96, 96)                # the 100x80 input's size (small area)
        assert done["href"].startswith("blob:") and done["name"].startswith("edit-") and done["name"].endswith(".png")
        browser.save_screenshot(str(tmp_path / "done.png"))

        picker = browser.find_element(By.ID, "images")
        picker.clear()                  # a second pick would add to the first
        picker.send_keys(str(tmp_path / "notes.txt"))
        browser.find_element(By.ID, "go").click()
        failed, _ = wait(browser, lambda s: s["error"])
        assert failed["error"].startswith("cannot read image notes.txt: not an image file"), failed
        assert failed["shown"]          # the previous result stays
        browser.save_screenshot(str(tmp_path / "error.png"))
