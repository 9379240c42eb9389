#!/bin/bash
# Extra variant: log with zero-filled preallocation (a, b only). Reproduce: bash run-logpre.sh
set -e
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" CARGO_INCREMENTAL=0
nice -n 5 cargo build --release
B=target/release/engine-bench
for run in 1 2; do
  nice -n 5 $B logpre commit64 data/logpre-c64 10; rm -rf data/logpre-c64
  nice -n 5 $B logpre commit1  data/logpre-c1 10;  rm -rf data/logpre-c1
done
