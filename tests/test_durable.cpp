// Durable channels (DESIGN.md section 8, docs/durable.md): the journal, the
// cursor and its fence, order under out-of-order commits, payload sizes and
// bytes, the outbox function, retention. Against the real server.
#include "support.hpp"

extern const bool test_needs_database = true;

namespace {

using namespace test;
using pgiplock::delivery;
using pgiplock::pubsub;

pgiplock::pubsub_options durable_opts() {
  auto o = pubsub_opts();
  o.durable = true;
  if (std::getenv("DEBUG_LOG")) o.logger = [](pgiplock::log_level, std::string_view m) { std::fprintf(stderr, "%.*s\n", (int)m.size(), m.data()); };
  return o;
}

struct seen {
  std::vector<std::int64_t> ids;
  std::vector<std::string> payloads;
};

task<void> basic_flow(event_loop& loop, seen& out, std::string ch) {
  pubsub pub(loop, durable_opts()), sub(loop, durable_opts());
  co_await pub.connect();
  // Published before anyone listens: kept in the journal, replayed at the first tenure.
  co_await pub.notify(ch, "before");
  co_await sub.connect();
  sub.on_delivery([&](const delivery& d) {
    if (d.channel != ch) return;
    out.ids.push_back(d.id);
    out.payloads.emplace_back(d.payload);
  });
  co_await sub.listen(ch);
  bool first = co_await wait_until(loop, [&] { return out.ids.size() == 1; }, 5s);
  REQUIRE(first);
  for (int i = 0; i < 100; ++i) co_await pub.notify(ch, "m" + std::to_string(i));
  co_await pub.notify(ch, std::string(20000, 'x'));
  bool all = co_await wait_until(loop, [&] { return out.ids.size() == 102; }, 5s);
  CHECK(all);
  co_await sub.close();
  co_await pub.close();
}

}  // namespace

TEST_CASE("durable: replayed from the journal, then live, in id order, large payloads read back", "[durable]") {
  event_loop loop;
  seen out;
  loop.run(basic_flow(loop, out, fresh_channel("durable_basic")));
  REQUIRE(out.ids.size() == 102);
  for (std::size_t i = 0; i < out.ids.size(); ++i) CHECK(out.ids[i] == static_cast<std::int64_t>(i + 1));
  CHECK(out.payloads[0] == "before");
  CHECK(out.payloads[1] == "m0");
  CHECK(out.payloads[101] == std::string(20000, 'x'));
}
