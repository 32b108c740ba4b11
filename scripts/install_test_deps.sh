#!/usr/bin/env bash
# System packages the test suite drives for real (Debian): headless Chromium for the web
# page's browser tests, nginx and haproxy for the rolling-update rehearsal behind a proxy,
# curl for the README's recipes.
# Installs what is missing when run as root; otherwise says exactly what to install.
set -euo pipefail

declare -A wanted=([chromium]=chromium [chromedriver]=chromium-driver [nginx]=nginx [haproxy]=haproxy [curl]=curl)
missing=()
for command in "${!wanted[@]}"; do
    if ! command -v "$command" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$command" ]; then
        missing+=("${wanted[$command]}")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "The tests need these Debian packages: ${missing[*]}" >&2
    echo "Install them (as root: apt-get install -y ${missing[*]}) and run make test again." >&2
    exit 1
fi
echo "installing test dependencies: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Only the binaries are wanted: the packages' own services must not hold ports 80/443.
for service in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$service" >/dev/null 2>&1 || true; fi
    if [ -x "/etc/init.d/$service" ]; then "/etc/init.d/$service" stop >/dev/null 2>&1 || true; fi
done
