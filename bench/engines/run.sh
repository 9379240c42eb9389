#!/bin/bash
# Reproduce: bash run.sh  (from bench/engines)
set -e
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" CARGO_INCREMENTAL=0
nice -n 5 cargo build --release
B=target/release/engine-bench
D=data
for run in 1 2; do
  for e in log redb fjall sqlite; do
    echo "# run=$run engine=$e"
    nice -n 5 $B $e commit64 $D/$e-c64 10; rm -rf $D/$e-c64
    nice -n 5 $B $e commit1  $D/$e-c1 10;  rm -rf $D/$e-c1
    nice -n 5 $B $e bulk   $D/$e-bulk
    nice -n 5 $B $e delete $D/$e-bulk;     rm -rf $D/$e-bulk
  done
done
