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
# Separate compilation (config.hpp): the library compiled once, in a file of
# its own, and the program built from declarations; with -Werror on both.
cat > impl.cpp <<'EOF'
#define PGIPLOCK_IMPLEMENTATION
#include "pgiplock.hpp"
EOF
for c in "${compilers[@]}"; do
    out="sep-${c// /_}"
    # shellcheck disable=SC2086
    $c -std=c++20 -Wall -Wextra -Wpedantic -Werror -DPGIPLOCK_SEPARATE_COMPILATION -c impl.cpp -o "$out-impl.o" \
        || fail "$c: the implementation file (PGIPLOCK_IMPLEMENTATION) does not compile"
    # shellcheck disable=SC2086
    $c -std=c++20 -Wall -Wextra -Wpedantic -Werror -DPGIPLOCK_SEPARATE_COMPILATION -c main.cpp -o "$out-main.o" \
        || fail "$c: a program's file does not compile against the declarations alone"
    # shellcheck disable=SC2086
    $c -o "$out" "$out-main.o" "$out-impl.o" -lpq -luring \
        || fail "$c: the program and the library compiled apart do not link"
    run_consumer "./$out"
done
note "drop-in: OK (${compilers[*]}), header-only and compiled apart"
