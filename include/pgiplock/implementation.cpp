// The library compiled once (config.hpp: PGIPLOCK_SEPARATE_COMPILATION).
// Every other file of a program built this way sees only the declarations
// and templates, and compiles in seconds instead of half a minute; meson.build
// offers it as pgiplock_compiled_dep. A user's own build needs these three
// lines in one .cpp, and -DPGIPLOCK_SEPARATE_COMPILATION on every file.
#ifndef PGIPLOCK_SEPARATE_COMPILATION
#define PGIPLOCK_SEPARATE_COMPILATION
#endif
#define PGIPLOCK_IMPLEMENTATION
#include "pgiplock.hpp"
