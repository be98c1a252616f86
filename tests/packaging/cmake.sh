#!/usr/bin/env bash
# CMake users: pgiplock::pgiplock through find_package (the package `meson
# install` writes, and the one CMake's own install writes), add_subdirectory
# and FetchContent from a local archive. Each consumer builds a program that
# connects to PGIPLOCK_DSN and LISTENs, and runs it. Also: a version the
# package cannot satisfy and a missing liburing fail at configure time, with
# CMake's messages.
source "$(dirname "$0")/common.sh"

skip() { printf 'SKIP: %s\n' "$*"; exit 77; }
command -v cmake >/dev/null || skip "cmake is not installed (tools/check installs it)"
[[ -n "${PGIPLOCK_DSN:-}" ]] || skip "PGIPLOCK_DSN is not set: the consumers connect and LISTEN"

tree="$work/pgiplock"
copy_release_tree "$tree"
[[ -f "$tree/CMakeLists.txt" ]] || fail "the release tree has no CMakeLists.txt"

# consumer DIR HOW: a CMake project in DIR that gets pgiplock the way HOW
# says (CMake lines) and links pgiplock::pgiplock. No C++ standard is set
# here: C++20 must come from the target.
consumer() {
    local dir="$1" how="$2"
    mkdir -p "$dir"
    cp "$here/cmake_consumer.cpp" "$dir/main.cpp"
    cat >"$dir/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.16)
project(consumer LANGUAGES CXX)
$how
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE pgiplock::pgiplock)
target_compile_options(consumer PRIVATE -Wall -Wextra -Wpedantic -Werror)
CMAKE
}

# build_and_run NAME DIR [cmake args...]
build_and_run() {
    local name="$1" dir="$2" out
    shift 2
    cmake -S "$dir" -B "$dir/build" "$@" >"$dir/configure.log" 2>&1 \
        || { cat "$dir/configure.log"; fail "$name: cmake configure failed"; }
    cmake --build "$dir/build" >"$dir/build.log" 2>&1 \
        || { cat "$dir/build.log"; fail "$name: cmake --build failed"; }
    out="$("$dir/build/consumer")" || fail "$name: the consumer exited with status $?"
    [[ "$out" =~ ^pgiplock\ ${version//./\\.}\ ok\ on\ (io_uring|epoll),\ LISTEN\ heard\ its\ NOTIFY$ ]] \
        || fail "$name: unexpected output '$out'"
    note "$name: $out"
}

# 1. The package `meson install` writes.
meson_prefix="$work/meson-prefix"
"$meson" setup "$work/meson-build" "$tree" --prefix="$meson_prefix" \
    -Dtests=false -Dexamples=false -Dbench=false >"$work/meson-setup.log" 2>&1 \
    || { cat "$work/meson-setup.log"; fail "meson setup failed"; }
"$meson" install -C "$work/meson-build" >"$work/meson-install.log" 2>&1 \
    || { cat "$work/meson-install.log"; fail "meson install failed"; }
config="$(find "$meson_prefix" -name pgiplockConfig.cmake -print -quit)"
[[ -n "$config" ]] || fail "meson install wrote no pgiplockConfig.cmake under $meson_prefix"
[[ -f "$(dirname "$config")/pgiplockConfigVersion.cmake" ]] || fail "no pgiplockConfigVersion.cmake beside $config"
note "meson install: ${config#"$meson_prefix"/}"
consumer "$work/find-meson" 'find_package(pgiplock 0.1 REQUIRED)'
build_and_run "find_package (meson install)" "$work/find-meson" -DCMAKE_PREFIX_PATH="$meson_prefix"

# 2. The package CMake's own install writes, from the same template.
cmake_prefix="$work/cmake-prefix"
cmake -S "$tree" -B "$work/cmake-build" >"$work/cmake-configure.log" 2>&1 \
    || { cat "$work/cmake-configure.log"; fail "cmake configure of pgiplock failed"; }
cmake --install "$work/cmake-build" --prefix "$cmake_prefix" >"$work/cmake-install.log" 2>&1 \
    || { cat "$work/cmake-install.log"; fail "cmake --install of pgiplock failed"; }
cmp -s "$src/pgiplock.hpp" "$cmake_prefix/include/pgiplock.hpp" || fail "cmake installed another header"
consumer "$work/find-cmake" 'find_package(pgiplock 0.1 REQUIRED)'
build_and_run "find_package (cmake --install)" "$work/find-cmake" -DCMAKE_PREFIX_PATH="$cmake_prefix"

# 3. add_subdirectory of the source tree.
consumer "$work/subdir" "add_subdirectory(\"$tree\" pgiplock)"
build_and_run "add_subdirectory" "$work/subdir"

# 4. FetchContent from a local archive of the release tree.
tar -C "$work" -czf "$work/pgiplock.tar.gz" pgiplock
consumer "$work/fetch" "include(FetchContent)
FetchContent_Declare(pgiplock URL \"file://$work/pgiplock.tar.gz\")
FetchContent_MakeAvailable(pgiplock)"
build_and_run "FetchContent" "$work/fetch"

# Bad input: a version the package cannot satisfy, in CMake's words.
consumer "$work/too-new" 'find_package(pgiplock 9.0 REQUIRED)'
if cmake -S "$work/too-new" -B "$work/too-new/build" -DCMAKE_PREFIX_PATH="$meson_prefix" \
    >"$work/too-new.log" 2>&1; then
    fail "find_package(pgiplock 9.0) succeeded against version $version"
fi
grep -q "requested version \"9.0\"" "$work/too-new.log" \
    || { cat "$work/too-new.log"; fail "find_package(pgiplock 9.0) failed without CMake's version message"; }
note "find_package(pgiplock 9.0): refused: $(grep -m1 'requested version "9.0"' "$work/too-new.log" | sed 's/^ *//')"

# Bad input: no liburing on the machine (pkg-config finds nothing) fails at
# configure time naming it, not at link time.
mkdir -p "$work/no-pc"
if PKG_CONFIG_LIBDIR="$work/no-pc" PKG_CONFIG_PATH="" cmake -S "$work/find-meson" -B "$work/no-uring" \
    -DCMAKE_PREFIX_PATH="$meson_prefix" >"$work/no-uring.log" 2>&1; then
    fail "configure succeeded although pkg-config could not find liburing"
fi
grep -q "pgiplock needs liburing >= 2.3" "$work/no-uring.log" \
    || { cat "$work/no-uring.log"; fail "the configure failure without liburing does not name liburing"; }
note "without liburing: $(grep -m1 "pgiplock needs liburing" "$work/no-uring.log" | sed 's/^ *//')"
# ... and an optional find_package(pgiplock QUIET) configures, seeing it absent.
mkdir -p "$work/optional"
cat >"$work/optional/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.20)
project(optional_pgiplock LANGUAGES CXX)
find_package(pgiplock QUIET)
message(STATUS "pgiplock_FOUND=${pgiplock_FOUND}")
CMAKE
PKG_CONFIG_LIBDIR="$work/no-pc" PKG_CONFIG_PATH="" cmake -S "$work/optional" -B "$work/optional/build" \
    -DCMAKE_PREFIX_PATH="$meson_prefix" >"$work/optional.log" 2>&1 \
    || { cat "$work/optional.log"; fail "find_package(pgiplock QUIET) without liburing stopped the configure"; }
grep -q "pgiplock_FOUND=0\|pgiplock_FOUND=FALSE" "$work/optional.log" \
    || { cat "$work/optional.log"; fail "find_package(pgiplock QUIET) without liburing did not leave pgiplock_FOUND false"; }
note "find_package(pgiplock QUIET) without liburing: configures, $(grep -m1 -o 'pgiplock_FOUND=[A-Z0-9]*' "$work/optional.log")"
note "cmake: OK"
