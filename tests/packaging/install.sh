#!/usr/bin/env bash
# `meson install` puts pgiplock.hpp and pgiplock.pc in place, and a
# one-file program builds with plain $CXX and pkg-config against that copy.
source "$(dirname "$0")/common.sh"
command -v pkg-config >/dev/null || fail "pkg-config is not installed"

prefix="$work/prefix"
"$meson" setup "$work/build" "$src" --prefix="$prefix" \
    -Dtests=false -Dexamples=false -Dbench=false >"$work/setup.log" 2>&1 \
    || { cat "$work/setup.log"; fail "meson setup failed"; }
"$meson" install -C "$work/build" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; fail "meson install failed"; }

[[ -f "$prefix/include/pgiplock.hpp" ]] || fail "no $prefix/include/pgiplock.hpp after install"
cmp -s "$src/pgiplock.hpp" "$prefix/include/pgiplock.hpp" || fail "the installed header differs from the source"
pc="$(find "$prefix" -name pgiplock.pc -print -quit)"
[[ -n "$pc" ]] || fail "no pgiplock.pc under $prefix"
note "installed: $prefix/include/pgiplock.hpp, ${pc#"$prefix"/}"

export PKG_CONFIG_PATH="$(dirname "$pc")"
modversion="$(pkg-config --modversion pgiplock)" || fail "pkg-config cannot read $pc"
[[ "$modversion" == "$version" ]] || fail "pkg-config says version $modversion, the header says $version"
flags="$(pkg-config --cflags --libs pgiplock)" || fail "pkg-config --cflags --libs pgiplock failed"
note "pkg-config --cflags --libs pgiplock: $flags"

mkdir "$work/app"
cp "$here/consumer.cpp" "$work/app/main.cpp"
cd "$work/app"
# The header found must be the installed copy, not one elsewhere on the system.
# shellcheck disable=SC2086
deps="$($cxx -std=c++20 -MM main.cpp $flags)" || fail "$cxx cannot preprocess with those flags"
[[ "$deps" == *"$prefix/include/pgiplock.hpp"* ]] || fail "the compiler did not use the installed header: $deps"
# shellcheck disable=SC2086
$cxx -std=c++20 -Wall -Wextra -Wpedantic -Werror -o main main.cpp $flags \
    || fail "$cxx main.cpp \$(pkg-config --cflags --libs pgiplock) failed"
run_consumer ./main
note "install: OK"
