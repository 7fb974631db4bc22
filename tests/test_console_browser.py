"""The web console in a real browser: headless Chromium driven by Selenium (Debian's chromium and
chromium-driver, which .ci/run installs), against a real gateway with the console on 127.0.0.1 port 0.

One walk through what an interface analyst does: a wrong password refused,
sign in, find a message by MRN, open it and read the raw v2 (fields named)
and the FHIR, retry a dead letter, accept a review; then an analyst refused
an admin page. The message page's screenshot is written to the test's
folder, and to the path in ``HERALD_CONSOLE_SCREENSHOT`` when it is set
(``HERALD_CONSOLE_SCREENSHOT=docs/console-message.png`` refreshes the one
the README shows; its data is synthetic).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_console_web import PASSWORDS, ConsoleGateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Flags that let Chromium run headless as root in a container, with nothing fetched from the network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
    "apt-get install chromium chromium-driver (.ci/run does)",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A running gateway with the console (its own, so the other module's sign-in throttle is not shared)."""
    gw = ConsoleGateway(tmp_path_factory.mktemp("console-browser"))
    yield gw
    gw.stop()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a fresh profile, quit afterwards."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def sign_in(driver, base: str, name: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "sign-in").click()


def gone(element):
    """A wait condition: ``element``'s page has been replaced.

    Selenium's ``staleness_of``, except that chromedriver, asked about a node
    in the middle of a navigation, may answer "does not belong to the
    document" as an unknown error rather than a stale reference: that too
    means the element is gone.
    """
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    def check(driver) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as e:
            if "does not belong to the document" in str(e):
                return True
            raise
        return False

    return check


def test_an_analyst_s_walk_through_the_console(gateway, browser, tmp_path):
    """Refused with a wrong password; then search by MRN, the message page, a retry, a review accepted."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"http://127.0.0.1:{gateway.port}"
    driver = browser

    sign_in(driver, base, "alice", "not-the-password")
    assert "Wrong name or password" in driver.find_element(By.CSS_SELECTOR, "p.error").text
    assert driver.get_cookie("herald_session") is None

    sign_in(driver, base, "alice", PASSWORDS["alice"])
    WebDriverWait(driver, 10).until(lambda d: d.current_url == base + "/messages")
    session = driver.get_cookie("herald_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"

    # Search by MRN and open the message.
    driver.find_element(By.NAME, "mrn").send_keys("E100")
    listed = driver.find_element(By.CSS_SELECTOR, "main table")
    driver.find_element(By.CSS_SELECTOR, "form.search button[type=submit]").click()
    # The click only starts the navigation (the address may change before the new page is there): read the
    # rows once the list page's table is gone, not the list page's own three.
    WebDriverWait(driver, 10).until(gone(listed))
    WebDriverWait(driver, 10).until(lambda d: "mrn=E100" in d.current_url)
    routed = gateway.ids["C-ROUTED"]
    rows = driver.find_elements(By.CSS_SELECTOR, "main table tbody tr")
    assert len(rows) == 1 and "C-ROUTED" in rows[0].text
    results = driver.find_element(By.CSS_SELECTOR, "main table")
    rows[0].find_element(By.LINK_TEXT, str(routed)).click()
    WebDriverWait(driver, 10).until(gone(results))
    WebDriverWait(driver, 10).until(lambda d: d.current_url == f"{base}/messages/{routed}")

    # The raw v2 with its fields named (hl7apy's names), and the FHIR Bundle.
    raw = driver.find_element(By.ID, "raw-v2")
    assert raw.text.startswith("MSH|^~\\&|FLOWEHR|FLOWHOSP")
    name_field = raw.find_element(By.CSS_SELECTOR, '[data-field="PID-5"]')
    assert name_field.get_attribute("title") == "PID-5 Patient name (XPN)"
    name_field.click()  # the script names the field and marks its row in the table
    assert driver.find_element(By.ID, "field-name").text == "PID-5 Patient name (XPN)"
    marked = driver.find_element(By.CSS_SELECTOR, "table.fields tr.hit")
    assert "Patient name (XPN)" in marked.text and "PEMBERTON^ROSALIND" in marked.text
    fhir = driver.find_element(By.ID, "fhir").text
    assert '"resourceType": "Bundle"' in fhir and '"family": "PEMBERTON"' in fhir
    weights = driver.find_element(By.ID, "match").text
    assert "Field weights" in weights and "birth_date" in weights
    shot = tmp_path / "console-message.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("HERALD_CONSOLE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["HERALD_CONSOLE_SCREENSHOT"])

    # Retry the dead letter (the HIE answered 404).
    driver.get(base + "/outbox?state=dead")
    dead_rows = driver.find_elements(By.XPATH, "//section[@id='list']//tbody/tr")
    assert dead_rows, "the HIE's notifications are dead letters"
    before = len([e for e in gateway.events("requeued")])
    dead_rows[0].find_element(By.XPATH, ".//button[text()='Retry']").click()
    assert "Requeued 1 notification(s)" in driver.find_element(By.CSS_SELECTOR, "p.flash").text
    requeued = gateway.events("requeued")
    assert len(requeued) == before + 1 and requeued[-1]["detail"]["by"] == "console:alice"

    # Accept the review (the page asks first: the script's confirm dialog).
    driver.get(base + "/reviews")
    article = driver.find_element(By.CSS_SELECTOR, "article.review")
    assert "PEMBERTIN" in article.text and "F-1" in article.text
    article.find_element(By.XPATH, ".//button[text()='Accept this member']").click()
    alert = driver.switch_to.alert
    assert "Accept F-1" in alert.text
    alert.accept()
    assert "accepted: message" in driver.find_element(By.CSS_SELECTOR, "p.flash").text
    assert gateway.events("review-accepted")[-1]["detail"]["by"] == "console:alice"

    # Signed out, an analyst is refused the admin pages.
    driver.find_element(By.CSS_SELECTOR, "nav button.link").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.startswith(base + "/login"))
    sign_in(driver, base, "bob", PASSWORDS["bob"])
    WebDriverWait(driver, 10).until(lambda d: d.current_url == base + "/messages")
    assert "Users" not in driver.find_element(By.TAG_NAME, "nav").text
    driver.get(base + "/admin/users")
    assert "is an analyst: this page is for admins" in driver.find_element(By.CSS_SELECTOR, "p.error").text
