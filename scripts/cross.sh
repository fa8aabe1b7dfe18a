#!/usr/bin/env bash
# Cross-builds the on-device brain for a TV target and tests it under qemu-user.
#
#   scripts/cross.sh TARGET [build|example|tests|all]     (default: all)
#
# TARGET is aarch64-unknown-linux-gnu (ONNX Runtime embedder) or armv7-unknown-linux-gnueabihf
# (no ONNX Runtime exists for it: the pure-Rust tract embedder).
#   build      device-lib (staticlib + cdylib, cargo profile `sdk`: release + LTO) into
#              target-cross/, packaged by scripts/package.sh into dist/ (stripped, tarball
#              + sha256)
#   example    only the example step below, on what `build` made
#   tests      only the test step below
#   run PROGRAM ARGS…  run a TARGET program under qemu as the tests do (cargo's runner)
#   test, all  build, then the guide's C example (examples/c) linked against the unpacked
#              tarball with pkg-config and with CMake (shared and static), run under qemu
#              without and with a catalogue, and device-lib's tests under qemu with the real
#              model (aarch64: ONNX Runtime for aarch64, fetched and sha256-checked by
#              scripts/assets.py; armv7: every test that does not need ONNX Runtime, on tract)
#
# rustup cannot fetch other targets' standard library here, so this uses Debian's Rust
# (rustc-web, cargo-web, rust-web-src: /usr/bin/cargo) with `-Zbuild-std`, the Debian cross
# linkers and qemu-user, installing them if missing. The x86 build never needs them.
# OMEGA_CROSS_TESTS: extra `cargo test` harness arguments (a name filter, --skip …).
# OMEGA_CROSS_PROFILE: the cargo profile of both steps (default: `sdk` to build, `release` to
# test); CI uses `cross-ci` (opt-level 1, quicker to compile), and one profile lets both
# targets share one set of host build scripts and proc-macros in target-cross/.
# OMEGA_CROSS_TARGET_DIR: cargo's target folder (default: target-cross/).
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."

target=${1:?usage: scripts/cross.sh TARGET [build|example|tests|all]}
what=${2:-all}
case "$target" in
  aarch64-unknown-linux-gnu)
    gnu=aarch64-linux-gnu qemu=qemu-aarch64 ort_arch=aarch64 ;;
  armv7-unknown-linux-gnueabihf)
    gnu=arm-linux-gnueabihf qemu=qemu-arm ort_arch= ;;
  *) echo "cross.sh: unknown target $target (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2
     exit 2 ;;
esac
case "$what" in build|example|tests|test|all|run) ;; *) echo "cross.sh: unknown step $what" >&2; exit 2 ;; esac

need=()
for pkg_cmd in "rustc-web:/usr/bin/rustc" "cargo-web:/usr/bin/cargo" \
  "rust-web-src:/usr/lib/rustlib/src/rust/library/Cargo.lock" \
  "gcc-$gnu:/usr/bin/$gnu-gcc" "qemu-user:/usr/bin/$qemu" \
  "cmake:/usr/bin/cmake" "pkg-config:/usr/bin/pkg-config"; do
  [ -e "${pkg_cmd#*:}" ] || need+=("${pkg_cmd%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "cross.sh: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

triple_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${OMEGA_CROSS_TARGET_DIR:-$PWD/target-cross}
export "CARGO_TARGET_${triple_env}_LINKER=$gnu-gcc"
export "CARGO_TARGET_${triple_env}_RUNNER=$PWD/scripts/cross.sh $target run"
export "CC_${target//-/_}=$gnu-gcc" "AR_${target//-/_}=$gnu-ar"
# A fresh build: incremental caches would only cost disk.
export CARGO_INCREMENTAL=0
# No path of this machine compiled into the library (panic locations are relative to these).
export RUSTFLAGS="--remap-path-prefix=$HOME/.cargo=/cargo --remap-path-prefix=$PWD=/omega --remap-path-prefix=/usr/lib/rustlib/src/rust=/rust"
# Stripped afterwards: debug info would only slow the build down.
export CARGO_PROFILE_RELEASE_DEBUG=false
cargo=(/usr/bin/cargo)
build_profile=${OMEGA_CROSS_PROFILE:-sdk}
test_profile=${OMEGA_CROSS_PROFILE:-release}
xflags=(-Zbuild-std --target "$target" --locked -p omega-device)
if [ -n "$ort_arch" ]; then
  backend=onnxruntime features=()
else
  # No ONNX Runtime exists for this target: the pure-Rust backend only.
  backend=tract features=(--no-default-features --features tract)
fi

if [ "$what" != run ]; then
  python3 scripts/assets.py fetch model model-tract tokenizer ${ort_arch:+ort-aarch64} >/dev/null
  eval "$(python3 scripts/assets.py env)"
fi
ort_lib=${ort_arch:+${OMEGA_CACHE:-}/onnxruntime-aarch64/libonnxruntime.so.1.31.1}
# qemu-user shows the x86 host's /sys to the ARM program, and ONNX Runtime's CPU detection
# crashes on the host's CPU cache files: run it in a private mount namespace whose CPU sysfs
# names one CPU and nothing else (ONNX Runtime then warns "Unknown CPU vendor" and runs).
run_target=(unshare -m sh -c 'mount -t tmpfs none /sys/devices/system/cpu &&
  mkdir /sys/devices/system/cpu/cpu0 && echo 0 > /sys/devices/system/cpu/possible &&
  echo 0 > /sys/devices/system/cpu/present && exec "$0" "$@"' "$qemu" -L "/usr/$gnu")
if [ "$what" = run ]; then
  # `cross.sh TARGET run PROGRAM ARGS…`: cargo's test runner (below) for TARGET.
  cd "$caller_dir"
  exec "${run_target[@]}" "${@:3}"
fi

step() { echo "cross.sh [$target] $*" >&2; }

build() {
  step "building device-lib ($backend embedder)"
  "${cargo[@]}" build "${xflags[@]}" --profile "$build_profile" --lib "${features[@]}"
  OMEGA_BACKEND=$backend scripts/package.sh "$target" "$CARGO_TARGET_DIR/$target/$build_profile" >/dev/null
}

# The packaged SDK, unpacked where a vendor would put it.
sdk() { ls -d "$PWD"/dist/omega-sdk-*-"$target-$backend" | head -n1; }

example() {
  local tarball work prefix
  tarball=$(sdk).tar.gz
  (cd dist && sha256sum --quiet -c "$(basename "$tarball").sha256")
  work=$(mktemp -d /tmp/omega-cross-example.XXXXXX)
  tar -C "$work" -xzf "$tarball"
  prefix=$(ls -d "$work"/omega-sdk-*)
  step "example: pkg-config (shared library, rpath)"
  local pc=(env PKG_CONFIG_PATH= PKG_CONFIG_LIBDIR="$prefix/lib/pkgconfig" pkg-config)
  # shellcheck disable=SC2046
  "$gnu-gcc" examples/c/omega_example.c $("${pc[@]}" --cflags --libs omega) \
    -Wl,-rpath,"$("${pc[@]}" --variable=libdir omega)" -o "$work/example-pc"
  step "example: CMake find_package(omega) (shared and static)"
  cmake -S examples/c -B "$work/cmake" -DCMAKE_SYSTEM_NAME=Linux \
    -DCMAKE_SYSTEM_PROCESSOR="${target%%-*}" -DCMAKE_C_COMPILER="$gnu-gcc" \
    -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$work/cmake" >/dev/null
  local cat=$work/catalogue.json
  printf '%s' '[{"content_id":"ronin","title":"Ronin","genres":["crime","thriller"],"content_type":"movie"},
    {"content_id":"toy-story","title":"Toy Story","genres":["animation","children"],"content_type":"movie"}]' > "$cat"
  local exe out err
  for exe in "$work/example-pc" "$work/cmake/omega_example" "$work/cmake/omega_example_static"; do
    step "running $(basename "$exe") under $qemu"
    rm -f "$work"/*.sqlite*
    # Assets only through the environment: nothing else is looked at.
    out=$(env -u OMEGA_CACHE ${ort_lib:+ORT_DYLIB_PATH=$ort_lib} \
      OMEGA_MODEL_PATH="$OMEGA_CACHE/minilm/model.onnx" \
      OMEGA_TRACT_MODEL_PATH="$OMEGA_CACHE/minilm/model-tract.onnx" \
      OMEGA_TOKENIZER_PATH="$OMEGA_CACHE/minilm/tokenizer.json" \
      "${run_target[@]}" "$exe" "$work/a.sqlite" 2>"$work/err") || {
      cat "$work/err" >&2; echo "$out" >&2; echo "cross.sh: $exe failed" >&2; return 1; }
    err=$(cat "$work/err")
    grep -q '^recommend: \[\]$' <<<"$out" && grep -q '^(empty: no catalogue' <<<"$out" \
      && grep -q '^example done$' <<<"$out" || {
      echo "$out" >&2; echo "cross.sh: $exe: unexpected output without a catalogue" >&2; return 1; }
    out=$(env -u OMEGA_CACHE ${ort_lib:+ORT_DYLIB_PATH=$ort_lib} \
      OMEGA_MODEL_PATH="$OMEGA_CACHE/minilm/model.onnx" \
      OMEGA_TRACT_MODEL_PATH="$OMEGA_CACHE/minilm/model-tract.onnx" \
      OMEGA_TOKENIZER_PATH="$OMEGA_CACHE/minilm/tokenizer.json" \
      "${run_target[@]}" "$exe" "$work/b.sqlite" "$cat" 2>>"$work/err") || {
      cat "$work/err" >&2; echo "cross.sh: $exe failed with a catalogue" >&2; return 1; }
    grep -q '^recommend: \[{"content_id":"ronin"' <<<"$out" || {
      echo "$out" >&2; echo "cross.sh: $exe: the catalogue's crime film was not recommended first" >&2; return 1; }
    # The pre-warm thread is joined at close: nothing of ONNX Runtime's shows at exit (but
    # the warning about the CPU hidden above).
    sed -i '/^onnxruntime cpuid_info warning: Unknown CPU vendor/d' "$work/err"
    if [ -s "$work/err" ]; then
      cat "$work/err" >&2; echo "cross.sh: $exe wrote to stderr" >&2; return 1
    fi
  done
  rm -rf "$work"
}

tests() {
  step "device-lib tests under $qemu ($backend embedder)"
  local env=(OMEGA_EMBEDDER_BACKEND=$backend)
  [ -n "$ort_lib" ] && env+=(ORT_DYLIB_PATH="$ort_lib")
  # The C-ABI tests that compile C with the host's cc are covered by example() instead. The
  # benchmark's test starts the benchmark binary as a child process: qemu-user runs only the
  # program it was given (no binfmt_misc here), and timings under qemu are no figures anyway.
  local skip=(--skip a_c_program_uses_the_static_library --skip the_guides_example_runs
    --skip the_benchmark_reports_its_targets_and_check_agrees)
  if [ -z "$ort_arch" ]; then
    # Tests that need ONNX Runtime itself (its own error paths, the ORT-vs-original model,
    # tract compared with ONNX Runtime: on x86-64 and aarch64).
    skip+=(--skip missing_or_broken_assets_give_clear_errors
      --skip the_converted_model_is_faithful_to_the_original
      --skip the_tract_backend_embeds_like_onnx_runtime)
  fi
  env "${env[@]}" "${cargo[@]}" test "${xflags[@]}" --profile "$test_profile" "${features[@]}" \
    -- "${skip[@]}" ${OMEGA_CROSS_TESTS:-}
}

case "$what" in
  build) build ;;
  example) example ;;
  tests) tests ;;
  test|all) build; example; tests ;;
esac
