# Sourced by scripts/test: make sure Debian's headless Chromium and its WebDriver are installed
# for the browser tests (tests/test_web_*.py). Never downloads a browser build of its own:
# only Debian's `chromium` and `chromium-driver` packages. Idempotent: quick when both exist.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "multigen: installing chromium and chromium-driver (Debian packages) for the browser tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "multigen: could not install chromium; the browser tests will be skipped (they fail under CI=true)" >&2
  else
    echo "multigen: /usr/bin/chromium or /usr/bin/chromedriver missing and not root;" \
         "install them with: apt-get install chromium chromium-driver (browser tests are skipped; they fail under CI=true)" >&2
  fi
fi
