"""The walkthrough as a learner meets it, in headless Chromium: JupyterLab, the widgets, and the static site.

- every notebook opened as cloned (untrusted, no kernel run): no broken image, and a picture where each widget is;
- every notebook with widgets, trusted: its widgets drawn from the saved state; then run in the browser: every cell
  runs, every slider and text box moved redraws the figure; saved and reopened: the widgets come back;
- one exercise typed into its stub in the browser: a correct body passes its check, the classic mistake gets its hint;
- the static site (`tasks.py site`): every page loads from disk with every figure present.
Everywhere: no error in the browser console, no HTTP 404 and no resource that fails to load. Screenshots go to
build/screenshots/.

Chromium and ChromeDriver are Debian's (`apt-get install chromium chromium-driver`, which `tasks.py test` runs when they
are missing); nothing here downloads a browser. Select with `-m browser`, leave out with `-m "not browser"`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "build" / "screenshots"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NOTEBOOKS = tasks.notebook_paths()


def widget_cells(path: Path) -> list[int]:
    """Indices (among all cells) of the code cells whose committed outputs show a widget."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
            and any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", []))]


WIDGET_NOTEBOOKS = [p for p in NOTEBOOKS if widget_cells(p)]


def test_the_widget_notebooks_are_found():
    """The notebooks with `interact` widgets (03, 08, 09, 10 at least) are the ones run in the browser below."""
    names = {p.name[:2] for p in WIDGET_NOTEBOOKS}
    assert {"03", "08", "09", "10"} <= names, names


# --- the browser ---------------------------------------------------------------------------------------------------


class Browser:
    """Headless Debian Chromium through Selenium, collecting console errors and HTTP 404s from every page it shows."""

    def __init__(self, profile: Path):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        # an explicit chromedriver: Selenium Manager is never asked to find (or download) one
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        self.driver.set_script_timeout(60)
        self.console_errors: list[str] = []
        self.not_found: list[str] = []
        self.requested: dict[str, str] = {}

    def collect_logs(self) -> None:
        for entry in self.driver.get_log("browser"):
            if entry["level"] == "SEVERE":
                self.console_errors.append(entry["message"])
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.responseReceived" and params["response"]["status"] == 404:
                self.not_found.append(params["response"]["url"])
            elif message["method"] == "Network.requestWillBeSent":
                self.requested[params["requestId"]] = params["request"]["url"]
            elif (message["method"] == "Network.loadingFailed" and not params.get("canceled")
                  and params["requestId"] in self.requested):
                # a resource a page asked for that could not load at all (offline: a CDN script, a missing file);
                # requests no page made (Chromium's own, which this closed network refuses) are not the page's fault
                self.not_found.append(f"{self.requested[params['requestId']]} ({params.get('errorText')})")

    def assert_clean(self, what: str) -> None:
        """No console error and no 404 since the last call."""
        self.collect_logs()
        errors, missing = self.console_errors, self.not_found
        self.console_errors, self.not_found = [], []
        assert not missing, f"{what}: HTTP 404 or failed to load: {missing}"
        assert not errors, f"{what}: browser console errors:\n" + "\n".join(errors)

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def screenshot_output(self, cell: int, name: str) -> Path:
        """A picture of one cell's outputs (the widget and its figure), whatever its height."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        area = self.driver.execute_script(CELL_JS + "return cells[arguments[0]].querySelector('.jp-OutputArea');", cell)
        area.screenshot(str(path))
        return path

    def wait(self, condition, timeout: float, what: str, poll: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot(f"timeout-{what.replace(' ', '_').replace('/', '_')[:60]}")
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    def quit(self) -> None:
        self.driver.quit()


def ensure_chromium() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    tasks.ensure_chromium()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")          # Selenium Manager, if it ever ran, stays offline
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.quit()


# --- JupyterLab ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """`tasks.py lab`'s JupyterLab (same settings overrides, same environment) on a copy of notebooks/ and figures/,
    with a fresh Jupyter data dir, so the notebooks are untrusted, as cloned. Stopped by its PID."""

    def __init__(self, tmp: Path):
        self.root = tmp / "repo"
        for folder in ("notebooks", "figures"):
            shutil.copytree(ROOT / folder, self.root / folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        self.port, self.token = free_port(), secrets.token_hex(16)
        env = {**tasks.ENV, "JUPYTER_DATA_DIR": str(tmp / "data"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
               "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
               "JUPYTERLAB_SETTINGS_DIR": str(tmp / "user-settings"), "JUPYTER_PLATFORM_DIRS": "1"}
        self.log = open(tmp / "lab.log", "w")                # noqa: SIM115 - closed in stop()
        command = tasks.lab_command("--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                                    f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                                    "--ServerApp.port_retries=0")
        self.env = env
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"JupyterLab did not start: see {tmp / 'lab.log'}")
            time.sleep(0.5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def ready(self) -> bool:
        try:
            return bool(self.api("status"))
        except OSError:
            return False

    def shutdown_kernels(self) -> None:
        for kernel in self.api("kernels"):
            self.api(f"kernels/{kernel['id']}", method="DELETE")

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.shutdown_kernels()
        except OSError:
            pass
        finally:
            if self.process.poll() is None:
                self.process.terminate()                 # SIGTERM to the PID we started
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()


def test_lab_saves_widget_state(lab):
    """The JupyterLab that `tasks.py lab` starts saves widget state into the notebook (jupyter/settings/overrides.json)."""
    request = urllib.request.Request(f"http://127.0.0.1:{lab.port}/lab/api/settings/"
                                     "@jupyter-widgets/jupyterlab-manager:plugin",
                                     headers={"Authorization": f"token {lab.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        settings = json.loads(response.read())
    assert settings["schema"]["properties"]["saveState"]["default"] is True


def open_notebook(browser: Browser, lab: Lab, path: Path) -> None:
    """Open one notebook alone (a fresh workspace), wait for all its cells and for its kernel to be idle."""
    driver = browser.driver
    if driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel"):
        close_notebook(browser)                  # left open by a test that failed: no "leave the page?" prompt
    browser.collect_logs()
    browser.console_errors, browser.not_found = [], []         # what is left belongs to an earlier (failed) test
    n_cells = len(json.loads(path.read_text(encoding="utf-8"))["cells"])
    driver.get(lab.url(f"lab/tree/notebooks/{path.name}") + "&reset")     # reset: only this notebook open
    browser.wait(lambda: driver.execute_script(CELL_JS + "return cells.length;") == n_cells, 90,
                 f"{path.name}'s {n_cells} cells")
    # the kernel started for it is idle (the status bar says so)
    browser.wait(lambda: "Idle" in (driver.execute_script(
        "const s = document.querySelector('#jp-main-statusbar'); return s ? s.textContent : '';") or ""), 60,
        f"{path.name}'s kernel")


CELL_JS = """
const cells = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell');
"""


def scroll_through(browser: Browser) -> None:
    """Scroll every cell into view, so that the notebook's windowed rendering draws every output."""
    n = browser.driver.execute_script(CELL_JS + "return cells.length;")
    for i in range(n):
        browser.driver.execute_script(CELL_JS + "cells[arguments[0]].scrollIntoView({block: 'center'});", i)
        time.sleep(0.02)


def broken_images(browser: Browser) -> list[str]:
    """Every <img> in the notebook that failed to load (complete with no pixels), by its cell and source."""
    return browser.driver.execute_script(CELL_JS + """
const bad = [];
cells.forEach((cell, i) => cell.querySelectorAll('img').forEach(img => {
  img.scrollIntoView({block: 'center'});
  if (img.complete && img.naturalWidth === 0) bad.push(`cell ${i}: ${img.getAttribute('src').slice(0, 80)}`);
}));
return bad;""")


def pending_images(browser: Browser) -> int:
    return browser.driver.execute_script(CELL_JS + """
let n = 0; cells.forEach(c => c.querySelectorAll('img').forEach(img => { if (!img.complete) n++; })); return n;""")


def visual_at(browser: Browser, cell: int) -> dict:
    """What a cell's output area shows: images with pixels, widget controls, and its text."""
    return browser.driver.execute_script(CELL_JS + """
const cell = cells[arguments[0]];
cell.scrollIntoView({block: 'center'});
const area = cell.querySelector('.jp-OutputArea');
if (!area) return {images: 0, widgets: 0, text: ''};
return {images: [...area.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length,
        widgets: area.querySelectorAll('.jupyter-widgets .widget-slider, .jupyter-widgets textarea').length,
        text: area.innerText.slice(0, 300)};""", cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_as_cloned(browser, lab, path):
    """Opened untrusted, without running anything: no broken image, and a figure where each widget is."""
    open_notebook(browser, lab, path)
    scroll_through(browser)
    browser.wait(lambda: pending_images(browser) == 0, 30, f"{path.name}'s images to load")
    assert broken_images(browser) == [], f"{path.name}: broken images"
    for cell in widget_cells(path):
        shown = visual_at(browser, cell)
        # untrusted, JupyterLab may not draw the widget: the figure stored beside its view stands in, not its repr
        assert shown["images"] >= 1, f"{path.name} cell {cell}: nothing visual where the widget is: {shown}"
        assert "Error displaying widget" not in shown["text"], f"{path.name} cell {cell}: {shown['text']}"
        assert "interactive(children" not in shown["text"], f"{path.name} cell {cell}: {shown['text']}"
        browser.screenshot_output(cell, f"cloned-{path.stem}-cell{cell}")
    close_notebook(browser)
    browser.assert_clean(f"{path.name} as cloned")
    lab.shutdown_kernels()


# --- running the widgets -------------------------------------------------------------------------------------------


def menu(browser: Browser, menu_name: str, command: str) -> None:
    """Click a JupyterLab menu item, e.g. ("Run", "runmenu:run-all")."""
    driver = browser.driver
    driver.find_element(By.XPATH, f"//li[contains(@class, 'lm-MenuBar-item')][.//div[text()='{menu_name}']]").click()
    item = f"li.lm-Menu-item[data-command='{command}']"
    browser.wait(lambda: driver.find_elements(By.CSS_SELECTOR, item), 10, f"the {menu_name} menu")
    driver.find_element(By.CSS_SELECTOR, item).click()


def run_all(browser: Browser, path: Path) -> None:
    """Clear every output (so nothing committed is mistaken for the run's), run all cells, wait for the last."""
    driver = browser.driver
    menu(browser, "Edit", "editmenu:clear-all")
    browser.wait(lambda: not driver.execute_script(CELL_JS + "return [...cells].some(c => c.querySelector("
                                                   "'.jp-OutputArea-output'));"), 10, f"{path.name}'s outputs cleared")
    menu(browser, "Run", "runmenu:run-all")

    def done():
        prompts = driver.execute_script(CELL_JS + """
return [...cells].filter(c => c.classList.contains('jp-CodeCell'))
                 .map(c => c.querySelector('.jp-InputPrompt').textContent.trim());""")
        return all(p and "*" not in p and p != "[ ]:" for p in prompts)

    browser.wait(done, 900, f"{path.name} to run", poll=1.0)


def error_outputs(browser: Browser) -> list[str]:
    return browser.driver.execute_script(CELL_JS + """
const found = [];
cells.forEach((c, i) => c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
  .forEach(o => found.push(`cell ${i}: ${o.innerText.slice(0, 400)}`)));
return found;""")


def widget_figure(browser: Browser, cell: int) -> str | None:
    """The figure an interact widget shows now (its <img> src), once it has one."""
    return browser.driver.execute_script(CELL_JS + """
const imgs = cells[arguments[0]].querySelectorAll('.jupyter-widgets .widget-output img, .jupyter-widgets img');
const img = imgs[imgs.length - 1];
return img && img.complete && img.naturalWidth > 0 ? img.src : null;""", cell)


def controls(browser: Browser, cell: int) -> list:
    root = browser.driver.execute_script(CELL_JS + "return cells[arguments[0]];", cell)
    return root.find_elements(By.CSS_SELECTOR, ".jupyter-widgets .widget-slider, .jupyter-widgets textarea")


def move(browser: Browser, control) -> str:
    """Move one control: a slider one step (right, or left at its maximum), or type into a text box."""
    driver = browser.driver
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", control)
    if control.tag_name == "textarea":
        control.click()
        control.send_keys(Keys.END, "\nx = 1")
        return "typed"
    readout = control.find_element(By.CSS_SELECTOR, ".widget-readout")
    before = readout.text
    handle = control.find_element(By.CSS_SELECTOR, ".noUi-handle")
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT)
    if readout.text == before:
        handle.send_keys(Keys.ARROW_LEFT)
    browser.wait(lambda: readout.text != before, 10, "the slider to move")
    return f"{before} -> {readout.text}"


@pytest.mark.parametrize("path", WIDGET_NOTEBOOKS, ids=[p.stem for p in WIDGET_NOTEBOOKS])
def test_widgets_redraw(browser, lab, path):
    """Trusted, as `tasks.py setup` leaves it, each widget is drawn, with its figure, from the state saved in the
    notebook; then run all cells in the browser: every widget control moved redraws its figure; no errors; saved and
    reopened, the widgets come back."""
    copy = lab.root / "notebooks" / path.name
    subprocess.run([str(tasks.PYTHON), "-m", "jupyter", "trust", str(copy)], env=lab.env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)       # in the server's own data dir
    open_notebook(browser, lab, path)
    for cell in widget_cells(path):
        def drawn(cell=cell):
            shown = visual_at(browser, cell)
            assert "Error displaying widget" not in shown["text"], f"{path.name} cell {cell} trusted: {shown}"
            return shown["widgets"] >= 1 and shown["images"] >= 1
        browser.wait(drawn, 30, f"{path.name} cell {cell}'s widget drawn from the saved state")
        browser.screenshot_output(cell, f"trusted-{path.stem}-cell{cell}")

    run_all(browser, path)
    assert error_outputs(browser) == [], f"{path.name}: errors or stderr in a live run"
    browser.screenshot(f"run-{path.stem}")
    for cell in widget_cells(path):
        before = browser.wait(lambda cell=cell: widget_figure(browser, cell), 60, f"{path.name} cell {cell}'s figure")
        found = controls(browser, cell)
        assert found, f"{path.name} cell {cell}: no slider or text box"
        for k in range(len(found)):
            control = controls(browser, cell)[k]                    # the widget may have been redrawn
            how = move(browser, control)
            after = browser.wait(lambda cell=cell, before=before: (lambda f: f if f and f != before else None)(
                widget_figure(browser, cell)), 60, f"{path.name} cell {cell} control {k} ({how}) to redraw")
            time.sleep(0.5)                                         # let a continuous update settle
            after = widget_figure(browser, cell) or after
            assert after != before
            browser.screenshot_output(cell, f"widget-{path.stem}-cell{cell}-control{k}")
            before = after
    assert error_outputs(browser) == [], f"{path.name}: errors after moving the widgets"
    browser.assert_clean(f"{path.name} run with its widgets moved")

    # saved, closed and reopened with a new kernel: the widgets come back from the state saved in the notebook
    # (jupyter/settings/overrides.json turns on saveState), not "Error displaying widget: model not found"
    save(browser, path)
    close_notebook(browser)
    lab.shutdown_kernels()
    open_notebook(browser, lab, path)
    for cell in widget_cells(path):
        def restored(cell=cell):
            shown = visual_at(browser, cell)
            assert "Error displaying widget" not in shown["text"], f"{path.name} cell {cell} reopened: {shown}"
            return shown["widgets"] >= 1 and shown["images"] >= 1
        browser.wait(restored, 30, f"{path.name} cell {cell}'s widget restored from the saved state")
        browser.screenshot_output(cell, f"reopened-{path.stem}-cell{cell}")
    close_notebook(browser)
    browser.assert_clean(f"{path.name} reopened after a save")
    lab.shutdown_kernels()


def close_notebook(browser: Browser) -> None:
    """Close the notebook's tab, discarding changes, as a learner leaving it would.

    With saveState on, jupyterlab-manager marks a notebook with widgets modified as soon as it registers their models
    (on open), so leaving the page without closing would raise JupyterLab's "leave with unsaved changes?" prompt.
    """
    driver = browser.driver
    menu(browser, "File", "application:close")

    def closed():
        try:
            for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog button"):
                if button.text.strip() in ("Discard", "Don't Save"):
                    button.click()
                    break
        except StaleElementReferenceException:                     # the dialog went while we looked
            pass
        return not driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel")

    browser.wait(closed, 20, "the notebook to close")


def save(browser: Browser, path: Path) -> None:
    driver = browser.driver
    menu(browser, "File", "docmanager:save")
    browser.wait(lambda: not driver.find_elements(By.CSS_SELECTOR, ".jp-mod-current.jp-mod-dirty, "
                                                  ".lm-TabBar-tab.jp-mod-current.jp-mod-dirty"), 30,
                 f"{path.name} to be saved")


# --- the static site -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = ROOT / "build" / "site"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_site.py"), str(out)], check=True, cwd=ROOT,
                   env=tasks.ENV, stdout=subprocess.DEVNULL)
    return out


def test_site(browser, site):
    """Every page of the static site loads from disk, in notebook order, with every figure present."""
    driver = browser.driver
    driver.get((site / "index.html").as_uri())
    links = driver.execute_script("return [...document.querySelectorAll('ul.notebooks a')].map(a => a.getAttribute('href'));")
    assert links == [f"{p.stem}.html" for p in NOTEBOOKS]
    browser.screenshot("site-index")
    browser.assert_clean("site index")
    for page in links:
        driver.get((site / page).as_uri())
        browser.wait(lambda: driver.execute_script("return document.readyState") == "complete", 30, page)
        images = driver.execute_script("""
return [...document.images].map(img => { img.scrollIntoView(); return [img.naturalWidth, img.src.slice(0, 60)]; });""")
        assert images, f"{page}: no figures"
        assert all(width > 0 for width, _ in images), f"{page}: missing figures {[s for w, s in images if not w]}"
        # every output figure of the notebook made it (a widget's, too: as its static figure)
        nb = json.loads((ROOT / "notebooks" / page.replace(".html", ".ipynb")).read_text(encoding="utf-8"))
        expected = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
        assert len(images) >= expected, f"{page}: {len(images)} images, the notebook has {expected} figures"
        missing_links = driver.execute_script("""
return [...document.querySelectorAll('a[href$=".html"]')].map(a => a.href).filter(h => h.startsWith('file:'));""")
        for href in missing_links:
            assert Path(urllib.request.url2pathname(href[len("file://"):].split("#")[0])).is_file(), f"{page}: {href}"
        driver.execute_script("window.scrollTo(0, 0);")
        browser.screenshot(f"site-{page[:-5]}")
        browser.assert_clean(page)



# --- an exercise, as a learner does it --------------------------------------------------------------------------


def _run_cell(browser: Browser, index: int) -> None:
    """Click into a cell's editor and press Shift+Enter; wait until it has run."""
    driver = browser.driver
    driver.execute_script(CELL_JS + "cells[arguments[0]].scrollIntoView({block: 'center'});", index)
    time.sleep(0.3)
    driver.execute_script(CELL_JS + "return cells[arguments[0]].querySelector('.cm-content');", index).click()
    driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)

    def ran():
        text = driver.execute_script(CELL_JS + "return cells[arguments[0]].querySelector('.jp-InputPrompt')"
                                     ".textContent.trim();", index)
        return text and "*" not in text and text != "[ ]:"

    browser.wait(ran, 120, f"cell {index} to run")


def _type_body(browser: Browser, index: int, lines: list[str]) -> None:
    """Select the stub's body (the lines after its one-line docstring) and type `lines` over it, by the keyboard."""
    driver = browser.driver
    driver.execute_script(CELL_JS + "cells[arguments[0]].scrollIntoView({block: 'center'});", index)
    time.sleep(0.3)
    editor = driver.execute_script(CELL_JS + "return cells[arguments[0]].querySelector('.cm-content');", index)
    editor.click()
    source = editor.text
    body_lines = len(source.rstrip("\n").split('"""')[-1].strip("\n").splitlines())
    editor.send_keys(Keys.CONTROL, Keys.END)
    for _ in range(body_lines - 1):
        editor.send_keys(Keys.SHIFT, Keys.UP)
    editor.send_keys(Keys.SHIFT, Keys.HOME)
    editor.send_keys(Keys.SHIFT, Keys.HOME)                       # past the indentation: it is typed again below
    editor.send_keys(Keys.DELETE)
    for n, line in enumerate(lines):
        editor.send_keys(("    " if n == 0 else "") + line)       # CodeMirror keeps the indentation after Enter
        if n + 1 < len(lines):
            editor.send_keys(Keys.ENTER)


def _output(browser: Browser, index: int) -> str:
    return browser.driver.execute_script(CELL_JS + "const a = cells[arguments[0]].querySelector('.jp-OutputArea');"
                                         "return a ? a.innerText : '';", index)


def test_an_exercise_by_hand(browser, lab):
    """Notebook 04's window-mask exercise typed into its stub: a correct body passes, the classic off-by-one (W + 1
    keys) fails with the hint that names it."""
    path = NOTEBOOKS[[p.name[:2] for p in NOTEBOOKS].index("04")]
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    first = next(i for i, c in enumerate(cells) if "import mistral_tutorial as mt" in "".join(c["source"]))
    stub = next(i for i, c in enumerate(cells) if c["id"] == "ex04-1-stub")
    check = next(i for i, c in enumerate(cells) if c["id"] == "ex04-1-check")
    open_notebook(browser, lab, path)
    _run_cell(browser, first)                                     # the imports, as a learner starting here would
    for label, keep, verdict in (("correct", ">", "✓ 04.1-window-mask: passed all"),
                                 ("mistake", ">=", "this looks like a classic mistake: the window holds W + 1 keys")):
        _type_body(browser, stub, ["i = torch.arange(seq_len)[:, None]", "j = torch.arange(seq_len)[None, :]",
                                   f"return (j <= i) & (j {keep} i - window) if window is not None else j <= i"])
        _run_cell(browser, stub)
        _run_cell(browser, check)
        shown = _output(browser, check)
        browser.screenshot(f"exercise-04.1-{label}")
        assert verdict in shown, f"{label}: {shown}"
    assert error_outputs(browser) == []
    close_notebook(browser)
    browser.assert_clean("an exercise by hand")
    lab.shutdown_kernels()
