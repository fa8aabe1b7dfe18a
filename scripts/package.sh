#!/usr/bin/env bash
# Lays out the C SDK of one target as a vendor installs it, and packs it as a tarball with
# its sha256:
#
#   scripts/package.sh TARGET [LIB_DIR]
#
#   include/omega.h
#   lib/libomega_device.so.<abi major>.<abi minor>    (stripped; SONAME libomega_device.so.<abi major>)
#   lib/libomega_device.so.<abi major> -> …, lib/libomega_device.so -> …
#   lib/libomega_device.a                             (stripped of debug info)
#   lib/pkgconfig/omega.pc                            (relocatable: paths from ${pcfiledir})
#   lib/cmake/omega/omegaConfig.cmake, omegaConfigVersion.cmake  (find_package(omega))
#   share/omega/BUILD-INFO                            (target, backend, versions)
#
# into dist/omega-sdk-<version>-<target>-<backend>/ and dist/….tar.gz (+ .sha256).
# LIB_DIR holds the built libomega_device.{so,a} (scripts/cross.sh passes its output); without
# it the host target is built here with `cargo build --release`. OMEGA_BACKEND picks the
# embedder backend the library was built with (recorded in the name): `onnxruntime`
# (default) or `tract`.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:?usage: scripts/package.sh TARGET [LIB_DIR]}
lib_dir=${2:-}
backend=${OMEGA_BACKEND:-onnxruntime}
case "$target" in
  aarch64-unknown-linux-gnu) strip=aarch64-linux-gnu-strip ;;
  armv7-unknown-linux-gnueabihf) strip=arm-linux-gnueabihf-strip ;;
  x86_64-unknown-linux-gnu) strip=strip ;;
  *) echo "package.sh: unknown target $target" >&2; exit 2 ;;
esac
case "$backend" in onnxruntime|tract) ;; *) echo "package.sh: unknown backend $backend" >&2; exit 2 ;; esac

if [ -z "$lib_dir" ]; then
  [ "$target" = x86_64-unknown-linux-gnu ] || {
    echo "package.sh: cross targets are built by scripts/cross.sh $target build" >&2; exit 2; }
  features=()
  [ "$backend" = tract ] && features=(--no-default-features --features tract)
  # No path of this machine in the library (panic locations name sources relative to these).
  RUSTFLAGS="--remap-path-prefix=$HOME/.cargo=/cargo --remap-path-prefix=$PWD=/omega" \
    CARGO_TARGET_DIR=$PWD/target-pkg cargo build --release --locked -p omega-device --lib "${features[@]}"
  lib_dir=$PWD/target-pkg/release
fi
for f in libomega_device.so libomega_device.a; do
  [ -f "$lib_dir/$f" ] || { echo "package.sh: $lib_dir/$f not built" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
abi() { sed -n "s/^pub const OMEGA_ABI_VERSION_$1: u32 = \([0-9]*\);/\1/p" device-lib/src/ffi.rs; }
major=$(abi MAJOR) minor=$(abi MINOR)
[ -n "$version" ] && [ -n "$major" ] && [ -n "$minor" ] || {
  echo "package.sh: could not read the versions" >&2; exit 1; }

name=omega-sdk-$version-$target-$backend
out=$PWD/dist/$name
rm -rf "$out" "$out.tar.gz" "$out.tar.gz.sha256"
mkdir -p "$out/include" "$out/lib/pkgconfig" "$out/lib/cmake/omega" "$out/share/omega"
cp device-lib/include/omega.h "$out/include/"
real=libomega_device.so.$major.$minor
"$strip" --strip-all -o "$out/lib/$real" "$lib_dir/libomega_device.so"
ln -s "$real" "$out/lib/libomega_device.so.$major"
ln -s "libomega_device.so.$major" "$out/lib/libomega_device.so"
"$strip" --strip-debug -o "$out/lib/libomega_device.a" "$lib_dir/libomega_device.a"

# What a static link needs besides the archive (the Rust standard library's system libraries).
static_libs="-lpthread -ldl -lm -lrt -lutil -lgcc_s -lc"
cat > "$out/lib/pkgconfig/omega.pc" <<EOF
prefix=\${pcfiledir}/../..
includedir=\${prefix}/include
libdir=\${prefix}/lib

Name: omega
Description: Omega on-device recommendation brain, C API (ABI $major.$minor, $backend embedder)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lomega_device
Libs.private: $static_libs
EOF

if [ "$backend" = tract ]; then
  # tract's kernels are found through objects nothing in the archive calls: a static link
  # must take the whole archive, or tract finds no matrix kernel when it loads the model.
  static_target='if(NOT TARGET omega::omega_static)
  add_library(omega::omega_static INTERFACE IMPORTED)
  set_target_properties(omega::omega_static PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_omega_prefix}/include"
    INTERFACE_LINK_LIBRARIES "-Wl,--whole-archive;${_omega_prefix}/lib/libomega_device.a;-Wl,--no-whole-archive;pthread;dl;m;rt;util;gcc_s")
endif()'
else
  static_target='if(NOT TARGET omega::omega_static)
  add_library(omega::omega_static STATIC IMPORTED)
  set_target_properties(omega::omega_static PROPERTIES
    IMPORTED_LOCATION "${_omega_prefix}/lib/libomega_device.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_omega_prefix}/include"
    INTERFACE_LINK_LIBRARIES "pthread;dl;m;rt;util;gcc_s")
endif()'
fi
cat > "$out/lib/cmake/omega/omegaConfig.cmake" <<EOF
# Omega C SDK $version ($target, $backend embedder). Targets:
#   omega::omega         the shared library (SONAME libomega_device.so.$major)
#   omega::omega_static  the static archive, with the system libraries it needs
get_filename_component(_omega_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET omega::omega)
  add_library(omega::omega SHARED IMPORTED)
  set_target_properties(omega::omega PROPERTIES
    IMPORTED_LOCATION "\${_omega_prefix}/lib/$real"
    IMPORTED_SONAME "libomega_device.so.$major"
    INTERFACE_INCLUDE_DIRECTORIES "\${_omega_prefix}/include")
endif()
$static_target
set(OMEGA_ABI_VERSION_MAJOR $major)
set(OMEGA_ABI_VERSION_MINOR $minor)
set(OMEGA_EMBEDDER_BACKEND $backend)
unset(_omega_prefix)
EOF

cat > "$out/lib/cmake/omega/omegaConfigVersion.cmake" <<EOF
# Compatible: the same major (for 0.x, the same minor too) and not older than asked for.
set(PACKAGE_VERSION "$version")
set(PACKAGE_VERSION_COMPATIBLE FALSE)
if(PACKAGE_FIND_VERSION_MAJOR EQUAL "${version%%.*}" AND
   NOT PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)
  if(NOT PACKAGE_FIND_VERSION_MAJOR EQUAL 0 OR PACKAGE_FIND_VERSION_MINOR EQUAL "$(echo "$version" | cut -d. -f2)")
    set(PACKAGE_VERSION_COMPATIBLE TRUE)
  endif()
endif()
if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
  set(PACKAGE_VERSION_EXACT TRUE)
endif()
EOF

cat > "$out/share/omega/BUILD-INFO" <<EOF
version=$version
abi=$major.$minor
target=$target
embedder_backend=$backend
EOF

# Reproducible archive: fixed order, owner and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$out/.." -czf "$out.tar.gz" "$name"
(cd "$out/.." && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
echo "package.sh: $(du -b "$out/lib/$real" | cut -f1) bytes $real" >&2
echo "$out.tar.gz"
