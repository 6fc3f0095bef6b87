"""The Gradio demo driven in headless Chromium (Debian's chromium + chromedriver, via Selenium), and its
gradio_client API: `python app.py --host 127.0.0.1 --port PORT` on the bundled digits model, offline."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from .conftest import free_port

pytestmark = pytest.mark.slow  # not in the fast run (-m 'not slow'): a browser drives the demo server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1800",
)
IMAGE_SIZE = 32  # the bundled digits model
WAIT_S = 60


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("app") / "app.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
        "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
    }
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"app.py did not answer on {url} within {WAIT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
    yield url
    process.terminate()
    process.wait(timeout=30)


def ensure_chromium() -> None:
    """Installs Debian's chromium and chromium-driver when they are missing, as .ci/run does (root, or sudo without a
    password, and apt-get); skips the test with the reason where this machine cannot, except under CI=true."""
    if os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER):
        return
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        prefix = None
    if prefix is None or not shutil.which("apt-get"):
        reason = "no root or sudo" if prefix is None else "no apt-get"
        message = f"needs Debian's chromium and chromium-driver, which this machine cannot install ({reason})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Under CI=true the browser test must run; it {message}.")
        pytest.skip(message)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        result = subprocess.run(prefix + command, env=env, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download drivers
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition(d) or None)
    except TimeoutException:
        pytest.fail(f"Timed out waiting for {what}.")


def loaded_image_sizes(driver, selector: str) -> list:
    """(naturalWidth, naturalHeight) of the loaded <img> elements under `selector`."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' img')]"
        ".filter(img => img.complete && img.naturalWidth > 0).map(img => [img.naturalWidth, img.naturalHeight]);",
        selector,
    )


def test_generate_and_inpaint_in_the_browser(browser, app_url):  # browser first: it may skip
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    picker = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#class-picker input"), "the class picker")
    picker[0].click()
    option = wait_for(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#class-picker li[aria-label="7"]'), "the option of digit 7"
    )
    option[0].click()
    wait_for(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#class-picker input").get_attribute("value") == "7",
        "digit 7 to be selected",
    )
    browser.find_element(By.CSS_SELECTOR, "#generate-button").click()
    sizes = wait_for(browser, lambda d: loaded_image_sizes(d, "#gallery"), "the gallery images")
    assert [IMAGE_SIZE, IMAGE_SIZE] in sizes
    assert "7 · seed 0" in browser.find_element(By.CSS_SELECTOR, "#gallery").text
    assert wait_for(browser, lambda d: loaded_image_sizes(d, "#order-map"), "the order map") == [[256, 256]]

    tab = [b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == "Inpaint"]
    tab[0].click()
    preset = wait_for(
        browser,
        lambda d: [
            label
            for label in d.find_elements(By.CSS_SELECTOR, "#mask-preset label")
            if label.text.strip() == "right half"
        ],
        "the mask presets",
    )
    preset[0].click()
    browser.find_element(By.CSS_SELECTOR, "#inpaint-button").click()
    sizes = wait_for(browser, lambda d: loaded_image_sizes(d, "#inpaint-result"), "the inpainted image")
    assert sizes == [[IMAGE_SIZE, IMAGE_SIZE]]


def test_gradio_client_generate_returns_an_image(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    path = client.predict(class_label="3", steps=4, guidance_scale=2.0, seed=11, api_name="/generate")
    with Image.open(path) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        first = image.tobytes()
    with Image.open(client.predict(3, 4, 2.0, 11, api_name="/generate")) as again:  # the int class works too
        assert again.tobytes() == first  # the same seed gives the same image
    with pytest.raises(Exception, match=r"The class label must be one of '0', '1', \.\.\., '9'.*got '10'"):
        client.predict(10, 4, 2.0, 11, api_name="/generate")


def test_app_reports_a_bad_model_in_one_line(capsys):
    from space.demo.app import main

    assert main(["--model", "/no/such/folder", "--port", str(free_port())]) == 1
    assert "app.py: error: --model '/no/such/folder' is neither a pipeline folder" in capsys.readouterr().err
