#!/usr/bin/env bash
# tests/apt-install.sh PKG... — installs Debian packages the tests need, as root or via
# sudo; without either it names the packages and fails (nothing half-installed).
set -euo pipefail
[ $# -gt 0 ] || exit 0
echo "==> installing $*"
sudo=""
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null; then
    echo "tests need these Debian packages: $* — run as root, or apt-get install them and re-run" >&2
    exit 1
  fi
  sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
