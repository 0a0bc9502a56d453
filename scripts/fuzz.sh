#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, nightly toolchain) for a
# bounded time each, from the checked-in corpora in fuzz/corpus; a crash
# fails the run and leaves its input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh              every target, FUZZ_SECONDS (30) each
#   scripts/fuzz.sh --soak 600   every target 600 s, reporting executions
#   scripts/fuzz.sh core_commands ring_peer   only these
#   FUZZ_SANITIZER=none scripts/fuzz.sh --soak 2400 core_commands
#                                about 3x the executions of the default
#                                (address), without its checks of unsafe code
#
# New inputs found go to a scratch corpus, not fuzz/corpus: merge them in
# with `cargo +nightly fuzz cmin <target>` when they are worth keeping.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-30}
sanitizer=${FUZZ_SANITIZER:-address}
if [ "${1:-}" = "--soak" ]; then
  seconds=${2:?--soak needs a number of seconds}
  shift 2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal

cargo +nightly fuzz build -O -s "$sanitizer"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
report=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "corpus/$t"
  log="$scratch/$t.log"
  echo "fuzz: $t for ${seconds}s" >&2
  # The scratch corpus first: new inputs land there; the checked-in one
  # is read only.
  if ! cargo +nightly fuzz run -O -s "$sanitizer" "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  line="$t: ${runs:-?} executions in ${seconds}s"
  # core_commands reports the commands it executed, every 100,000.
  commands=$(sed -n 's/^core_commands: \([0-9]*\) commands executed$/\1/p' "$log" | tail -1)
  [ -n "$commands" ] && line="$line, $commands+ core commands"
  report+=("$line")
done
printf 'fuzz: %s\n' "${report[@]}"
