#!/usr/bin/env bash
# Makes docs/dashboard.png: a real agent's /metrics scraped every second
# while controllers die and come back (tests/tests/monitoring.rs
# dashboard_scenario, about 2.5 minutes, as root), every panel of
# deploy/monitoring/nllb-dashboard.json evaluated over those scrapes
# (render.py), and a headless Chromium screenshot of the page.
# Needs Debian's `chromium` (not installed by `cargo xtask setup`: only this
# picture needs it, no test does).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-docs/dashboard.png}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

NLLB_DASHBOARD_SCRAPES="$work/scrapes.jsonl" cargo xtask test -- -p nllb-tests --test monitoring \
    dashboard_scenario -- --ignored --exact --nocapture
python3 docs/dashboard/render.py deploy/monitoring/nllb-dashboard.json "$work/scrapes.jsonl" "$work/dashboard.html"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1380,1500 \
    --screenshot="$work/dashboard.png" "file://$work/dashboard.html"
cp "$work/dashboard.png" "$out"
echo "wrote $out"
