#!/usr/bin/env bash
# Builds the EL2 image (hyp-core/image: hyp-core at EL2 on QEMU virt plus its
# EL1 guest) for aarch64-unknown-none with Debian's Rust toolchain, linked by
# rust-lld with hyp-core/image/link.ld (recipe: docs/el2-build.md).
# Prints the image's path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ ! -x /usr/bin/rustc ] || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
  echo "build-el2-image: Debian's rustc-web and rust-web-src are needed (apt-get install rustc-web cargo-web rust-web-src)" >&2
  exit 1
fi
lld="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"
if [ ! -x "$lld" ]; then
  echo "build-el2-image: rust-lld not found at $lld" >&2
  exit 1
fi

cd hyp-core/image
RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo build --release --quiet --locked \
  --target aarch64-unknown-none \
  -Zbuild-std=core -Zbuild-std-features=compiler-builtins-mem \
  --target-dir "$root/target/el2-image" \
  --config "target.aarch64-unknown-none.linker=\"$lld\"" \
  --config "target.aarch64-unknown-none.rustflags=[\"-C\",\"link-arg=-T$root/hyp-core/image/link.ld\"]" >&2
echo "$root/target/el2-image/aarch64-unknown-none/release/faultline-el2-image"
