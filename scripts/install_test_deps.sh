#!/usr/bin/env bash
# System packages the browser test of the web demo needs (Debian/Ubuntu): headless Chromium + ChromeDriver.
# Installs them when missing and apt-get is usable; otherwise says so, and that one test is skipped.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
else
  echo "note: chromium/chromedriver not installed and apt-get unavailable: the web-demo browser test will be skipped" >&2
fi
