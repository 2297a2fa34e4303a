#!/usr/bin/env bash
# Debian packages the embedded default needs: Fashion-MNIST (the default images).
# Run as root (or with sudo available); called by `make setup` when the data is missing.
set -euo pipefail
packages=(dataset-fashion-mnist)
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install ${packages[*]} as root (apt-get install ${packages[*]})" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
