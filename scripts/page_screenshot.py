"""README's screenshot of the live a_t page: `taro-vllm demo` (the TAWP recipe's router when it has been run) with
--taro-return-alphas, one prompt streamed through GET /taro in headless chromium, the page saved as a PNG.

    python scripts/page_screenshot.py [--out docs/taro_page.png] [--eager]

Needs Debian's chromium + chromedriver and selenium (what tests/test_taro_page.py uses).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("Mia has 7 apples. She buys 5 more apples and gives 3 to Leo. How many apples does she have now?")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "taro_page.png")
    p.add_argument("--eager", action="store_true", help="start the demo without torch.compile (faster start)")
    p.add_argument("--max-tokens", default="60")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from benchmarks.server_process import running_server

    demo_args = ["--taro-return-alphas"] + (["--enforce-eager"] if args.eager else [])
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(demo_args, Path(tmp) / "demo.log", timeout=1200, command="demo") as (url, _proc, _):
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
        try:
            browser.get(url + "/taro")
            box = browser.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(PROMPT)
            Select(browser.find_element(By.ID, "mode")).select_by_value("router")
            tokens = browser.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys(args.max_tokens)
            browser.find_element(By.ID, "send").click()
            status = browser.find_element(By.ID, "status")
            WebDriverWait(browser, 600).until(lambda b: status.text == "done" or status.text.startswith("error"))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
            print(f"{args.out}: {status.text}; {len(browser.find_elements(By.CSS_SELECTOR, '#output .tok'))} tokens")
        finally:
            browser.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
