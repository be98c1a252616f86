#!/usr/bin/env bash
# A consumer Meson project with this repository in subprojects/pgiplock
# builds with dependency('pgiplock') and runs.
source "$(dirname "$0")/common.sh"

app="$work/app"
mkdir -p "$app/subprojects/pgiplock"
copy_release_tree "$app/subprojects/pgiplock"
[[ -f "$app/subprojects/pgiplock/meson.build" ]] || fail "the copy has no meson.build"
[[ ! -e "$app/subprojects/pgiplock/build" ]] || fail "a build directory was copied"

cp "$here/consumer.cpp" "$app/main.cpp"
cat >"$app/meson.build" <<MESON
project('consumer', 'cpp',
  default_options: ['cpp_std=c++20', 'warning_level=3', 'werror=true', 'buildtype=debug'])
dep = dependency('pgiplock', version: '>=$version')
if dep.version() != '$version'
  error('dependency(\'pgiplock\').version() is ' + dep.version() + ', the header says $version')
endif
executable('consumer', 'main.cpp', dependencies: dep)
MESON

# Forced fallback: a pgiplock installed on this machine must not stand in
# for the subproject under test.
"$meson" setup "$work/build" "$app" --force-fallback-for=pgiplock >"$work/setup.log" 2>&1 \
    || { cat "$work/setup.log"; fail "meson setup of the consumer project failed"; }
grep -q "Executing subproject pgiplock" "$work/setup.log" \
    || { cat "$work/setup.log"; fail "the consumer did not use subprojects/pgiplock"; }
# The subproject must not build its tests, examples or benchmarks for us.
grep -q "pgiplock| Build targets in project: 0" "$work/setup.log" \
    || { cat "$work/setup.log"; fail "the subproject defines build targets of its own"; }
"$meson" compile -C "$work/build" >"$work/compile.log" 2>&1 \
    || { cat "$work/compile.log"; fail "the consumer project did not build"; }
run_consumer "$work/build/consumer"
# No install or pkg-config file from a subproject: that is the parent's call.
installed="$("$meson" introspect --installed "$work/build")"
[[ "$installed" == "{}" ]] || fail "the subproject installs files into the parent project: $installed"
note "subproject: OK"
