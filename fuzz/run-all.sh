#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and fails if any crashes.
#
#   fuzz/run-all.sh [SECONDS_PER_TARGET [TARGET...]]   (default 60 s, all targets)
#
# Installs cargo-fuzz when missing, builds all targets once (stable Rust with
# RUSTC_BOOTSTRAP=1 for cargo-fuzz's nightly flags; debug assertions on, so
# an integer overflow is a crash too), then runs each target from its seed
# corpus (fuzz/corpus/TARGET, left untouched: new inputs go to a temporary
# folder). A crash is reported with the path of its input under
# fuzz/artifacts/TARGET/ and the command that replays it. Builds go to
# fuzz/target whatever CARGO_TARGET_DIR says, so fuzzing never invalidates
# the main workspace's build cache.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: fuzz/run-all.sh [SECONDS_PER_TARGET [TARGET...]]" >&2
    exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$fuzz_dir/.."

cargo_fuzz_version="0.13.1"
# Every file in fuzz_targets/ is a target.
all_targets=()
for file in "$fuzz_dir"/fuzz_targets/*.rs; do
    all_targets+=("$(basename "$file" .rs)")
done
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=("${all_targets[@]}")
fi
for target in "${targets[@]}"; do
    if ! [ -f "$fuzz_dir/fuzz_targets/$target.rs" ]; then
        echo "fuzz: no target $target (targets: ${all_targets[*]})" >&2
        exit 2
    fi
done
# Flags for `cargo fuzz build` and `run`; both must agree or `run` rebuilds.
build_flags=(--debug-assertions --sanitizer address)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
    # Its own temporary target folder, not the workspace's.
    env -u CARGO_TARGET_DIR cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$fuzz_dir/target"

start=$(date +%s)
cargo fuzz build "${build_flags[@]}"
echo "fuzz: built the targets in $(( $(date +%s) - start )) s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stamp="$work/started"
touch "$stamp"

failed=()
for target in "${targets[@]}"; do
    mkdir -p "$work/corpus/$target"
    log="$work/$target.log"
    target_start=$(date +%s)
    # New inputs go to the first folder; the seeds are only read.
    if cargo fuzz run "${build_flags[@]}" "$target" \
        "$work/corpus/$target" "$fuzz_dir/corpus/$target" \
        -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        >"$log" 2>&1; then
        runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 || true)
        echo "fuzz: $target ok (${runs:-no summary}; $(( $(date +%s) - target_start )) s)"
    else
        failed+=("$target")
        echo "fuzz: $target FAILED:"
        # The panic or sanitizer report if there is one, else the log's end.
        grep -E -m 1 -A 6 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$log" \
            || tail -n 40 "$log"
        found=0
        while IFS= read -r crash; do
            found=1
            echo "fuzz: $target crash input: $crash"
            echo "fuzz: replay with: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $target $crash"
        done < <(find "$fuzz_dir/artifacts/$target" -type f -newer "$stamp" 2>/dev/null)
        if [ "$found" = 0 ]; then
            echo "fuzz: $target failed without leaving a crash input (build or setup error above)"
        fi
    fi
done

echo "fuzz: finished in $(( $(date +%s) - start )) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
