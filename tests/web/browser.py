"""The kiosk's web page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven through Selenium by tests/integration/web.rs.

    browser.py URL SECRET SCENE_DIR BIRDS_DIR FRUIT_DIR DOWNLOAD_DIR

SCENE_DIR holds the pictures `graft serve --source SCENE_DIR --repeat` shows as its camera; this
script points them at BIRDS_DIR's or FRUIT_DIR's pictures to change the scene. It logs in,
creates two classes from camera frames (a capture with its countdown), uploads a photo, trains,
watches the live label change between the two scenes, downloads the ONNX export, and checks that
the API refuses a state change without the CSRF token and without a login. It prints one JSON
line of what it saw; any failure raises (exit status 1) with the page's last message.
"""
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, secret, scene, birds, fruit, downloads = sys.argv[1:7]


def show(folder):
    """Points every picture of the scene at `folder`'s pictures (atomic renames)."""
    pics = sorted(os.listdir(folder))
    for i, name in enumerate(sorted(os.listdir(scene))):
        tmp = os.path.join(scene, f".{name}.new")
        os.symlink(os.path.join(folder, pics[i % len(pics)]), tmp)
        os.replace(tmp, os.path.join(scene, name))


options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("GRAFT_CHROMIUM", "/usr/bin/chromium")
profile = tempfile.mkdtemp(prefix="graft-chromium-")
for flag in [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-quic", f"--user-data-dir={profile}", "--window-size=1200,1600",
]:
    options.add_argument(flag)
options.add_experimental_option("prefs", {
    "download.default_directory": downloads,
    "download.prompt_for_download": False,
})
driver = webdriver.Chrome(
    service=Service(os.environ.get("GRAFT_CHROMEDRIVER", "/usr/bin/chromedriver")),
    options=options,
)
seen = {}
try:
    wait = WebDriverWait(driver, 60)
    start = time.monotonic()
    driver.get(url)
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    seen["login_shown_s"] = round(time.monotonic() - start, 3)
    driver.find_element(By.ID, "secret").send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "app").is_displayed())

    def message():
        return driver.find_element(By.ID, "message").text

    def count(label):
        # One script: the list is redrawn whenever the kiosk changes.
        return driver.execute_script(
            "const li = [...document.querySelectorAll('#classes li.class')]"
            ".find(l => l.dataset.label === arguments[0]);"
            "return li ? li.querySelector('.count').textContent : null;", label)

    def in_class(label, selector, act):
        """Does `act` to the element of `label`'s entry, again if the list was redrawn."""
        def attempt(d):
            try:
                act(d.find_element(By.CSS_SELECTOR, f'li.class[data-label="{label}"] {selector}'))
                return True
            except (StaleElementReferenceException, NoSuchElementException):
                return False
        wait.until(attempt, message=f"{label} {selector}")

    def capture(label, n):
        field = driver.find_element(By.ID, "new-label")
        field.send_keys(label)
        driver.find_element(By.CSS_SELECTOR, "#new-class button").click()

        def set_and_press(e):
            # Both in the entry found now (the list is redrawn when the kiosk changes).
            e.clear()
            e.send_keys(str(n))
            e.find_element(By.XPATH, "./ancestor::li[1]").find_element(
                By.CSS_SELECTOR, ".capture").click()
        in_class(label, ".n", set_and_press)
        wait.until(lambda d: d.find_element(By.ID, "countdown").is_displayed())
        wait.until(lambda d: count(label) == f"({n} examples)", message=f"capture {label}: {message()}")

    show(birds)
    capture("birds", 3)
    show(fruit)
    capture("fruit", 3)

    # An uploaded photo takes the camera frames' path: one more fruit example.
    photo = os.path.join(fruit, sorted(os.listdir(fruit))[-1])
    in_class("fruit", ".upload", lambda e: e.send_keys(photo))
    wait.until(lambda d: count("fruit") == "(4 examples)", message=f"upload: {message()}")

    driver.find_element(By.ID, "train").click()
    wait.until(lambda d: d.find_element(By.ID, "message").text.startswith("Trained:"),
               message=f"train: {message()}")
    seen["trained"] = message()
    seen["thumbnails"] = len(driver.find_elements(By.CSS_SELECTOR, ".thumbs img"))

    # The live label follows the scene.
    label = lambda d: d.find_element(By.ID, "live-label").text
    wait.until(lambda d: label(d) == "fruit", message=f"live label {label(driver)!r}, wanted fruit")
    show(birds)
    wait.until(lambda d: label(d) == "birds", message=f"live label {label(driver)!r}, wanted birds")
    show(fruit)
    wait.until(lambda d: label(d) == "fruit", message=f"live label {label(driver)!r}, wanted fruit")
    seen["live"] = ["fruit", "birds", "fruit"]
    seen["preview_loaded"] = driver.execute_script(
        "return document.getElementById('preview').naturalWidth")
    seen["recent"] = len(driver.find_elements(By.CSS_SELECTOR, "#recent li"))

    # The export downloads.
    driver.find_element(By.ID, "export-onnx").click()
    target = os.path.join(downloads, "graft-export.onnx")
    wait.until(lambda d: os.path.exists(target) and not any(
        f.endswith(".crdownload") for f in os.listdir(downloads)), message="no download")
    seen["export_bytes"] = os.path.getsize(target)

    # Refused: a state change from the logged-in page without its CSRF token, and one
    # without any login.
    seen["no_csrf_status"] = driver.execute_script(
        "return fetch('/api/train', {method: 'POST'}).then(r => r.status)")
    try:
        urllib.request.urlopen(urllib.request.Request(url + "api/train", method="POST", data=b""))
        seen["no_login_status"] = 200
    except urllib.error.HTTPError as e:
        seen["no_login_status"] = e.code
    print(json.dumps(seen))
except Exception:
    print("page message:", driver.find_element(By.ID, "message").text, file=sys.stderr)
    raise
finally:
    driver.quit()
