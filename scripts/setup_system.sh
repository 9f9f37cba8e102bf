#!/usr/bin/env bash
# Idempotent system step: the Debian packages FFCV needs to build, the default dataset, PostgreSQL (its
# server binaries only: tests/servers.py starts a throwaway cluster for the tests of the Optuna storage) and
# Chromium (tests/test_report_browser.py loads report.html in it, headless).
# Installs what is missing with apt-get when run as root; otherwise says exactly what to install.
set -euo pipefail
packages=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist postgresql chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "ssl-study setup: missing system packages: ${missing[*]}" >&2
  echo "Install them, then run make again:  sudo apt-get install -y ${missing[*]}" >&2
  echo "(FFCV builds against pkg-config, libturbojpeg and OpenCV; dataset-fashion-mnist is the default dataset;" >&2
  echo " postgresql: the tests of a study in a PostgreSQL database start a server of their own;" >&2
  echo " chromium: the test of the report page opens it in a headless browser.)" >&2
  exit 1
fi
echo "ssl-study setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# apt's notes (debconf's "delaying package configuration" and the like) only when it fails
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
