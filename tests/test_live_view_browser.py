"""The live view of a real daemon (`inspectd run`, two synthetic cameras, the demo model) in a real browser:
Debian's Chromium, headless, driven by Selenium through Debian's chromedriver (no download). The page's DOM,
live pictures that change, recent defects, the detail view, the collection buttons; the files collected
are read by a real `inspectd train`. The screenshot the README shows is the one this test takes (set
INSPECTD_UI_SCREENSHOT=PATH to keep it)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli
from daemon_util import DaemonProcess, camera_toml, daemon_config, free_port
from support import wait_until

from inspectd.outputs.live import placeholder
from inspectd.outputs.ui import STATIC

pytestmark = pytest.mark.slow

CAMERAS = ("line1-top", "line1-side")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    port = free_port()
    # Two models (both the demo model, under ids of their own): each tile names its camera's.
    models = [{"id": camera.removeprefix("line1-"), "path": "builtin:demo"} for camera in CAMERAS]
    cams = "".join(
        camera_toml(c, f"synthetic://?fps=8&width=320&height=240&defect_rate=0.4&seed={i + 1}", model=c.removeprefix("line1-"))
        for i, c in enumerate(CAMERAS)
    )
    config, urls = daemon_config(
        tmp, cams, models=models, ui={"enabled": True, "port": port, "max_fps": 4, "collect_dir": str(tmp / "collected")}
    )
    with DaemonProcess(config, tmp / "daemon.log") as proc:
        proc.wait_ready(urls["metrics"])
        proc.url, proc.collect_dir = f"http://127.0.0.1:{port}/", tmp / "collected"
        yield proc


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # Debian's driver: nothing downloaded
    yield driver
    driver.quit()


def _rate(text: str) -> float:
    """'7.9 frames/s' -> 7.9 (0 for anything else)."""
    number, _, unit = text.partition(" ")
    try:
        return float(number) if unit == "frames/s" else 0.0
    except ValueError:
        return 0.0


def _loaded(driver, image) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))


# The recent list is read and clicked in one script each: at 0.4 defects a frame, entries fall off the list
# between two WebDriver calls, and an element found in one is stale in the next (as CI once saw).
_RECENT = "[...document.querySelectorAll('#recent li')]"


def _recent_cameras(driver) -> list[str]:
    return driver.execute_script(f"return {_RECENT}.map((li) => li.dataset.camera)")


def _a_thumbnail_loaded(driver) -> bool:
    return bool(
        driver.execute_script(
            f"return {_RECENT}.some((li) => {{ const i = li.querySelector('img'); return i.complete && i.naturalWidth > 0; }})"
        )
    )


def _open_first_recent(driver) -> str | None:
    """Click the newest entry; its camera, or None when the list is empty."""
    return driver.execute_script(
        "const li = document.querySelector('#recent li'); if (!li) return null; li.click(); return li.dataset.camera;"
    )


def test_the_page_shows_every_camera_live_with_recent_defects(daemon, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(daemon.url)
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "article.tile")) == 2, 30, "two camera tiles")
    tiles = browser.find_elements(By.CSS_SELECTOR, "article.tile")
    assert sorted(t.get_attribute("data-camera") for t in tiles) == sorted(CAMERAS)
    for tile in tiles:
        wait_until(lambda t=tile: t.find_element(By.CSS_SELECTOR, ".state").text == "up", 30, "the camera up")
        wait_until(
            lambda t=tile: _rate(t.find_element(By.CSS_SELECTOR, ".fps").text) > 0,
            30,
            lambda t=tile: f"frames/s inspected shown, got {t.text!r}",
        )
    for tile in tiles:  # the model each camera's frames go to, as [[cameras]] model says
        model = tile.get_attribute("data-camera").removeprefix("line1-")
        assert tile.find_element(By.CSS_SELECTOR, ".model").text == f"{model} (demo)", tile.text
    summary = browser.find_element(By.ID, "summary").text
    assert "models top, side" in summary or "models side, top" in summary, summary
    live = tiles[0].find_element(By.CSS_SELECTOR, "img.live")
    wait_until(lambda: _loaded(browser, live), 30, "the live picture")
    first = live.screenshot_as_png
    # The picture is live: a later screenshot of the same element differs (frames move at 8/s, pictures at 4/s).
    wait_until(lambda: live.screenshot_as_png != first, 10, "the live picture to change")
    wait_until(lambda: _recent_cameras(browser), 60, "a recent defect listed")
    wait_until(lambda: _a_thumbnail_loaded(browser), 30, "its thumbnail")
    # For the screenshot: a frame judged defective on show, as on a line with a problem.
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "article.tile.defect"), 30, "a defective frame")
    shot = tmp_path / "live-view.png"
    browser.save_screenshot(str(shot))
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[1] == 1280
    if os.environ.get("INSPECTD_UI_SCREENSHOT"):
        shutil.copy(shot, os.environ["INSPECTD_UI_SCREENSHOT"])

    camera = _open_first_recent(browser)
    assert camera in CAMERAS
    dialog = browser.find_element(By.ID, "detail")
    wait_until(lambda: dialog.get_attribute("open") is not None, 10, "the detail view open")
    wait_until(lambda: '"schema": "inspectd.event/1"' in browser.find_element(By.ID, "detail-header").text, 10, "the header JSON")
    header = json.loads(browser.find_element(By.ID, "detail-header").text)
    assert header["camera"] == camera and header["is_defect"] is True and header["topic"] == f"defect.{camera}"
    for image_id in ("detail-overlay", "detail-frame", "detail-mask"):
        wait_until(lambda i=image_id: _loaded(browser, browser.find_element(By.ID, i)), 10, image_id)
    # The legend names the map drawn ([ui] map: relative by default); the probability map is one click away.
    assert browser.find_element(By.ID, "legend-low").text == "map: out"
    overlay = browser.find_element(By.ID, "detail-overlay")
    assert "map=relative" in overlay.get_attribute("src")
    relative = overlay.screenshot_as_png
    browser.find_element(By.ID, "detail-other-map").click()
    wait_until(lambda: "map=probability" in overlay.get_attribute("src") and _loaded(browser, overlay), 10, "the other map")
    wait_until(lambda: overlay.screenshot_as_png != relative, 10, "the probability overlay drawn")
    assert browser.find_element(By.ID, "detail-other-map").text == "show the map relative to the mask threshold"
    browser.find_element(By.ID, "detail-close").click()

    # The camera filter lists only that camera's defects.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "camera-filter")).select_by_value(CAMERAS[1])
    wait_until(lambda: set(_recent_cameras(browser)) == {CAMERAS[1]}, 20, "only the chosen camera's defects")


def test_the_collection_buttons_save_frames_train_reads(daemon, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(daemon.url)
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "article.tile button[data-label]")) == 4, 30, "the collection buttons"
    )
    for tile in browser.find_elements(By.CSS_SELECTOR, "article.tile"):
        for label in ("ok", "defect"):
            before = tile.find_element(By.CSS_SELECTOR, ".collect .muted").text
            tile.find_element(By.CSS_SELECTOR, f"button[data-label='{label}']").click()
            wait_until(
                lambda t=tile, b=before: t.find_element(By.CSS_SELECTOR, ".collect .muted").text not in (b, "saving…"),
                10,
                "the save to answer",
            )
            assert tile.find_element(By.CSS_SELECTOR, ".collect .muted").text.startswith(f"saved {label}/")
    # Two more frames of each class over HTTP, new frames each time, then train on what was collected.
    for label in ("ok", "defect", "ok", "defect"):
        count = len(list((daemon.collect_dir / label).glob("*.png")))
        request = urllib.request.Request(
            daemon.url + "api/collect",
            method="POST",
            data=json.dumps({"camera": CAMERAS[0], "label": label}).encode(),
            headers={"Content-Type": "application/json", "X-Inspectd-Collect": "1"},
        )
        wait_until(
            lambda r=request, n=count, lb=label: (
                urllib.request.urlopen(r, timeout=5).status == 200 and len(list((daemon.collect_dir / lb).glob("*.png"))) > n
            ),
            10,
            "a new frame saved",
        )
    # A recent defect accepted with its regions as the mask: the frame into defect/, the regions into masks/.
    wait_until(lambda: _open_first_recent(browser), 60, "a recent defect to open")
    wait_until(lambda: browser.find_element(By.ID, "detail-save-mask").is_displayed(), 10, "the save-with-mask button")
    browser.find_element(By.ID, "detail-save-mask").click()
    result = browser.find_element(By.ID, "detail-save-result")
    wait_until(lambda: result.text not in ("", "saving…"), 10, "the save to answer")
    assert result.text.startswith("saved defect/") and result.text.endswith(" with its mask"), result.text
    (mask,) = (daemon.collect_dir / "masks").glob("*.png")
    assert (daemon.collect_dir / "defect" / mask.name).is_file()
    regions = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    assert regions.shape == (240, 320) and set(np.unique(regions)) == {0, 255}
    browser.find_element(By.ID, "detail-close").click()
    saved = {label: sorted((daemon.collect_dir / label).glob("*.png")) for label in ("ok", "defect")}
    assert [len(v) for v in saved.values()] == [4, 5], saved
    for path in saved["ok"] + saved["defect"]:
        assert cv2.imread(str(path)).shape == (240, 320, 3)
    assert not [p for p in daemon.collect_dir.rglob("*") if p.is_file() and p.suffix != ".png"]
    run = run_cli(
        "train",
        daemon.collect_dir,
        "--out",
        tmp_path / "m.keras",
        "--weights",
        "none",
        "--epochs",
        "1",
        "--backbone",
        "efficientnetv2b0",
        "--input-size",
        "64x64",
        "--batch-size",
        "4",
        "--val-fraction",
        "0.25",
    )
    assert run.returncode == 0, run.stderr
    assert "checking 9 images" in run.stderr and "train 7 images: 3 ok, 4 defect" in run.stderr, run.stderr
    assert (tmp_path / "m.keras").stat().st_size > 0


def test_the_painter_saves_the_mask_a_person_paints(daemon, browser):
    """The detail view's painter: clear the regions, paint a horizontal stroke with the mouse, erase its middle
    with a vertical one, save: the mask saved beside the frame is the stroke less the erased part, at the frame's
    size (320 x 240), 0 or 255, nothing painted elsewhere."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(daemon.url)
    wait_until(lambda: _open_first_recent(browser), 60, "a recent defect to open")
    canvas = browser.find_element(By.ID, "painter-mask")
    wait_until(lambda: browser.execute_script("return arguments[0].width", canvas) == 320, 10, "the canvas at the frame's size")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    browser.find_element(By.ID, "painter-clear").click()
    browser.execute_script("const s = document.getElementById('brush-size'); s.value = 8; s.dispatchEvent(new Event('input'))")
    assert browser.find_element(By.ID, "brush-size-value").text == "8"
    scale = 320 / canvas.rect["width"]  # frame pixels per CSS pixel; offsets below are from the canvas' centre
    ActionChains(browser).move_to_element_with_offset(canvas, -60, 0).click_and_hold().move_by_offset(120, 0).release().perform()
    browser.find_element(By.CSS_SELECTOR, "input[name=brush][value=erase]").click()
    ActionChains(browser).move_to_element_with_offset(canvas, 0, -20).click_and_hold().move_by_offset(0, 40).release().perform()
    masks = daemon.collect_dir / "masks"
    before = set(masks.glob("*.png")) if masks.is_dir() else set()
    browser.find_element(By.ID, "painter-save").click()
    result = browser.find_element(By.ID, "painter-result")
    wait_until(lambda: result.text not in ("", "saving…"), 10, "the save to answer")
    assert result.text.startswith("saved defect/") and result.text.endswith(" with the painted mask"), result.text
    (path,) = set(masks.glob("*.png")) - before
    assert (daemon.collect_dir / "defect" / path.name).is_file()
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (240, 320) and set(np.unique(mask)) == {0, 255}
    cx, cy, reach = 160, 120, round(60 * scale)
    assert mask[cy, cx - reach // 2] == 255 and mask[cy, cx + reach // 2] == 255  # the stroke
    assert mask[cy, cx] == 0  # erased
    ys, xs = np.nonzero(mask)
    assert cy - 6 <= ys.min() and ys.max() <= cy + 6, (ys.min(), ys.max())  # a brush of 8: 4 either side, +1 rounding
    assert cx - reach - 6 <= xs.min() and xs.max() <= cx + reach + 6, (xs.min(), xs.max())
    browser.find_element(By.ID, "detail-close").click()


def test_the_page_never_builds_html_from_data():
    """Everything the daemon sends is put on the page as text (textContent), never parsed as HTML."""
    script = (STATIC / "live.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "textContent" in script and "encodeURIComponent" in script


def test_a_stream_of_the_daemon_is_mjpeg(daemon):
    """The live stream of the real daemon: multipart JPEG pictures of the camera's frame size (320 wide)."""
    waiting = placeholder("waiting for a frame")
    with urllib.request.urlopen(daemon.url + f"stream?camera={CAMERAS[0]}", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
        data, pictures = b"", []
        while len(pictures) < 3:
            data += response.read1(65536)
            while b"\xff\xd9" in data:  # a JPEG ends (0xFFD9 never occurs inside one's entropy-coded data)
                end = data.index(b"\xff\xd9") + 2
                pictures.append(data[data.index(b"\xff\xd8") : end])
                data = data[end:]
    drawn = [p for p in pictures if p != waiting]
    assert drawn, "only placeholders"
    for jpeg in drawn:
        picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape == (240, 320, 3)


def test_a_start_that_fails_after_the_view_is_bound_still_exits(tmp_path):
    """The view's port is bound before the model loads: a model that cannot load must still end the daemon with
    its exit code (a server bound but never started must not hang the shutdown)."""
    import subprocess
    import sys

    from daemon_util import ROOT

    config, _ = daemon_config(
        tmp_path,
        camera_toml("cam-1", "synthetic://?fps=5"),
        model=str(tmp_path / "none.keras"),
        ui={"enabled": True, "port": free_port()},
    )
    run = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 66, run.stderr
    assert "none.keras" in run.stderr


def test_the_readme_screenshot_exists():
    shot = Path(__file__).resolve().parents[1] / "docs" / "img" / "live-view.png"
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[1] == 1280
