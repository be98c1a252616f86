// connection against a real PostgreSQL: connecting and its failures,
// pipelined queries, notifications in flight, a terminated backend, leaks.
#include "support.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <thread>

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::connection;
using pgiplock::connection_error;

namespace {

// A local TCP socket that never answers like PostgreSQL would:
// `mode` silent: accepted by the kernel, nothing is ever said;
// `mode` full: the accept queue is full, so a new SYN is dropped, as with an
// unreachable host; `mode` http: answers like a web server and closes.
struct fake_server {
  int fd = -1, filler = -1, port = 0;
  std::thread thread;
  explicit fake_server(const std::string& mode) {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
    REQUIRE(::listen(fd, 0) == 0);
    if (mode == "full") {
      filler = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      REQUIRE(::connect(filler, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    } else if (mode == "http") {
      thread = std::thread([this] {
        int c = ::accept(fd, nullptr, nullptr);
        if (c < 0) return;
        const char reply[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        (void)!::write(c, reply, sizeof reply - 1);
        ::close(c);
      });
    }
  }
  ~fake_server() {
    ::shutdown(fd, SHUT_RDWR);
    if (thread.joinable()) thread.join();
    if (filler >= 0) ::close(filler);
    ::close(fd);
  }
  std::string conninfo(int timeout_s) const {
    return "host=127.0.0.1 port=" + std::to_string(port) + " user=postgres dbname=postgres connect_timeout=" +
           std::to_string(timeout_s);
  }
};

// 8-4-4-4-12 lowercase hex, version 4, RFC 4122 variant. (Not std::regex:
// GCC 12's <regex> trips -Wmaybe-uninitialized under the sanitizers.)
bool is_uuid_v4(const std::string& s) {
  if (s.size() != 36) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash != (s[i] == '-')) return false;
    if (!dash && !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
    if (!dash && std::isupper(static_cast<unsigned char>(s[i]))) return false;
  }
  return s[14] == '4' && std::string("89ab").find(s[19]) != std::string::npos;
}

task<void> ensure_password_role(event_loop& loop) {
  auto c = co_await open(loop);
  co_await c->query(
      "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgiplock_pw') THEN "
      "CREATE ROLE pgiplock_pw LOGIN PASSWORD 'right-password'; END IF; END $$");
  co_await c->close();
}

task<void> one_query(conn_ptr c, int i, std::vector<int>& done, int& wrong) {
  auto r = co_await c->query("SELECT $1::int", i);
  if (std::stoi(std::string(r.get(0, 0))) != i) ++wrong;
  done.push_back(i);
}

task<void> ten_thousand(event_loop& loop, std::vector<int>& done, int& wrong) {
  auto c = co_await open(loop);
  for (int i = 0; i < 10000; ++i) loop.spawn(one_query(c, i, done, wrong));
  co_await wait_until(loop, [&] { return done.size() == 10000; }, 60s);
  co_await c->close();
}

struct outcome {
  std::string value, error, sqlstate;
};
task<void> record(conn_ptr c, std::string sql, outcome& out, int& finished) {
  try {
    auto r = co_await c->query(std::move(sql));
    out.value = std::string(r.get(0, 0));
  } catch (const pgiplock::sql_error& e) {
    out.error = e.what();
    out.sqlstate = e.sqlstate();
  } catch (const std::exception& e) {
    out.error = e.what();
  }
  ++finished;
}

task<void> one_fails(event_loop& loop, std::vector<outcome>& outs) {
  auto c = co_await open(loop);
  int finished = 0;
  loop.spawn(record(c, "SELECT 'before'", outs[0], finished));
  loop.spawn(record(c, "SELECT (1/0)::text", outs[1], finished));
  loop.spawn(record(c, "SELECT 'after'", outs[2], finished));
  co_await wait_until(loop, [&] { return finished == 3; }, 10s);
  co_await c->close();
}

task<int> notify_during_pipeline(event_loop& loop) {
  auto listener = co_await open(loop);
  auto sender = co_await open(loop);
  int received = 0;
  std::string payload;
  (void)listener->subscribe("conn_test_ch", [&](const pgiplock::notification& n) {
    ++received;
    payload = std::string(n.payload);
    CHECK(n.sender_pid == sender->backend_pid());
  });
  co_await listener->query("LISTEN conn_test_ch");
  int finished = 0;
  std::vector<outcome> outs(1000);
  for (int i = 0; i < 1000; ++i) loop.spawn(record(listener, "SELECT pg_sleep(0.0001)::text", outs[static_cast<std::size_t>(i)], finished));
  co_await sender->query("SELECT pg_notify('conn_test_ch', $1)", "in flight");
  co_await wait_until(loop, [&] { return finished == 1000 && received > 0; }, 30s);
  // Anything the server sent before this round trip's answer has arrived.
  co_await listener->query("SELECT 1");
  CHECK(payload == "in flight");
  co_await listener->close();
  co_await sender->close();
  co_return received;
}

struct termination {
  int failed_with_connection_error = 0;
  int other = 0;
  bool lost_seen = false;
  bool open_after = true;
  double ms = 0;
};
task<void> pending_sleep(conn_ptr c, termination& t) {
  try {
    co_await c->query("SELECT pg_sleep(30)");
    ++t.other;
  } catch (const connection_error&) {
    ++t.failed_with_connection_error;
  } catch (...) {
    ++t.other;
  }
}
task<termination> terminated(event_loop& loop) {
  termination t;
  auto victim = co_await open(loop);
  auto admin = co_await open(loop);
  (void)victim->on_lost([&](const connection_error&) { t.lost_seen = true; });
  for (int i = 0; i < 100; ++i) loop.spawn(pending_sleep(victim, t));
  co_await loop.sleep(50ms);  // the first pg_sleep is running
  auto t0 = clock::now();
  co_await admin->query("SELECT pg_terminate_backend($1)", victim->backend_pid());
  co_await wait_until(loop, [&] { return t.failed_with_connection_error + t.other == 100 && t.lost_seen; }, 5s);
  t.ms = ms_since(t0);
  t.open_after = victim->is_open();
  co_await admin->close();
  co_return t;
}

task<void> cycles(event_loop& loop, int n) {
  for (int i = 0; i < n; ++i) {
    auto c = co_await open(loop);
    co_await c->close();
  }
}

task<std::pair<int, std::string>> close_with_pending(event_loop& loop) {
  auto c = co_await open(loop);
  termination t;
  loop.spawn(pending_sleep(c, t));
  loop.spawn(pending_sleep(c, t));
  co_await loop.sleep(20ms);
  auto t0 = clock::now();
  co_await c->close();
  co_await wait_until(loop, [&] { return t.failed_with_connection_error + t.other == 2; }, 5s);
  co_return std::make_pair(t.failed_with_connection_error, std::to_string(ms_since(t0)));
}

struct prepared_result {
  std::string first, second, named;
  std::string bad_first, bad_again;
};
// The same statement twice (the second run uses the statement the first
// prepared: the server lists it), and a statement that cannot be prepared:
// its own error, both times.
task<prepared_result> prepared_statements(event_loop& loop) {
  prepared_result out;
  auto c = co_await open(loop);
  auto a = co_await c->query_prepared("SELECT $1::integer + 1", 41);
  out.first = std::string(a.get(0, 0));
  auto b = co_await c->query_prepared("SELECT $1::integer + 1", 1);
  out.second = std::string(b.get(0, 0));
  auto names = co_await c->query("SELECT string_agg(statement, ';') FROM pg_prepared_statements");
  out.named = std::string(names.get(0, 0));
  for (std::string* into : {&out.bad_first, &out.bad_again}) {
    try {
      co_await c->query_prepared("SELEC $1::integer", 1);
    } catch (const pgiplock::sql_error& e) {
      *into = e.what();
    }
  }
  co_await c->close();
  co_return out;
}

}  // namespace

TEST_CASE("connects, with a unique application_name the server sees", "[connection]") {
  event_loop loop;
  auto [name, pid, server_name, server_pid] = loop.run([](event_loop& l) -> task<std::tuple<std::string, int, std::string, std::string>> {
    auto c = co_await open(l);
    auto n = co_await scalar(c, "SELECT current_setting('application_name')");
    auto p = co_await scalar(c, "SELECT pg_backend_pid()::text");
    std::tuple<std::string, int, std::string, std::string> out{std::string(c->app_name()), c->backend_pid(), n, p};
    co_await c->close();
    co_return out;
  }(loop));
  REQUIRE(name.rfind("pgiplock-", 0) == 0);
  CHECK(is_uuid_v4(name.substr(9)));
  CHECK(server_name == name);
  CHECK(server_pid == std::to_string(pid));
}

TEST_CASE("connect failures name their cause within the deadline", "[connection]") {
  event_loop loop;
  loop.run(ensure_password_role(loop));
  std::string base = dsn();

  SECTION("wrong password") {
    auto f = loop.run(try_connect(loop, base + " user=pgiplock_pw password=wrong"));
    CHECK_THAT(f.message, Catch::Contains("password authentication failed"));
  }
  SECTION("right password works") {
    auto f = loop.run(try_connect(loop, base + " user=pgiplock_pw password=right-password"));
    CHECK(f.message == "(connected)");
  }
  SECTION("unknown database") {
    auto f = loop.run(try_connect(loop, base + " dbname=pgiplock_no_such_db"));
    CHECK_THAT(f.message, Catch::Contains("pgiplock_no_such_db") && Catch::Contains("does not exist"));
  }
  SECTION("closed port") {
    fake_server s("silent");  // bound, then closed: nothing listens on the port
    std::string ci = s.conninfo(2);
    ::close(s.fd);
    s.fd = ::socket(AF_INET, SOCK_STREAM, 0);
    auto f = loop.run(try_connect(loop, ci));
    CHECK_THAT(f.message, Catch::Contains("Connection refused"));
    CHECK(f.ms < 2000);
  }
  SECTION("unreachable address (SYNs dropped)") {
    fake_server s("full");
    auto f = loop.run(try_connect(loop, s.conninfo(2)));
    CHECK_THAT(f.message, Catch::Contains("no answer within 2000 ms"));
    CHECK(f.ms >= 1900);
    CHECK(f.ms < 3500);
  }
  SECTION("a server that accepts and never answers") {
    fake_server s("silent");
    auto f = loop.run(try_connect(loop, s.conninfo(2)));
    CHECK_THAT(f.message, Catch::Contains("no answer within 2000 ms"));
    CHECK(f.ms < 3500);
  }
  SECTION("a server that is not PostgreSQL") {
    fake_server s("http");
    auto f = loop.run(try_connect(loop, s.conninfo(5) + " sslmode=disable"));
    CHECK_THAT(f.message, Catch::Contains("cannot connect to host=127.0.0.1"));
    CHECK(f.ms < 2000);
  }
  SECTION("a conninfo libpq cannot parse") {
    auto f = loop.run(try_connect(loop, "host=localhost bogus_option=1"));
    CHECK(f.invalid_argument);
    CHECK_THAT(f.message, Catch::Contains("bogus_option"));
  }
  SECTION("an empty conninfo") {
    auto f = loop.run(try_connect(loop, "  "));
    CHECK(f.invalid_argument);
    CHECK_THAT(f.message, Catch::Contains("empty"));
  }
}

TEST_CASE("10,000 queries in flight on one connection complete in order", "[connection]") {
  event_loop loop;
  std::vector<int> done;
  int wrong = 0;
  loop.run(ten_thousand(loop, done, wrong));
  REQUIRE(done.size() == 10000);
  CHECK(wrong == 0);
  CHECK(std::is_sorted(done.begin(), done.end()));
}

TEST_CASE("a failing query fails only itself", "[connection]") {
  event_loop loop;
  std::vector<outcome> outs(3);
  loop.run(one_fails(loop, outs));
  CHECK(outs[0].value == "before");
  CHECK(outs[1].sqlstate == "22012");
  CHECK_THAT(outs[1].error, Catch::Contains("division by zero"));
  CHECK(outs[2].value == "after");
}

TEST_CASE("a notification sent while 1,000 queries are in flight arrives exactly once", "[connection]") {
  event_loop loop;
  CHECK(loop.run(notify_during_pipeline(loop)) == 1);
}

TEST_CASE("pg_terminate_backend fails every pending query and the stream within 1 s", "[connection]") {
  event_loop loop;
  auto t = loop.run(terminated(loop));
  CHECK(t.failed_with_connection_error == 100);
  CHECK(t.other == 0);
  CHECK(t.lost_seen);
  CHECK_FALSE(t.open_after);
  CHECK(t.ms < 1000);
}

TEST_CASE("close() with queries pending fails them with connection_error", "[connection]") {
  event_loop loop;
  auto [n, ms] = loop.run(close_with_pending(loop));
  CHECK(n == 2);
  INFO("close took " << ms << " ms");
  CHECK(std::stod(ms) < 1000);
}

TEST_CASE("1,000 connect/close cycles leak no file descriptors", "[connection][leak]") {
  event_loop loop;
  loop.run(cycles(loop, 10));  // warm-up: libpq and the loop allocate once
  int before = open_fd_count();
  long rss_before = rss_kib();
  loop.run(cycles(loop, 1000));
  CHECK(open_fd_count() == before);
  INFO("RSS before " << rss_before << " KiB, after " << rss_kib() << " KiB");
  if (rss_is_meaningful) CHECK(rss_kib() - rss_before < 4096);
}

TEST_CASE("query_prepared: prepared once per connection, a bad statement fails with its own error", "[connection]") {
  event_loop loop;
  auto r = loop.run(prepared_statements(loop));
  CHECK(r.first == "42");
  CHECK(r.second == "2");
  CHECK(r.named == "SELECT $1::integer + 1");
  CHECK_THAT(r.bad_first, Catch::Contains("syntax error"));
  CHECK_THAT(r.bad_again, Catch::Contains("syntax error"));
}

namespace {

// PGIPLOCK_DSN with a host listed before its own: `host=127.0.0.1,H
// port=P,PORT` and the rest of its keywords, plus `extra`.
std::string behind(int port_first, const std::string& extra) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(dsn().c_str(), &err);
  if (!opts) throw std::runtime_error("PGIPLOCK_DSN does not parse: " + std::string(err ? err : ""));
  std::string host, port = "5432", rest;
  for (PQconninfoOption* o = opts; o->keyword; ++o) {
    if (!o->val) continue;
    std::string k = o->keyword;
    if (k == "host") host = o->val;
    else if (k == "port") port = o->val;
    else if (k != "hostaddr") rest += " " + k + "='" + o->val + "'";
  }
  PQconninfoFree(opts);
  return "host=127.0.0.1," + host + " port=" + std::to_string(port_first) + "," + port + rest + " " + extra;
}

struct reach {
  std::string outcome;  // "connected", or what connect() threw
  bool invalid_argument = false;
  double ms = 0;
};

task<reach> try_connect(event_loop& loop, std::string conninfo, std::chrono::milliseconds timeout) {
  reach r;
  auto t0 = clock::now();
  try {
    pgiplock::connect_options o;
    o.timeout = timeout;
    auto c = co_await pgiplock::connection::connect(loop, conninfo, o);
    r.outcome = co_await scalar(c, "SELECT 'connected'");
    co_await c->close();
  } catch (const std::invalid_argument& e) {
    r.outcome = e.what();
    r.invalid_argument = true;
  } catch (const std::exception& e) {
    r.outcome = e.what();
  }
  r.ms = ms_since(t0);
  co_return r;
}

}  // namespace

TEST_CASE("several hosts: one that never answers, listed first, gets its share of the deadline and is passed over",
          "[connection][hosts]") {
  event_loop loop;
  silent_listener hung;
  SECTION("connect_timeout in the conninfo: one deadline for the list, shared") {
    auto r = loop.run(try_connect(loop, behind(hung.port, "connect_timeout=2"), 30s));
    INFO(r.outcome << " after " << r.ms << " ms");
    CHECK(r.outcome == "connected");
    CHECK(r.ms >= 900);
    CHECK(r.ms < 2000);
  }
  SECTION("without it, the connect's timeout, shared") {
    auto r = loop.run(try_connect(loop, behind(hung.port, ""), 3s));
    INFO(r.outcome << " after " << r.ms << " ms");
    CHECK(r.outcome == "connected");
    CHECK(r.ms >= 1400);
    CHECK(r.ms < 3000);
  }
  SECTION("every host silent: the error names each and why, within the timeout") {
    silent_listener hung2;
    auto conninfo = "host=127.0.0.1,127.0.0.1 port=" + std::to_string(hung.port) + "," + std::to_string(hung2.port) +
                    " dbname=x user=y";
    auto r = loop.run(try_connect(loop, conninfo, 2s));
    INFO(r.outcome << " after " << r.ms << " ms");
    // Each host had its share of the 2 s: about 1000 ms each.
    CHECK(r.outcome.find("127.0.0.1:" + std::to_string(hung.port) + ": no answer within ") != std::string::npos);
    CHECK(r.outcome.find("127.0.0.1:" + std::to_string(hung2.port) + ": no answer within ") != std::string::npos);
    CHECK(r.ms < 2000 + 500);
  }
}

TEST_CASE("several hosts and a port list of another length: std::invalid_argument names both counts, at once",
          "[connection][hosts]") {
  event_loop loop;
  auto r = loop.run(try_connect(loop, "host=127.0.0.1,127.0.0.1,127.0.0.1 port=1,2 dbname=x", 5s));
  INFO(r.outcome);
  CHECK(r.invalid_argument);
  CHECK(r.outcome.find("3 hosts and 2 port values") != std::string::npos);
  CHECK(r.ms < 100);
  // One port for every host is libpq's shorthand, not an error.
  auto one_port = behind(0, "");
  one_port.replace(one_port.find("port=0,"), 7, "port=");
  auto r1 = loop.run(try_connect(loop, one_port, 5s));
  INFO(one_port << ": " << r1.outcome);
  CHECK_FALSE(r1.invalid_argument);
}
