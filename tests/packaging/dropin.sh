#!/usr/bin/env bash
# Dropping in the header alone: pgiplock.hpp beside a program, no -I for
# libpq (the header finds Debian's postgresql/libpq-fe.h itself), -lpq -luring.
source "$(dirname "$0")/common.sh"

cp "$src/pgiplock.hpp" "$here/consumer.cpp" "$work/"
cd "$work"
mv consumer.cpp main.cpp
# The build's compiler, and both that a user is likely to have when present
# (once each: c++ is usually g++ under another name).
compilers=("$cxx")
seen=" $(readlink -f "$(command -v "${cxx%% *}")" 2>/dev/null) "
for c in g++ clang++; do
    real="$(readlink -f "$(command -v "$c")" 2>/dev/null)" || continue
    [[ "$seen" == *" $real "* ]] && continue
    seen+="$real "
    compilers+=("$c")
done
for c in "${compilers[@]}"; do
    # shellcheck disable=SC2086
    $c -std=c++20 -Wall -Wextra -Wpedantic -Werror -o "main-${c// /_}" main.cpp -lpq -luring \
        || fail "$c -std=c++20 main.cpp -lpq -luring failed with only pgiplock.hpp beside it"
    run_consumer "./main-${c// /_}"
done
note "drop-in: OK (${compilers[*]})"
