#!/usr/bin/env bash
# The project's test command (README.md): lints, the EL2 builds (hyp-core
# and the QEMU image), the loom model of the rings, then every test in the
# workspace (the EL2 image is booted under QEMU by tests/tests/el2_qemu.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo fmt --manifest-path hyp-core/image/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/build-el2.sh
scripts/build-el2-image.sh >/dev/null
RUSTFLAGS="--cfg loom" cargo test --locked --release -p hyp-core --test loom_ring --target-dir target/loom
cargo nextest run --workspace --locked --no-fail-fast
