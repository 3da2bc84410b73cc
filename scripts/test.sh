#!/usr/bin/env bash
# peercam test command: installs the system packages the tests need, builds the binaries
# the CLI tests run, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ffprobe >/dev/null || need+=(ffmpeg)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v ping >/dev/null || need+=(iputils-ping)
command -v mpv >/dev/null || need+=(mpv)
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xwd >/dev/null || need+=(x11-apps)
command -v xwininfo >/dev/null || need+=(x11-utils)
command -v python3 >/dev/null || need+=(python3)
command -v redis-server >/dev/null || need+=(redis-server)
/usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' 2>/dev/null \
  && gst-inspect-1.0 x264enc >/dev/null 2>&1 \
  || need+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-ugly gstreamer1.0-plugins-good gstreamer1.0-plugins-base gstreamer1.0-tools)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "==> building" >&2
cargo build --workspace --bins --locked
echo "==> testing" >&2
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}"
if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  echo "==> fuzzing each decoder for ${FUZZ_SECONDS:-20} s (FUZZ_SECONDS=0 skips)" >&2
  ./scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi
