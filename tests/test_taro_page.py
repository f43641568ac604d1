"""The live a_t page (GET /taro) in a real headless browser: Debian's chromium + chromedriver driven by Selenium
(.ci/run installs them; skipped, saying why, where they are missing). The page streams a prompt through the server
and shades every token by its a_t; the a_t it shows must be the engine's (the trace endpoint's) for that request."""

import re
import shutil

import httpx
import pytest

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    try:
        b = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    except Exception as e:  # noqa: BLE001 - a browser that cannot start here is a missing tool, not a page bug
        pytest.skip(f"chromium is installed but does not start here: {str(e).splitlines()[0][:300]}")
    yield b
    b.quit()


def test_the_page_uses_no_external_assets(server):
    page = httpx.get(server + "/taro")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)


@pytest.mark.parametrize("api,mode", [("chat", "router"), ("completions", "fixed")])
def test_a_prompt_streams_and_each_token_is_shaded_by_the_a_t_the_engine_used(browser, server, api, mode):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/taro")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Tom has 3 pens and buys 4 more. How many pens?")
    Select(browser.find_element(By.ID, "api")).select_by_value(api)
    Select(browser.find_element(By.ID, "mode")).select_by_value(mode)
    for field, value in (("alpha", "0.25"), ("max_tokens", "12")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "send").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 120).until(lambda b: status.text == "done" or status.text.startswith("error"))
    assert status.text == "done"

    spans = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
    shown = [float(s.get_attribute("data-alpha")) for s in spans]
    recorded = httpx.get(f"{server}/v1/taro/alphas/{status.get_attribute('data-trace')}").json()["alphas"]
    assert shown == recorded and len(shown) > 0
    if mode == "fixed":
        assert set(shown) == {0.25}
    assert all("background" in (s.get_attribute("style") or "") for s in spans)
    rows = browser.find_elements(By.CSS_SELECTOR, "#classes tr")
    assert len(rows) >= 2  # a header and at least one token class
    assert f"{len(shown)} tokens" in browser.find_element(By.ID, "metrics").text
