#!/usr/bin/env bash
# Set up what vbremote needs on a Debian machine, then run a nox session.
#
#   bash scripts/dev.sh demo     # the demo: no VirtualBox, no server needed
#   bash scripts/dev.sh tests    # the whole test suite, lint, type check and docs
#   bash scripts/dev.sh -s bench # any nox arguments
#
# It installs only what is missing: Debian packages (the libraries borg is
# built against, sshd, qemu-img; iproute2 for the network tests; rsync and FUSE
# for the restore benchmark) through apt-get, which needs root; nox in a
# virtual environment in .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# Debian packages, and how to tell that each is there.
packages=(
  gcc pkg-config libacl1-dev liblz4-dev libzstd-dev libxxhash-dev libssl-dev
  openssh-server openssh-client qemu-utils
  iproute2 rsync fuse3 libfuse3-dev
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=("python3-venv")
fi
if ! "$PYTHON" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  missing+=("python3-dev")
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "vbremote needs these Debian packages: ${missing[*]}" >&2
    echo "run this script as root, or install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/nox ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check "nox>=2024.4.15"
fi

# The tests write real repositories and disk images (about 2 GiB at a time, removed as each
# test passes): say so up front when the temporary folder's file system has less free.
tmp_free_mib=$(df -Pm "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR == 2 {print $4}')
if [ "${1:-}" = tests ] && [ -n "$tmp_free_mib" ] && [ "$tmp_free_mib" -lt 2048 ]; then
  echo "warning: only ${tmp_free_mib} MiB free in ${TMPDIR:-/tmp}; the tests need about 2 GiB there" >&2
fi

case "${1:-}" in
  demo) shift; exec .venv/bin/nox -s demo -- "$@" ;;
  tests) shift; exec .venv/bin/nox -s tests lint typecheck docs -- "$@" ;;
  *) exec .venv/bin/nox "$@" ;;
esac
