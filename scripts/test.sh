#!/usr/bin/env bash
# The project's test command (README.md), complete on a fresh Debian 12
# machine with rustup's toolchain: installs what the tests need and is
# missing, then runs the lints, the EL2 builds (hyp-core and the QEMU
# image), the loom model of the rings, and every test in the workspace (the
# EL2 image is booted under QEMU by tests/tests/el2_qemu.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

command -v cargo >/dev/null || {
  echo "test.sh: cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
}

# Debian's Rust toolchain with library sources builds hyp-core for
# aarch64-unknown-none (docs/architecture.md, scripts/build-el2.sh); QEMU
# boots the EL2 image; protoc with the gRPC Python plugin, grpcio and
# protobuf run the Python policy example's test; man renders the CLI's
# man page.
need=()
[ -x /usr/bin/rustc ] || need+=(rustc-web)
[ -x /usr/bin/cargo ] || need+=(cargo-web)
[ -d /usr/lib/rustlib/src/rust/library ] || need+=(rust-web-src)
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -x /usr/bin/grpc_python_plugin ] || need+=(protobuf-compiler-grpc)
/usr/bin/python3 -c 'import grpc' 2>/dev/null || need+=(python3-grpcio)
/usr/bin/python3 -c 'import google.protobuf' 2>/dev/null || need+=(python3-protobuf)
# The CLI's man page test renders it with man (groff underneath).
command -v man >/dev/null || need+=(man-db)
command -v groff >/dev/null || need+=(groff-base)
# The CLI's terminal tests drive it in a tmux pane, as a person sees it.
command -v tmux >/dev/null || need+=(tmux)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}" >&2
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${need[@]}"
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

cargo fmt --all -- --check
cargo fmt --manifest-path hyp-core/image/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/build-el2.sh
scripts/build-el2-image.sh >/dev/null
RUSTFLAGS="--cfg loom" cargo test --locked --release -p hyp-core --test loom_ring --target-dir target/loom
cargo nextest run --workspace --locked --no-fail-fast
# Every fuzz target, about 30 s each, from the checked-in corpora (nightly;
# installs cargo-fuzz if missing). A crash fails the run.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
scripts/fuzz.sh
