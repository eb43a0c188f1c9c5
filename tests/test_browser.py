"""The web chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
pick two depths, type a prompt, send, watch both columns stream, save a screenshot to runs/screenshots/.
Skips itself where no browser is installed; .ci/run installs one."""

import shutil
from pathlib import Path

import pytest

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "screenshots" / "chat-two-depths.png"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no headless browser: needs chromium and "
                                "chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # no Selenium Manager download
    yield driver
    driver.quit()


# Counts, per column, how often the reply's text changed: more than a few changes means it streamed in.
WATCH = """
window.updates = {};
new MutationObserver((changes) => {
  for (const c of changes) {
    const msg = c.target.nodeType === 1 ? c.target : c.target.parentElement;
    if (msg && msg.classList.contains("assistant")) {
      const col = msg.closest(".column").id;
      window.updates[col] = (window.updates[col] || 0) + 1;
    }
  }
}).observe(document.getElementById("columns"), {childList: true, characterData: true, subtree: true});
"""


def test_two_depths_stream_side_by_side(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/")
    wait = WebDriverWait(browser, 30)
    boxes = wait.until(lambda b: len(found := b.find_elements(By.CSS_SELECTOR, "input[name=depth]")) == 2 and found)
    for box in boxes:  # start from none checked, then pick both
        if box.is_selected():
            box.click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".column")
    for box in boxes:
        box.click()
    assert [c.get_attribute("id") for c in browser.find_elements(By.CSS_SELECTOR, ".column")] == ["col-d1", "col-d2"]
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("60")
    browser.execute_script(WATCH)
    # Send, then Send again at once (one script, so the first cannot have finished): the second waits for
    # the first stream instead of interleaving the history; its text stays in the box, Send is disabled.
    waiting = browser.execute_script("""
      const box = document.getElementById("prompt"), send = document.getElementById("send");
      box.value = "Which depth writes the better poem?"; send.click();
      box.value = "second"; send.click();
      return [box.value, send.disabled];""")
    assert waiting == ["second", True]

    replies = wait.until(lambda b: len(done := b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done=true]"))
                         == 2 and done)
    assert all(r.text.strip() for r in replies), [r.text for r in replies]
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == \
        ["Which depth writes the better poem?"] * 2
    assert all("tokens" in m.text for m in browser.find_elements(By.CSS_SELECTOR, ".meta"))
    assert wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
    # a history too long for the context loses its oldest turns (a system message stays)
    assert browser.execute_script("""
      const h = [{role: "system"}, {role: "user"}, {role: "assistant"}, {role: "user"}, {role: "assistant"},
                 {role: "user"}];
      const steps = [];
      while (dropOldestTurn(h)) steps.push(h.map((m) => m.role[0]).join(""));
      return steps;""") == ["suau", "su"]
    updates = browser.execute_script("return window.updates")
    assert updates["col-d1"] > 3 and updates["col-d2"] > 3, updates  # text arrived piece by piece

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 20_000
