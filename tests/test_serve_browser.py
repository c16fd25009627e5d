"""``vidlatent serve`` in a real browser: headless chromium (Debian's, driven by selenium) fills the generate,
edit and morph tabs of a server started on a free loopback port with the default model, waits for each video,
downloads it and checks its frames and size; a text file renamed .mp4 shows the job's one-line error.

Marked ``browser`` (out of the default run; ``.ci/run`` installs chromium and runs ``pytest -m browser``).
``VIDLATENT_SCREENSHOTS=docs`` also saves a screenshot of each tab there (how docs/serve-*.png were made).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TIMEOUT = 240  # seconds for one job on 2 busy CPU cores (loading the model included)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vidlatent.cli", "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the server did not answer: {log.read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.get(server)
    try:
        yield driver
    finally:
        driver.quit()


def _by():
    from selenium.webdriver.common.by import By

    return By


def _wait(driver, condition, what: str, timeout: float = TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: condition(d))
    except Exception:
        toasts = [t.text for t in driver.find_elements(_by().CSS_SELECTOR, ".toast-body")]
        raise AssertionError(f"timed out waiting for {what}; toasts on the page: {toasts}") from None


def _tab(driver, name: str):
    By = _by()
    tab = f"//button[@role='tab' and normalize-space()='{name}']"
    _wait(driver, lambda d: d.find_elements(By.XPATH, tab), f"the {name} tab button", 60)[0].click()
    _wait(driver, lambda d: d.find_element(By.ID, f"{name}-run").is_displayed(), f"the {name} tab", 10)


def _type(driver, elem_id: str, text) -> None:
    field = driver.find_element(_by().CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.clear()
    field.send_keys(str(text))


def _upload(driver, elem_id: str, path: Path) -> None:
    By = _by()
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))
    _wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, f"#{elem_id} .uploading"), "an upload", 30)
    time.sleep(1)


def _shot(driver, name: str) -> None:
    folder = os.environ.get("VIDLATENT_SCREENSHOTS")
    if folder:
        from PIL import Image

        path = Path(folder) / f"serve-{name}.png"
        driver.save_screenshot(str(path))
        image = Image.open(path).convert("RGB")  # small for docs/: 700 px wide, 64 colours
        image = image.resize((700, round(image.height * 700 / image.width)), Image.LANCZOS)
        image.quantize(64).save(path, optimize=True)


def _run_and_download(driver, name: str, tmp_path: Path) -> Path:
    """Click the tab's button, wait for its download link, fetch the file; returns its path."""
    By = _by()
    driver.find_element(By.ID, f"{name}-run").click()
    link = _wait(
        driver,
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, f"#{name}-download a[href]")), None),
        f"the {name} output",
    )
    href = link.get_attribute("href")
    out = tmp_path / f"{name}{Path(href.split('?')[0]).suffix}"
    with urllib.request.urlopen(href, timeout=30) as response:
        out.write_bytes(response.read())
    return out


def _frames_and_size(path: Path) -> tuple[int, int, int]:
    from vidlatent.data.io import read_video

    video, _ = read_video(str(path))
    return video.shape[1], video.shape[2], video.shape[3]


def _sampling(driver, steps: int, seed: int) -> None:
    _type(driver, "steps", steps)
    _type(driver, "seed", seed)


def test_generate_in_the_browser(browser, tmp_path):
    _tab(browser, "generate")
    _sampling(browser, 2, 7)
    _type(browser, "generate-prompt", "a red circle moving right")
    _type(browser, "generate-frames", 5)
    _type(browser, "generate-height", 64)
    _type(browser, "generate-width", 96)
    out = _run_and_download(browser, "generate", tmp_path)
    assert out.suffix == ".mp4"
    assert _frames_and_size(out) == (5, 64, 96)
    status = browser.find_element(_by().CSS_SELECTOR, "#status textarea").get_attribute("value")
    assert "seed 7" in status, status
    _shot(browser, "generate")


def test_progress_shows_and_cancel_stops_sampling(browser, tmp_path):
    """A 3000-step job shows its sampling progress; Cancel stops it, so the next job (queued behind it, one at
    a time) finishes in well under the minutes the long one would take."""
    By = _by()
    _tab(browser, "generate")
    _sampling(browser, 3000, 2)
    _type(browser, "generate-frames", 5)
    browser.find_element(By.ID, "generate-run").click()
    _wait(browser, lambda d: "sampling" in d.find_element(By.TAG_NAME, "body").text, "the progress", 120)
    browser.find_element(By.ID, "cancel").click()
    time.sleep(2)
    _sampling(browser, 2, 3)
    start = time.monotonic()
    browser.find_element(By.ID, "generate-run").click()
    _wait(browser, lambda d: "seed 3" in d.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value"),
          "the next job", 90)  # fmt: skip
    assert time.monotonic() - start < 90


def test_edit_in_the_browser(browser, tmp_path):
    _tab(browser, "edit")
    _sampling(browser, 2, 1)
    _upload(browser, "edit-input", DOCS / "generate.gif")  # 17 frames, 64x64
    _type(browser, "edit-prompt", "a blue circle moving right")
    _type(browser, "edit-source", "a red circle moving right")
    out = _run_and_download(browser, "edit", tmp_path)
    assert _frames_and_size(out) == (17, 64, 64)
    _shot(browser, "edit")


def test_morph_in_the_browser(browser, tmp_path):
    _tab(browser, "morph")
    _upload(browser, "morph-a", DOCS / "a.png")
    _upload(browser, "morph-b", DOCS / "b.png")
    _type(browser, "morph-frames", 9)
    out = _run_and_download(browser, "morph", tmp_path)
    assert _frames_and_size(out) == (9, 64, 64)
    _shot(browser, "morph")


def test_inpaint_with_an_uploaded_mask_in_the_browser(browser, tmp_path):
    _tab(browser, "inpaint")
    _sampling(browser, 2, 1)
    _upload(browser, "inpaint-input", DOCS / "input.gif")  # 17 frames, 64x64
    _upload(browser, "inpaint-mask", DOCS / "mask.png")
    _type(browser, "inpaint-prompt", "a green triangle moving left")
    out = _run_and_download(browser, "inpaint", tmp_path)
    assert _frames_and_size(out) == (17, 64, 64)
    _shot(browser, "inpaint")


def test_inpaint_with_a_mask_drawn_on_the_first_frame(browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains

    By = _by()
    browser.get(browser.current_url)  # a fresh page: no mask uploaded by the test above
    _tab(browser, "inpaint")
    _sampling(browser, 2, 1)
    _upload(browser, "inpaint-input", DOCS / "input.gif")  # its first frame appears in the editor
    time.sleep(2)
    browser.find_element(By.CSS_SELECTOR, "#inpaint-draw button[aria-label='Brush']").click()
    canvas = next(
        c for c in browser.find_elements(By.CSS_SELECTOR, "#inpaint-draw canvas") if c.is_displayed()
    )
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, -20, -20).click_and_hold()
    stroke.move_by_offset(40, 0).move_by_offset(0, 40).move_by_offset(-40, 0).release().perform()
    time.sleep(1)
    _type(browser, "inpaint-prompt", "a green square")
    out = _run_and_download(browser, "inpaint", tmp_path)
    assert _frames_and_size(out) == (17, 64, 64)
    status = browser.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")
    written = Path(status.split("wrote ", 1)[1].split(" (")[0])  # the server's folder: the same machine
    mask = np.asarray(Image.open(written.parent / "mask.png"))
    assert mask.shape == (64, 64) and 0 < (mask > 0).mean() < 1  # painted where the stroke went, not all


def test_encode_downloads_latents_and_statistics(browser, tmp_path):
    from vidlatent.data.latents import load_latents

    By = _by()
    _tab(browser, "encode")
    _upload(browser, "encode-input", DOCS / "a.png")
    browser.find_element(By.ID, "encode-run").click()
    links = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#encode-download a[href]"), "the latents"
    )
    got = {}
    for link in links:
        href = link.get_attribute("href")
        path = tmp_path / Path(href.split("?")[0]).name
        with urllib.request.urlopen(href, timeout=30) as response:
            path.write_bytes(response.read())
        got[path.suffix] = path
    assert set(got) == {".safetensors", ".yaml"}, got
    assert load_latents(got[".safetensors"])[0].shape[-3:] == (1, 8, 8)  # one frame, 64x64 / 8
    assert "latents_mean" in got[".yaml"].read_text()
    _shot(browser, "encode")


def test_a_bad_upload_shows_one_line(browser, tmp_path):
    By = _by()
    fake = tmp_path / "clip.mp4"
    fake.write_text("this is text, not a video\n")
    _tab(browser, "reconstruct")
    _upload(browser, "reconstruct-input", fake)
    browser.find_element(By.ID, "reconstruct-run").click()
    toast = _wait(
        browser,
        lambda d: next((t for t in d.find_elements(By.CSS_SELECTOR, ".toast-body") if t.text), None),
        "the error",
    )
    text = toast.text
    assert "clip.mp4" in text and "vidlatent reconstruct" in text, text
    assert "Traceback" not in text and 'File "' not in text, text
    _shot(browser, "error")
    if os.environ.get("VIDLATENT_SCREENSHOTS"):  # the tabs no test above fills, for docs/serve.md
        browser.get(browser.current_url)  # a fresh page: no error toast
        for name in ("animate", "control", "reconstruct"):
            _tab(browser, name)
            _shot(browser, name)
