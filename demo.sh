#!/usr/bin/env bash
# peercam demo: a fresh CA, a rendezvous, a camera streaming the bundled clip, and a viewer,
# all on this machine, through the real protocol (mutual TLS, QUIC, direct connection).
# Writes the received video to demo-out/received.h264 and prints the viewer's JSON summary.
set -euo pipefail
cd "$(dirname "$0")"
OUT=demo-out
FRAMES=${FRAMES:-150}
PROFILE_DIR=target/release

echo "==> building (release)" >&2
cargo build --release --quiet --bins
rm -rf "$OUT" && mkdir -p "$OUT/pki"
certs() { "$PROFILE_DIR/certs" "$@" >/dev/null; }

echo "==> creating a deployment CA and certificates in $OUT/pki" >&2
certs ca --out "$OUT/pki" --name "peercam demo CA"
certs issue --ca "$OUT/pki/ca.pem" --ca-key "$OUT/pki/ca.key" --role rendezvous --id rdv-1 --ip 127.0.0.1 --dns localhost --out "$OUT/pki"
certs issue --ca "$OUT/pki/ca.pem" --ca-key "$OUT/pki/ca.key" --role camera --id cam-1 --out "$OUT/pki"
certs issue --ca "$OUT/pki/ca.pem" --ca-key "$OUT/pki/ca.key" --role viewer --id alice --out "$OUT/pki"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

PORT=${PORT:-7400}
echo "==> starting the rendezvous on 127.0.0.1:$PORT" >&2
"$PROFILE_DIR/rendezvous" --listen "127.0.0.1:$PORT" --ca "$OUT/pki/ca.pem" \
  --cert "$OUT/pki/rendezvous-rdv-1.pem" --key "$OUT/pki/rendezvous-rdv-1.key" 2>"$OUT/rendezvous.log" &
PIDS+=($!)

echo "==> starting camera cam-1 (bundled clip, looped; viewer alice allowed)" >&2
"$PROFILE_DIR/camera-agent" --rendezvous "127.0.0.1:$PORT" --ca "$OUT/pki/ca.pem" \
  --cert "$OUT/pki/camera-cam-1.pem" --key "$OUT/pki/camera-cam-1.key" \
  --bind 127.0.0.1:0 --allow alice --source assets/sample.h264 2>"$OUT/camera.log" &
PIDS+=($!)

# Wait until the camera has registered.
for _ in $(seq 1 100); do
  grep -q "registered" "$OUT/camera.log" 2>/dev/null && break
  sleep 0.1
done

echo "==> viewer alice watching cam-1 for $FRAMES frames" >&2
"$PROFILE_DIR/viewer" --rendezvous "127.0.0.1:$PORT" --ca "$OUT/pki/ca.pem" \
  --cert "$OUT/pki/viewer-alice.pem" --key "$OUT/pki/viewer-alice.key" \
  --bind 127.0.0.1:0 cam-1 --frames "$FRAMES" -o "$OUT/received.h264" --json | tee "$OUT/summary.json"

if command -v ffprobe >/dev/null; then
  echo "==> ffprobe decodes $OUT/received.h264:" >&2
  ffprobe -v error -count_frames -select_streams v:0 \
    -show_entries stream=codec_name,width,height,nb_read_frames -of default=nw=1 "$OUT/received.h264" >&2
else
  echo "==> (install ffmpeg to have ffprobe check $OUT/received.h264)" >&2
fi
