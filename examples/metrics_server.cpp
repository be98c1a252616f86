// metrics_server: a listener that serves its own stats as Prometheus metrics.
//
// It listens to the channels in single-listener mode (start several: one
// holds each channel, the others stand by) and answers
//   GET /metrics   with prometheus_text(ps.stats())
// and 404 to any other path. The HTTP side is a few dozen lines on the
// library's event loop: a non-blocking accept, one request per connection
// (read up to the blank line that ends the headers, answer, close). No
// keep-alive, no request bodies: enough for a Prometheus scraper, not a web
// server.
//
//   metrics_server [--bind=ADDRESS] DSN PORT CHANNEL...
//   metrics_server "host=127.0.0.1 user=postgres dbname=postgres" 9187 orders invoices
//   curl -s http://127.0.0.1:9187/metrics
//
// ADDRESS is an IPv4 address, 127.0.0.1 unless given; PORT 0 takes a free
// port. Lines on stdout, for a person or a script:
//   METRICS http://127.0.0.1:9187/metrics    (connected and listening; serving)
//   HOLD orders                              (this instance delivers the channel now)
//   ERROR <what>                             (on_error)
// SIGINT/SIGTERM release the channels first (handle_signals), then end it.
#include "pgiplock.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace std::chrono_literals;
using pgiplock::event_loop;
using pgiplock::task;

void say(const char* word, std::string_view details) {
  std::printf("%s %.*s\n", word, static_cast<int>(details.size()), details.data());
  std::fflush(stdout);
}

// Closes the accepted socket whichever way its coroutine ends.
struct socket_guard {
  int fd;
  explicit socket_guard(int f) : fd(f) {}
  socket_guard(const socket_guard&) = delete;
  socket_guard& operator=(const socket_guard&) = delete;
  ~socket_guard() { ::close(fd); }
};

std::string http_response(std::string_view status, std::string_view content_type, const std::string& body,
                          bool head) {
  std::string r = "HTTP/1.1 " + std::string(status) + "\r\nContent-Type: " + std::string(content_type) +
                  "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
  if (!head) r += body;
  return r;
}

// The response to one request line ("GET /metrics HTTP/1.1").
std::string respond(std::string_view line, const pgiplock::pubsub& ps) {
  auto sp1 = line.find(' ');
  auto sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) return http_response("400 Bad Request", "text/plain", "bad request\n", false);
  auto method = line.substr(0, sp1);
  auto target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));  // a scraper may add parameters; they change nothing here
  bool head = method == "HEAD";
  if (method != "GET" && !head) {
    return "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
  }
  if (target != "/metrics") return http_response("404 Not Found", "text/plain", "not found; try /metrics\n", head);
  return http_response("200 OK", "text/plain; version=0.0.4; charset=utf-8", pgiplock::prometheus_text(ps.stats()),
                       head);
}

// One connection: the request up to the blank line that ends its headers
// (closing with unread input would reset the connection under the client's
// feet, before it reads the answer), the answer, close. 5 s for all of it.
task<void> answer(event_loop& loop, int fd, const pgiplock::pubsub& ps) {
  socket_guard guard(fd);
  auto deadline = event_loop::clock::now() + 5s;
  std::string request;
  while (request.find("\r\n\r\n") == std::string::npos && request.find("\n\n") == std::string::npos) {
    if (request.size() > 16384) co_return;  // not a scraper
    auto ready = co_await loop.poll(fd, POLLIN, deadline);
    if (!ready) co_return;  // the deadline passed
    char buf[4096];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) co_return;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      co_return;
    }
    request.append(buf, static_cast<std::size_t>(n));
  }
  auto eol = request.find('\n');
  std::string_view line(request.data(), eol);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  std::string response = respond(line, ps);
  std::size_t sent = 0;
  while (sent < response.size()) {
    ssize_t n = ::send(fd, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR) co_return;
    auto ready = co_await loop.poll(fd, POLLOUT, deadline);
    if (!ready) co_return;
  }
  ::shutdown(fd, SHUT_WR);
}

// Accepts for ever; each connection is answered by a coroutine of its own.
task<void> serve(event_loop& loop, int listener, const pgiplock::pubsub& ps) {
  for (;;) {
    co_await loop.poll(listener, POLLIN);
    for (;;) {
      int fd = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) {
        loop.spawn(answer(loop, fd, ps));
        continue;
      }
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        co_await loop.sleep(100ms);  // out of descriptors: polling again at once would spin
      }
      break;  // EAGAIN: all taken; ECONNABORTED and the like: that client is gone
    }
  }
}

// A listening TCP socket on address:port; -1 with the reason on stderr.
int open_listener(const std::string& address, int port, int& bound_port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);  // a restart need not wait out TIME_WAIT
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::inet_pton(AF_INET, address.c_str(), &a.sin_addr) != 1) {
    std::fprintf(stderr, "not an IPv4 address: %s\n", address.c_str());
    ::close(fd);
    return -1;
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 64) != 0) {
    std::fprintf(stderr, "cannot listen on %s:%d: %s\n", address.c_str(), port, std::strerror(errno));
    ::close(fd);
    return -1;
  }
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  bound_port = ntohs(a.sin_port);
  return fd;
}

task<void> start(pgiplock::pubsub& ps, std::vector<std::string> channels) {
  co_await ps.connect();
  co_await ps.listen(std::move(channels));  // one claim for all of them
}

}  // namespace

int main(int argc, char** argv) {
  std::string address = "127.0.0.1";
  int arg = 1;
  if (arg < argc && std::string_view(argv[arg]).starts_with("--bind=")) address = argv[arg++] + 7;
  if (argc - arg < 3) {
    std::fprintf(stderr, "usage: %s [--bind=ADDRESS] DSN PORT CHANNEL...\n", argv[0]);
    return 2;
  }
  std::string dsn = argv[arg];
  char* end = nullptr;
  long port = std::strtol(argv[arg + 1], &end, 10);
  if (*end != '\0' || port < 0 || port > 65535) {
    std::fprintf(stderr, "not a port: %s\n", argv[arg + 1]);
    return 2;
  }
  std::vector<std::string> channels(argv + arg + 2, argv + argc);

  int bound_port = 0;
  int listener = open_listener(address, static_cast<int>(port), bound_port);
  if (listener < 0) return 1;

  event_loop loop;
  pgiplock::pubsub_options o;
  o.conninfo = dsn;
  o.handle_signals = true;  // SIGINT/SIGTERM: release the channels, then exit by the signal
  pgiplock::pubsub ps(loop, o);
  ps.on_listen([](std::string_view ch) { say("HOLD", ch); });
  ps.on_error([](const std::exception& e) { say("ERROR", e.what()); });

  try {
    loop.run(start(ps, channels));
  } catch (const std::exception& e) {
    say("ERROR", e.what());
    return 1;
  }
  loop.spawn(serve(loop, listener, ps));
  say("METRICS", "http://" + address + ":" + std::to_string(bound_port) + "/metrics");
  loop.run();  // until a signal ends the process
  return 0;
}
