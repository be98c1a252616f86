#!/usr/bin/env python3
"""bench/build_baseline.py - bench_pgiplock built against a previous header.

Usage: build_baseline.py --rev REV --build DIR --out DIR [--src DIR]

Takes the one-file pgiplock.hpp of git revision REV (`git show
REV:pgiplock.hpp`), writes it to OUT/pgiplock.hpp and compiles the current
bench/bench_pgiplock.cpp against it into OUT/bench_pgiplock, with the compiler
and flags Meson used for bench_pgiplock in the build dir DIR (read from its
compile_commands.json: -O3 etc. of the release build tools/bench makes); only
the include dirs differ (OUT, bench/, and libpq's and liburing's from
pkg-config), linked with pkg-config's libs of libpq and liburing. Prints the
binary's path on stdout (progress on stderr). Skips the compile when the
header, the sources and the command are those of the last build in OUT.

If a later bench_pgiplock.cpp no longer compiles against an old header,
guard the difference with #if on a macro the new header defines.
"""

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys


def log(msg):
    print(f"build_baseline: {msg}", file=sys.stderr, flush=True)


def meson_flags(build):
    """The compiler and the flags of bench_pgiplock.cpp's compile, without
    include dirs, dependency-file and output arguments."""
    with open(os.path.join(build, "compile_commands.json")) as f:
        entries = json.load(f)
    for e in entries:
        if e["file"].replace("\\", "/").endswith("bench/bench_pgiplock.cpp"):
            args = e.get("arguments") or shlex.split(e["command"])
            break
    else:
        raise SystemExit(f"build_baseline: no bench_pgiplock.cpp in {build}/compile_commands.json "
                         "(configured with -Dbench=true?)")
    out, skip = [args[0]], False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MQ", "-MF", "-MT"):
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD") or a.startswith(("-I", "-fdiagnostics-color")) or a.endswith(".cpp"):
            continue
        out.append(a)
    return out


def pkg_config(*args):
    return shlex.split(subprocess.run(["pkg-config", *args, "libpq", "liburing"], check=True,
                                      capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True)
    ap.add_argument("--build", required=True, help="Meson build dir with bench (compile_commands.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--src", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()

    git = ["git", "-C", a.src]
    commit = subprocess.run([*git, "rev-parse", "--verify", "--quiet", a.rev + "^{commit}"],
                            capture_output=True, text=True).stdout.strip()
    if not commit:
        raise SystemExit(f"build_baseline: {a.rev} is no commit of {a.src}")
    header = subprocess.run([*git, "show", f"{commit}:pgiplock.hpp"], capture_output=True).stdout
    if not header:
        raise SystemExit(f"build_baseline: {a.rev} has no pgiplock.hpp at the top")

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pgiplock.hpp"), "wb") as f:
        f.write(header)
    bench = os.path.join(a.src, "bench")
    binary = os.path.join(a.out, "bench_pgiplock")
    cmd = [*meson_flags(a.build), "-I" + a.out, "-I" + bench, *pkg_config("--cflags"),
           os.path.join(bench, "bench_pgiplock.cpp"), "-o", binary, *pkg_config("--libs")]

    h = hashlib.sha256(header + "\0".join(cmd).encode())
    for name in ("bench_pgiplock.cpp", "bench_common.hpp"):
        with open(os.path.join(bench, name), "rb") as f:
            h.update(f.read())
    stamp_file = os.path.join(a.out, ".stamp")
    stamp = h.hexdigest()
    try:
        with open(stamp_file) as f:
            fresh = f.read() == stamp and os.path.exists(binary)
    except FileNotFoundError:
        fresh = False
    if fresh:
        log(f"{binary} is up to date (header of {commit[:12]})")
    else:
        log(f"compiling bench_pgiplock.cpp against the header of {commit[:12]}: {shlex.join(cmd)}")
        if os.path.exists(stamp_file):
            os.remove(stamp_file)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"build_baseline: bench_pgiplock.cpp does not compile against {a.rev}'s header")
        with open(stamp_file, "w") as f:
            f.write(stamp)
    print(binary)


if __name__ == "__main__":
    main()
