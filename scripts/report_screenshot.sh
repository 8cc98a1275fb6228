#!/usr/bin/env bash
# Screenshot a run report in headless Chromium (Debian: apt-get install chromium).
#   bash scripts/report_screenshot.sh gradfilter_run/report.html docs/report.png [width] [height]
set -euo pipefail
page=$(realpath "$1"); shot=$(realpath -m "$2"); width=${3:-1200}; height=${4:-2600}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "No Chromium found: install it (Debian/Ubuntu: apt-get install chromium) and rerun." >&2
  exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# no sandbox when run as root; no background networking (the machine may be offline)
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$width,$height" --screenshot="$shot" "file://$page" >/dev/null 2>&1
test -s "$shot" && echo "Screenshot: $shot"
