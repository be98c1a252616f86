// A child process the tests talk to over pipes, line by line, without
// blocking the event loop: Node peers, listener processes, signal targets.
#pragma once

#include "support.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <string>
#include <vector>

namespace test {

class child_process {
 public:
  // argv[0] is looked up on PATH. `env` entries ("NAME=value") are added to
  // this process's environment. The child starts with no blocked signals
  // and default dispositions, whatever the parent had.
  explicit child_process(std::vector<std::string> argv, std::vector<std::string> env = {}) {
    int in[2], out[2];
    REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int s : {SIGINT, SIGTERM, SIGABRT, SIGPIPE}) ::signal(s, SIG_DFL);
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      for (auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "exec %s failed: %s\n", args[0], std::strerror(errno));
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
    ::fcntl(stdout_, F_SETFL, ::fcntl(stdout_, F_GETFL) | O_NONBLOCK);
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  ~child_process() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (stdin_ >= 0) ::close(stdin_);
    if (stdout_ >= 0) ::close(stdout_);
  }

  pid_t pid() const { return pid_; }
  bool at_eof() const { return eof_ && buffer_.find('\n') == std::string::npos; }
  const std::vector<std::string>& lines() const { return lines_; }

  void send(const std::string& line) {
    std::string l = line + "\n";
    REQUIRE(::write(stdin_, l.data(), l.size()) == static_cast<ssize_t>(l.size()));
  }
  void close_stdin() {
    ::close(stdin_);
    stdin_ = -1;
  }

  // The next line, or nullopt at the deadline or end of output.
  task<std::optional<std::string>> read_line(event_loop& loop, std::chrono::milliseconds limit) {
    auto deadline = clock::now() + limit;
    for (;;) {
      auto nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        lines_.push_back(line);
        co_return line;
      }
      if (eof_) co_return std::nullopt;
      auto r = co_await loop.poll(stdout_, POLLIN, deadline);
      if (r.timed_out) co_return std::nullopt;
      char buf[4096];
      ssize_t n = ::read(stdout_, buf, sizeof buf);
      if (n > 0) buffer_.append(buf, static_cast<std::size_t>(n));
      else if (n == 0) eof_ = true;
    }
  }

  // Reads until a line starting with `prefix`; returns it, or nullopt.
  task<std::optional<std::string>> expect(event_loop& loop, std::string prefix, std::chrono::milliseconds limit) {
    auto deadline = clock::now() + limit;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
      if (left.count() <= 0) co_return std::nullopt;
      auto line = co_await read_line(loop, left);
      if (!line) co_return std::nullopt;
      if (line->rfind(prefix, 0) == 0) co_return line;
    }
  }

  void signal(int sig) { ::kill(pid_, sig); }

  // Waits for the exit (polling, so the loop keeps running); the raw status.
  task<std::optional<int>> wait_exit(event_loop& loop, std::chrono::milliseconds limit) {
    auto deadline = clock::now() + limit;
    for (;;) {
      int status = 0;
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        co_return status;
      }
      if (clock::now() >= deadline) co_return std::nullopt;
      co_await loop.sleep(std::chrono::milliseconds(1));
    }
  }

  // Everything seen so far, for failure messages.
  std::string transcript() const {
    std::string t;
    for (auto& l : lines_) t += l + "\n";
    return t;
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1, stdout_ = -1;
  std::string buffer_;
  std::vector<std::string> lines_;
  bool eof_ = false;
  bool reaped_ = false;
};

}  // namespace test
