#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time (default 60 s
# each) and prints what each ran. cargo-fuzz uses nightly flags: on the
# stable toolchain RUSTC_BOOTSTRAP=1 turns them on. Installs cargo-fuzz and a
# C++ compiler (libFuzzer) when missing. A crash stops the run; its input is
# left in fuzz/artifacts/<target>/ and becomes a regression test.
#
#   tests/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}; shift || true
export RUSTC_BOOTSTRAP=1
command -v c++ >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; }
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "== $target ($seconds s)"
    cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -max_len=65536 2>&1 \
        | grep -E "^(#[0-9]+ +DONE|Done [0-9]+ runs|==[0-9]+==ERROR|SUMMARY)" || true
    [ -z "$(ls -A "fuzz/artifacts/$target" 2>/dev/null)" ] || { echo "fuzz: $target found a crash: fuzz/artifacts/$target" >&2; exit 1; }
done
