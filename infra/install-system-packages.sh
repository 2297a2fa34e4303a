#!/usr/bin/env bash
# Debian packages the project needs: Fashion-MNIST (the embedded default's images) and PostgreSQL (the
# integration tests start a throwaway cluster for the MLflow server). Installs only what is missing, so
# `make setup` can call it every time. Run as root, or with sudo available.
set -euo pipefail
packages=(dataset-fashion-mnist postgresql)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install ${missing[*]} as root (apt-get install ${missing[*]})" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
