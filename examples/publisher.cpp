// publisher: sends numbered messages on a channel at a steady rate.
//
// The payload of message n is the decimal number n (1, 2, 3, ...), so a
// consumer can tell exactly which messages it missed or saw twice.
//
//   publisher [--rate=PER_SECOND] [--count=N] DSN CHANNEL
//   publisher --rate=50 --count=500 "host=127.0.0.1 user=postgres dbname=postgres" orders
//
// Output, one line per message once its transaction has committed, then a
// summary ("<WORD> <milliseconds since the epoch> <details>"):
//   SENT 1718000000020 1
//   DONE 1718000010000 sent=500
#include "pgiplock.hpp"

#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>

namespace {

long long now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

// Message n goes out at start + n/rate: a slow commit does not shift the
// schedule of the messages after it.
pgiplock::task<void> publish(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::string channel, long rate,
                             long count) {
  co_await ps.connect();
  auto period = std::chrono::nanoseconds(1'000'000'000 / rate);
  auto start = pgiplock::event_loop::clock::now();
  for (long n = 1; n <= count; ++n) {
    co_await loop.sleep_until(start + period * (n - 1));
    std::string payload = std::to_string(n);
    co_await ps.notify(channel, payload);
    std::printf("SENT %lld %ld\n", now_ms(), n);
    std::fflush(stdout);
  }
  std::printf("DONE %lld sent=%ld\n", now_ms(), count);
  std::fflush(stdout);
  co_await ps.close();
}

long flag(std::string_view arg, std::string_view name, long fallback) {
  return arg.starts_with(name) ? std::strtol(arg.data() + name.size(), nullptr, 10) : fallback;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  long rate = 10, count = 100;
  int arg = 1;
  for (; arg < argc && std::string_view(argv[arg]).starts_with("--"); ++arg) {
    rate = flag(argv[arg], "--rate=", rate);
    count = flag(argv[arg], "--count=", count);
  }
  if (argc - arg != 2 || rate <= 0 || rate > 1'000'000 || count < 0) {
    std::fprintf(stderr, "usage: %s [--rate=PER_SECOND] [--count=N] DSN CHANNEL\n", argv[0]);
    return 2;
  }
  pgiplock::event_loop loop;
  pgiplock::pubsub_options o;
  o.conninfo = argv[arg];
  pgiplock::pubsub ps(loop, o);
  try {
    loop.run(publish(loop, ps, argv[arg + 1], rate, count));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "publisher: %s\n", e.what());
    return 1;
  }
  return 0;
}
