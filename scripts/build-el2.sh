#!/usr/bin/env bash
# Builds hyp-core for real EL2 (aarch64-unknown-none) with Debian's Rust
# toolchain, which carries the standard library's source (rustup here cannot
# add targets). See docs/el2-build.md. Also checks that hyp-core stays
# #![no_std] without alloc and that its normal dependencies are no_std crates.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/rustc ] || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
  echo "build-el2: Debian's rustc-web and rust-web-src are needed (apt-get install rustc-web cargo-web rust-web-src)" >&2
  exit 1
fi

RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo build --release --locked \
  -p hyp-core --target aarch64-unknown-none \
  -Zbuild-std=core -Zbuild-std-features=compiler-builtins-mem \
  --target-dir target/el2
echo "build-el2: hyp-core built for aarch64-unknown-none: $(ls target/el2/aarch64-unknown-none/release/libhyp_core.rlib)"

# Only `core` was built for the target: any use of std or alloc outside
# tests fails the build above. The attribute and the dependency list are
# checked so that a change to either is deliberate.
grep -q '^#!\[cfg_attr(not(test), no_std)\]' hyp-core/src/lib.rs || { echo "build-el2: hyp-core lost #![no_std]" >&2; exit 1; }
deps=$(cargo tree -p hyp-core -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
for dep in $deps; do
  case "$dep" in
    hyp-core|aarch64-cpu|tock-registers) ;;
    *) echo "build-el2: unexpected normal dependency of hyp-core: $dep (check it is no_std, then list it here)" >&2; exit 1 ;;
  esac
done
echo "build-el2: normal dependencies: $(echo $deps)"
