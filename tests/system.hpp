// Running system tools from the tests: the partition test's ip and nft,
// the PgBouncer test's pgbouncer.
#pragma once

#include "support.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>

namespace test {

// A command's exit status and its stdout and stderr together.
struct command_result {
  int status = -1;
  std::string output;
  bool ok() const { return status == 0; }
};

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += "'\\''";
    else out += c;
  }
  return out + "'";
}

inline command_result run_command(const std::string& cmd) {
  command_result r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[512];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  int st = ::pclose(p);
  r.status = (st != -1 && WIFEXITED(st)) ? WEXITSTATUS(st) : -1;
  while (!r.output.empty() && (r.output.back() == '\n' || r.output.back() == ' ')) r.output.pop_back();
  return r;
}

// The absolute path of a system tool: root's tools live in sbin, which a
// test environment's PATH may leave out.
inline std::string find_tool(const std::string& name) {
  std::string path = env_or("PATH") + ":/usr/sbin:/sbin:/usr/bin:/bin";
  std::size_t from = 0;
  while (from <= path.size()) {
    auto to = path.find(':', from);
    if (to == std::string::npos) to = path.size();
    std::string candidate = path.substr(from, to - from) + "/" + name;
    if (to > from && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    from = to + 1;
  }
  return {};
}

}  // namespace test
