#!/usr/bin/env bash
# Installs the Debian packages the pipeline needs, when they are missing and apt can.
set -euo pipefail
packages=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || packages+=(dataset-fashion-mnist)
# Cross toolchain and emulator: ARM/Jetson artifacts are linked and checked here without a board.
command -v aarch64-linux-gnu-gcc >/dev/null || packages+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null || packages+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || packages+=(qemu-user-static)
[ ${#packages[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "warning: missing Debian packages: ${packages[*]}; install them with: sudo apt-get install ${packages[*]}" >&2
    exit 0
fi
echo "installing Debian packages: ${packages[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
