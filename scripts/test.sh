#!/usr/bin/env bash
# The project's test command (README.md): lints, the EL2 build, the loom
# model of the rings, then every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/build-el2.sh
RUSTFLAGS="--cfg loom" cargo test --locked --release -p hyp-core --test loom_ring --target-dir target/loom
cargo nextest run --workspace --locked --no-fail-fast
