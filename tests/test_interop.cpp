// One lock group of Node (@imqueue/pg-pubsub 1.10.0) and C++ processes on one
// database. Run through interop/run.sh, which installs the Node package.
#include "child_process.hpp"

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::ip_lock;

namespace {

std::unique_ptr<child_process> node_lock(const std::string& channel, const std::string& schema = {}) {
  std::vector<std::string> env;
  if (!schema.empty()) env.push_back("PG_PUBSUB_SCHEMA_NAME=" + schema);
  return std::make_unique<child_process>(
      std::vector<std::string>{"node", env_or("PGIPLOCK_NODE_PEER"), "lock", dsn(), channel, "30000", "auto"}, env);
}

struct node_holds_result {
  bool node_acquired = false, cpp_first = true, cpp_after = false;
  double ms = 0;
  std::string transcript;
};
task<node_holds_result> node_holds(event_loop& loop, std::string schema) {
  node_holds_result out;
  std::string ch = fresh_channel("node_holds");
  auto node = node_lock(ch, schema);
  auto ready = co_await node->expect(loop, "ready", 20s);
  INFO(node->transcript());
  REQUIRE(ready);
  auto c = co_await open(loop);
  ip_lock lock(ch, lock_opts(c));
  co_await lock.init();
  node->send("acquire");
  auto acquired = co_await node->expect(loop, "acquired", 5s);
  out.node_acquired = acquired.has_value();
  out.cpp_first = co_await lock.acquire();
  auto t0 = clock::now();
  node->send("release");
  co_await wait_until(loop, [&] { return lock.is_acquired(); }, 2s);
  out.ms = ms_since(t0);
  out.cpp_after = lock.is_acquired();
  node->send("exit");
  co_await node->expect(loop, "bye", 5s);
  out.transcript = node->transcript();
  co_await lock.destroy();
  co_await c->close();
  co_return out;
}

struct cpp_holds_result {
  bool cpp_acquired = false, node_first = true, node_after = false;
  double ms = 0;
  std::string transcript;
};
task<cpp_holds_result> cpp_holds(event_loop& loop, std::string schema, bool cpp_bootstraps_first) {
  cpp_holds_result out;
  std::string ch = fresh_channel("cpp_holds");
  auto c = co_await open(loop);
  ip_lock lock(ch, lock_opts(c));
  std::unique_ptr<child_process> node;
  if (cpp_bootstraps_first) {
    co_await lock.init();
    node = node_lock(ch, schema);
  } else {
    node = node_lock(ch, schema);
  }
  auto ready = co_await node->expect(loop, "ready", 20s);
  INFO(node->transcript());
  REQUIRE(ready);
  if (!cpp_bootstraps_first) co_await lock.init();
  out.cpp_acquired = co_await lock.acquire();
  node->send("acquire");
  auto answer = co_await node->expect(loop, "", 5s);  // acquired / not-acquired
  out.node_first = answer && *answer == "acquired";
  auto t0 = clock::now();
  co_await lock.release();
  auto became = co_await node->expect(loop, "became-holder", 2s);
  out.node_after = became.has_value();
  out.ms = ms_since(t0);
  node->send("exit");
  co_await node->expect(loop, "bye", 5s);
  out.transcript = node->transcript();
  co_await lock.destroy();
  co_await c->close();
  co_return out;
}

}  // namespace

TEST_CASE("Node holds, C++ stands by, and holds within 100 ms of Node's release", "[interop]") {
  event_loop loop;
  auto r = loop.run(node_holds(loop, ""));
  INFO(r.transcript);
  CHECK(r.node_acquired);
  CHECK_FALSE(r.cpp_first);
  CHECK(r.cpp_after);
  INFO("C++ held " << r.ms << " ms after asking Node to release");
  CHECK(r.ms < 100);
}

TEST_CASE("C++ holds, Node stands by, and holds within 100 ms of C++'s release", "[interop]") {
  event_loop loop;
  auto r = loop.run(cpp_holds(loop, "", true));
  INFO(r.transcript);
  CHECK(r.cpp_acquired);
  CHECK_FALSE(r.node_first);
  CHECK(r.node_after);
  INFO("Node held " << r.ms << " ms after the C++ release");
  CHECK(r.ms < 100);
}

TEST_CASE("Node bootstraps the schema first, C++ joins", "[interop][bootstrap]") {
  schema_guard schema("node_first");  // our side reads its name where Node does
  event_loop loop;
  auto r = loop.run(node_holds(loop, schema.name()));
  INFO(r.transcript);
  CHECK(r.node_acquired);
  CHECK_FALSE(r.cpp_first);
  CHECK(r.cpp_after);
}

TEST_CASE("C++ bootstraps the schema first, Node joins", "[interop][bootstrap]") {
  schema_guard schema("cpp_first");
  event_loop loop;
  auto r = loop.run(cpp_holds(loop, schema.name(), true));
  INFO(r.transcript);
  CHECK(r.cpp_acquired);
  CHECK_FALSE(r.node_first);
  CHECK(r.node_after);
}
