#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer via cargo fuzz) of every decoder of outside input.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 20)
# cargo fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain build them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
failed=0
for target in rdv_messages media_headers annexb config_and_certs cluster_records; do
  if cargo fuzz run -O "$target" -- -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 \
      >"target/fuzz-$target.log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "target/fuzz-$target.log" | grep -o '[0-9]*$' || true)
    echo "fuzz $target: ok (${runs:-?} runs in ${SECS} s)"
  else
    echo "fuzz $target: FAILED, see fuzz/target/fuzz-$target.log and fuzz/artifacts/$target/"
    tail -40 "target/fuzz-$target.log"
    failed=1
  fi
done
exit $failed
