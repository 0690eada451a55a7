#!/bin/sh
# Builds shift-limit.wasm from src/lib.rs (needs: rustup target add wasm32-unknown-unknown).
set -eu
cd "$(dirname "$0")"
cargo build --release
cp target/wasm32-unknown-unknown/release/shift_limit.wasm shift-limit.wasm
echo "shift-limit.wasm: $(wc -c < shift-limit.wasm) bytes, sha256 $(sha256sum shift-limit.wasm | cut -d' ' -f1)"
