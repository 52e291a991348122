#!/usr/bin/env python3
"""Drives headless Chromium through a staps node's page (run by scripts/browser, in its venv).

Two tabs open the same channel page and wait for "open"; tab A sends a message and tab B must
show it, then B sends one and A must show it. Then: the "New channel" button must give new
version 4 UUIDs (crypto.randomUUID, then with it removed, the getRandomValues fallback); A sends
a message longer than the node's max_message_size and must show "closed" with the node's 1009
and reason, and "Reconnect" must open it again; "/" must offer a fresh channel whose page opens.
Every page is watched for Content-Security-Policy violations (a `securitypolicyviolation`
listener installed before the page's own script, and the browser console): there must be none.
Last, as a control, script inserts an image and a script without the nonce into page A: the CSP
must block both, and the listener must see it.

Prints one JSON object (what was seen) on stdout and exits 0 when every check passed, 1 when one
failed (the reason on stderr), 2 when the browser could not be started.
"""
import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

# Installed with Page.addScriptToEvaluateOnNewDocument: runs in every document of the tab before
# the page's own script (and is not subject to the page's CSP).
WATCH_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(
  {directive: e.effectiveDirective, blocked: e.blockedURI, sample: e.sample, source: e.sourceFile}));
"""


class Failed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failed(message)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--chromedriver", required=True)
    parser.add_argument("--url", required=True, help="a channel page, http://127.0.0.1:PORT/PATH")
    parser.add_argument("--message-a", required=True, help="what tab A sends")
    parser.add_argument("--message-b", required=True, help="what tab B sends")
    parser.add_argument("--oversize", type=int, required=True, help="a message length over the node's max_message_size")
    parser.add_argument("--screenshot", required=True, help="where to save a PNG of page A")
    parser.add_argument("--chromedriver-log", help="where chromedriver writes its verbose log (with Chromium's output)")
    parser.add_argument("--timeout", type=float, default=20, help="seconds any one wait may take")
    args = parser.parse_args()
    # A process started from a Swift test inherits the signal mask of the libdispatch worker
    # thread that started it, which blocks nearly every signal: chromedriver and Chromium would
    # inherit it too. Unblock them all.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Killed at the test's deadline: still quit Chromium and remove its profile (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    seen = {"checks": []}
    profile = None
    driver = None
    log = open(args.chromedriver_log, "w") if args.chromedriver_log else None
    try:
        profile = tempfile.mkdtemp(prefix="staps-chromium-")
        try:
            driver = start(args, profile, log)
        except WebDriverException as e:
            seen["error"] = f"could not start Chromium: {e.msg or e}"
            print(json.dumps(seen, indent=2))
            print(f"browser-driver: {seen['error']}", file=sys.stderr)
            return 2
        seen["browser"] = driver.capabilities.get("browserVersion")
        try:
            run(driver, args, seen)
            status = 0
        except (Failed, TimeoutException, WebDriverException) as e:
            reason = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {getattr(e, 'msg', None) or e}"
            seen["failure"] = reason
            print(f"browser-driver: FAILED: {reason}", file=sys.stderr)
            status = 1
        print(json.dumps(seen, indent=2))
        return status
    finally:
        if driver is not None:
            try:
                driver.quit()
            except WebDriverException:
                pass
        if profile:
            shutil.rmtree(profile, ignore_errors=True)
        if log:
            log.close()


def start(args, profile, log):
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ["--headless=new", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=900,1000", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions"]:
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if log:
        service = Service(executable_path=args.chromedriver, service_args=["--verbose", "--enable-chrome-logs"], log_output=log)
    else:
        service = Service(executable_path=args.chromedriver)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(args.timeout)
    driver.set_script_timeout(args.timeout)
    return driver


def run(driver, args, seen):
    wait = WebDriverWait(driver, args.timeout, poll_frequency=0.05)
    violations = []
    console = []

    def note(what):
        seen["checks"].append(what)

    def open_tab(url, new):
        if new:
            driver.switch_to.new_window("tab")
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_VIOLATIONS})
        driver.get(url)
        return driver.current_window_handle

    def collect():
        """This document's CSP violations and the console so far."""
        violations.extend(driver.execute_script("return window.__violations || []"))
        console.extend({"level": e.get("level"), "message": e.get("message")} for e in driver.get_log("browser"))

    def state():
        element = driver.find_element(By.ID, "state")
        return element.get_attribute("data-state"), element.text

    def wait_state(name):
        try:
            wait.until(lambda d: state()[0] == name)
        except TimeoutException:
            raise Failed(f"{driver.current_url}: state still {state()!r} after {args.timeout} s, expected {name}")
        return state()[1]

    def log(direction):
        return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"#log li.{direction} .text")]

    def wait_received(text):
        try:
            wait.until(lambda d: text in log("in"))
        except TimeoutException:
            raise Failed(f"{driver.current_url}: {text!r} not shown within {args.timeout} s (received: {log('in')!r})")

    def send(text):
        box = driver.find_element(By.ID, "message")
        box.clear()
        box.send_keys(text)
        driver.find_element(By.ID, "send-button").click()
        wait.until(lambda d: text in log("out"))

    a = open_tab(args.url, new=False)
    seen["a"] = {"open": wait_state("open")}
    b = open_tab(args.url, new=True)
    seen["b"] = {"open": wait_state("open")}
    note("both tabs open")

    driver.switch_to.window(a)
    send(args.message_a)
    driver.switch_to.window(b)
    wait_received(args.message_a)
    note("B shows A's message")
    send(args.message_b)
    driver.switch_to.window(a)
    wait_received(args.message_b)
    note("A shows B's message")
    seen["a"]["received"], seen["a"]["sent"] = log("in"), log("out")
    driver.switch_to.window(b)
    seen["b"]["received"], seen["b"]["sent"] = log("in"), log("out")
    check(seen["a"]["received"] == [args.message_b], f"A received {seen['a']['received']!r}")
    check(seen["b"]["received"] == [args.message_a], f"B received {seen['b']['received']!r}")

    driver.switch_to.window(a)
    os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
    check(driver.save_screenshot(args.screenshot), f"could not save {args.screenshot}")
    seen["screenshot"] = os.path.abspath(args.screenshot)

    # New channels, made in the page: crypto.randomUUID here (127.0.0.1 is a secure context),
    # then the fallback for plain-http hosts, with randomUUID taken away.
    fresh = [driver.find_element(By.ID, "fresh-url").text]
    driver.find_element(By.ID, "new-channel").click()
    wait.until(lambda d: d.find_element(By.ID, "fresh-url").text != fresh[0])
    fresh.append(driver.find_element(By.ID, "fresh-url").text)
    driver.execute_script("delete Crypto.prototype.randomUUID")
    check(driver.execute_script("return typeof crypto.randomUUID") == "undefined", "could not remove crypto.randomUUID")
    driver.find_element(By.ID, "new-channel").click()
    wait.until(lambda d: d.find_element(By.ID, "fresh-url").text != fresh[1])
    fresh.append(driver.find_element(By.ID, "fresh-url").text)
    link = driver.find_element(By.ID, "fresh-link").get_attribute("href")
    ids = [url.rsplit("/", 1)[-1] for url in fresh]
    seen["fresh"] = {"server": fresh[0], "randomUUID": fresh[1], "fallback": fresh[2], "link": link}
    for url, uuid in zip(fresh, ids):
        check(UUID4.fullmatch(uuid) is not None, f"{url!r} does not end in a version 4 UUID")
    check(len(set(ids)) == 3, f"fresh channels repeat: {fresh!r}")
    check(link.endswith("/" + ids[2]), f"fresh link {link!r} is not the newest channel")
    note("New channel gives new UUID4s")

    # The node closes a sender whose message is over max_message_size with 1009 and a reason.
    driver.execute_script("document.getElementById('message').value = 'x'.repeat(arguments[0])", args.oversize)
    driver.find_element(By.ID, "send-button").click()
    seen["a"]["closed"] = wait_state("closed")
    check(re.fullmatch(r"closed \(code 1009, .+\)", seen["a"]["closed"]) is not None, f"A shows {seen['a']['closed']!r}")
    driver.find_element(By.ID, "reconnect").click()
    seen["a"]["reopened"] = wait_state("open")
    note("A shows 1009 with its reason, and reconnects")
    collect()

    # "/" is not a channel: no client, a fresh channel to open.
    driver.switch_to.window(b)
    collect()
    root = args.url.split("/", 3)
    root = "/".join(root[:3]) + "/"
    driver.get(root)
    check(not driver.find_elements(By.ID, "state"), "/ has a client")
    fresh_root = driver.find_element(By.ID, "fresh-url").text
    collect()
    driver.find_element(By.ID, "fresh-link").click()
    wait.until(lambda d: d.current_url != root)
    seen["root"] = {"fresh": fresh_root, "opened": driver.current_url, "state": wait_state("open")}
    check(driver.current_url.rsplit("/", 1)[-1] == fresh_root.rsplit("/", 1)[-1], f"/ offered {fresh_root!r}, opened {driver.current_url!r}")
    note("/ offers a fresh channel whose page opens")
    collect()

    seen["violations"] = violations
    seen["console"] = console
    csp_console = [e for e in console if "Content Security Policy" in (e["message"] or "")]
    check(not violations, f"CSP violations: {violations!r}")
    check(not csp_console, f"CSP messages in the console: {csp_console!r}")
    check(not [e for e in console if e["level"] == "SEVERE"], f"errors in the console: {console!r}")
    note("no CSP violation, no console error")

    # The control: what the policy must block is blocked, and seen.
    driver.switch_to.window(a)
    driver.execute_script("""
        const img = document.createElement("img");
        img.src = "data:image/gif;base64,R0lGODlhAQABAAAAACw=";
        document.body.append(img);
        const s = document.createElement("script");
        s.textContent = "window.__injected = true";
        document.body.append(s);
    """)
    try:
        wait.until(lambda d: len(d.execute_script("return window.__violations")) >= 2)
    except TimeoutException:
        pass
    control = driver.execute_script("return window.__violations")
    injected = driver.execute_script("return window.__injected === true")
    seen["control"] = {"violations": control, "injectedScriptRan": injected}
    check(sorted(v["directive"] for v in control) == ["img-src", "script-src-elem"], f"control violations: {control!r}")
    check(not injected, "a script without the nonce ran")
    note("the CSP blocks an image and a script without the nonce")


if __name__ == "__main__":
    sys.exit(main())
