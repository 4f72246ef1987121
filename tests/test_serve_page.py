"""The chat page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) driven by selenium against the
server with the demo model. Without Chromium this test fails: it does not skip.
"""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import mlx_llava
from mlx_llava.generate import Chat
from mlx_llava.serve import Settings, start
from mlx_llava.weights import default_model

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "scene.png"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def first(paths, what):
    found = next((p for p in paths if os.path.exists(p)), None) or shutil.which(Path(paths[0]).name)
    assert found, f"{what} is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)"
    return found


@pytest.fixture(scope="module")
def demo():
    return mlx_llava.load(default_model())


@pytest.fixture(scope="module")
def server(demo):
    with start(*demo, Settings(model_id="demo")) as running:
        yield running


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = first(CHROMIUM, "Chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(first(DRIVER, "chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def ask(driver, question, count):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 90).until(lambda d: len(answers(d)) == count
                                    and answers(d)[-1].get_attribute("data-state") == "done")
    answer = answers(driver)[-1]
    return answer.find_element(By.CSS_SELECTOR, ".text").text, int(answer.get_attribute("data-chunks"))


def test_chat_page(demo, server, browser, tmp_path):
    """Pick an image, ask, watch the answer stream in, ask a follow-up: the
    answers are `Chat`'s; stop an answer; start over. Saves a screenshot."""
    model, processor = demo
    chat = Chat(model, processor, image=str(IMAGE))
    expected = [chat.say("What is in the image?", max_tokens=-1), chat.say("What color is it?", max_tokens=-1)]

    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "demo")
    browser.find_element(By.ID, "file").send_keys(str(IMAGE))
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
    text, chunks = ask(browser, "What is in the image?", 1)
    assert text == expected[0] and chunks > 1  # streamed, piece by piece
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the image shown in the conversation
    text, chunks = ask(browser, "What color is it?", 2)
    assert text == expected[1] and chunks > 1
    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        low, high = image.convert("L").getextrema()
        assert image.size[0] >= 900 and high - low > 100  # a page, not a blank
    if os.environ.get("MLX_LLAVA_SCREENSHOT"):  # the README's picture: docs/serve-chat.png
        shutil.copy(shot, os.environ["MLX_LLAVA_SCREENSHOT"])

    # Stop an answer: the page keeps what came, the server cancels the request.
    scheduler = server.app.state.scheduler
    gen = scheduler.generator
    step = type(gen).next.__get__(gen)
    gen.next = lambda: time.sleep(0.4) or step()  # a slow model, so there is time to stop
    try:
        cancelled = httpx.get(server.url + "/stats").json()["cancelled"]
        browser.find_element(By.ID, "prompt").send_keys("Describe the image in detail.")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda d: int(answers(d)[-1].get_attribute("data-chunks") or 0) >= 1)
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 10).until(lambda d: answers(d)[-1].get_attribute("data-state") == "done")
        assert "stopped" in answers(browser)[-1].text
        WebDriverWait(browser, 10).until(lambda d: httpx.get(server.url + "/stats").json()["cancelled"] > cancelled)
    finally:
        gen.__dict__.pop("next", None)
    # Start over: the conversation is gone, and a new one begins afresh.
    browser.find_element(By.ID, "new").click()
    assert answers(browser) == [] and browser.find_element(By.ID, "empty").is_displayed()
    browser.find_element(By.ID, "file").send_keys(str(IMAGE))
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
    text, _ = ask(browser, "What is in the image?", 1)
    assert text == expected[0]
