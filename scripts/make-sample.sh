#!/usr/bin/env bash
# Generates assets/sample.h264: a 4 s, 25 fps, 640x360 H.264 Annex B test clip
# (testsrc2 pattern with a burnt-in frame counter), used by peercam_common::h264 tests
# and as a stand-in camera source.
#
# Stream properties the tests rely on:
#   - 100 frames, an IDR every 25 frames (4 GOPs), no scene-cut keyframes;
#   - no B-frames (decode order == presentation order);
#   - SPS/PPS repeated before every IDR (repeat-headers=1);
#   - VUI timing info present (x264 writes it by default), so the SPS says 25 fps;
#   - raw Annex B output, ~1 Mbit/s, well under 1 MB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/assets/sample.h264}"
FONT="/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"

command -v ffmpeg >/dev/null || { echo "make-sample: ffmpeg not found" >&2; exit 1; }

# The font comes from Debian's fonts-dejavu-core; install it if we can.
if [[ ! -f "$FONT" ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    apt-get install -y --no-install-recommends fonts-dejavu-core >&2 || true
fi

SRC="testsrc2=size=640x360:rate=25"
# (Capture the list first: `ffmpeg | grep -q` would trip pipefail via SIGPIPE.)
FILTERS="$(ffmpeg -hide_banner -filters 2>/dev/null || true)"
if grep -qw drawtext <<<"$FILTERS" && [[ -f "$FONT" ]]; then
    # Frame number in large digits in the middle of the picture.
    VF="drawtext=fontfile=${FONT}:text='%{frame_num}':fontsize=96:fontcolor=white"
    VF+=":box=1:boxcolor=black@0.6:boxborderw=12:x=(w-text_w)/2:y=(h-text_h)/2"
else
    # Fallback: no drawtext (ffmpeg built without libfreetype) or no font. Plain testsrc
    # has its own built-in frame counter, so the clip still shows the frame number.
    echo "make-sample: drawtext or font unavailable, falling back to testsrc" >&2
    SRC="testsrc=size=640x360:rate=25"
    VF="null"
fi

mkdir -p "$(dirname "$OUT")"
ffmpeg -hide_banner -loglevel error -y \
    -f lavfi -i "$SRC" \
    -vf "$VF" \
    -frames:v 100 \
    -c:v libx264 -profile:v main -preset medium -pix_fmt yuv420p \
    -g 25 -keyint_min 25 -sc_threshold 0 -bf 0 \
    -b:v 1M -maxrate 1M -bufsize 1M \
    -x264-params repeat-headers=1:keyint=25:min-keyint=25:scenecut=0 \
    -f h264 "$OUT"

size=$(stat -c %s "$OUT")
if (( size >= 1000000 )); then
    echo "make-sample: $OUT is $size bytes, expected < 1 MB" >&2
    exit 1
fi
echo "make-sample: wrote $OUT ($size bytes)"
