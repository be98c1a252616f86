// connect() through a real PgBouncer in front of the test server: a
// transaction pool (where LISTEN silently hears nothing) is refused with a
// message naming it; a session pool works, locks and all.
#include "child_process.hpp"
#include "system.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::connection;

namespace {

// A field of the test server's DSN, or `fallback` where it gives none.
std::string server_field(const std::string& key, std::string fallback) {
  return conninfo_field(dsn(), key).value_or(std::move(fallback));
}

// A port nobody listens on right now (the kernel picks it).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(fd);
  return port;
}

bool accepts(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// One PgBouncer on a free port with two databases: "tx" pools by
// transaction, "sess" by session, both onto the test server. Stopped
// (SIGKILL) and its directory removed when the object goes.
class bouncer {
 public:
  bouncer() {
    char dir_template[] = "/tmp/pgiplock-pgbouncer-XXXXXX";
    REQUIRE(::mkdtemp(dir_template) != nullptr);
    dir_ = dir_template;
    port_ = free_port();
    REQUIRE(port_ > 0);
    std::string target = "host=" + server_field("host", "127.0.0.1") + " port=" + server_field("port", "5432") +
                         " dbname=" + server_field("dbname", "postgres") + " user=" + server_field("user", "postgres");
    std::ofstream ini(dir_ + "/pgbouncer.ini");
    ini << "[databases]\n"
        << "tx = " << target << " pool_mode=transaction\n"
        << "sess = " << target << " pool_mode=session\n"
        << "[pgbouncer]\n"
        << "listen_addr = 127.0.0.1\nlisten_port = " << port_ << "\nunix_socket_dir =\n"
        << "auth_type = any\npool_mode = transaction\n"
        << "logfile = " << dir_ << "/pgbouncer.log\n";
    ini.close();
    // -q: its log goes to the file only, not to our stdout.
    std::vector<std::string> argv{find_tool("pgbouncer"), "-q", dir_ + "/pgbouncer.ini"};
    if (::geteuid() == 0) {
      ::chmod(dir_.c_str(), 0777);  // its log file goes here
      // setpriv execs in place (runuser would fork, and our SIGKILL at the
      // end would leave PgBouncer running).
      argv.insert(argv.begin(), {find_tool("setpriv"), "--reuid=postgres", "--regid=postgres", "--init-groups"});
    }
    process_ = std::make_unique<child_process>(argv);
  }
  ~bouncer() {
    process_.reset();
    run_command("rm -rf " + shell_quote(dir_));
  }
  bouncer(const bouncer&) = delete;
  bouncer& operator=(const bouncer&) = delete;

  std::string conninfo(const std::string& db) const {
    return "host=127.0.0.1 port=" + std::to_string(port_) + " dbname=" + db + " user=" +
           server_field("user", "postgres");
  }
  int port() const { return port_; }
  std::string log() const { return read_file(dir_ + "/pgbouncer.log"); }

 private:
  std::string dir_;
  int port_ = 0;
  std::unique_ptr<child_process> process_;
};

task<bool> up(event_loop& loop, const bouncer& b) {
  co_return co_await wait_until(loop, [&] { return accepts(b.port()); }, 10s);
}

struct session_result {
  bool pid_is_servers = false, acquired = false, heard = false;
};
// Through a session pool: backend_pid() is the server's (PgBouncer hands
// out its own keys), a lock is acquired and a LISTEN hears a NOTIFY sent
// from a direct connection.
task<session_result> through_session_pool(event_loop& loop, std::string conninfo) {
  session_result out;
  auto c = co_await open(loop, conninfo);
  auto direct = co_await open(loop);
  auto pid = co_await c->query("SELECT pg_backend_pid()");
  out.pid_is_servers = std::string(pid.get(0, 0)) == std::to_string(c->backend_pid());
  std::string ch = fresh_channel("bouncer");
  pgiplock::ip_lock lock(ch, lock_opts(c));
  co_await lock.init();
  out.acquired = co_await lock.acquire();
  bool heard = false;
  (void)c->subscribe(ch, [&](const pgiplock::notification&) { heard = true; });
  co_await c->query("LISTEN " + c->quote_identifier(ch));
  co_await direct->query("SELECT pg_notify($1, 'hello')", ch);
  out.heard = co_await wait_until(loop, [&] { return heard; }, 2s);
  co_await lock.destroy();
  co_await c->close();
  co_await direct->close();
  co_return out;
}

task<bool> connects_without_probe(event_loop& loop, std::string conninfo) {
  pgiplock::connect_options o;
  o.notify_probe_timeout = 0ms;
  auto c = co_await connection::connect(loop, conninfo, o);
  co_await c->close();
  co_return true;
}

}  // namespace

std::string test_skip_reason() {
  if (find_tool("pgbouncer").empty()) {
    return "pgbouncer is not installed (a test-only tool; tools/check installs it when root)";
  }
  // PgBouncer refuses to run as root: then it runs as the postgres user.
  if (::geteuid() == 0 && (find_tool("setpriv").empty() || !::getpwnam("postgres"))) {
    return "pgbouncer refuses to run as root and there is no postgres user to run it as";
  }
  return {};
}

TEST_CASE("a transaction-pooling PgBouncer is refused at connect, naming it", "[pgbouncer]") {
  bouncer b;
  event_loop loop;
  bool started = loop.run(up(loop, b));
  INFO(b.log());
  REQUIRE(started);
  auto r = loop.run(try_connect(loop, b.conninfo("tx")));
  INFO(r.message);
  CHECK(r.connection_error);
  CHECK_THAT(r.message, Catch::Contains("LISTEN/NOTIFY does not work") &&
                            Catch::Contains("transaction-pooling PgBouncer") && Catch::Contains("pool_mode"));
  // A quiet pool reuses one backend, so the self-notification passes and
  // the second connection decides: no 2 s timeout.
  CHECK(r.ms < 1000);
  // The opt-out, for connections that never LISTEN.
  CHECK(loop.run(connects_without_probe(loop, b.conninfo("tx"))));
}

TEST_CASE("a session-pooling PgBouncer works: the server's pid, a lock, a LISTEN", "[pgbouncer]") {
  bouncer b;
  event_loop loop;
  bool started = loop.run(up(loop, b));
  INFO(b.log());
  REQUIRE(started);
  auto r = loop.run(through_session_pool(loop, b.conninfo("sess")));
  CHECK(r.pid_is_servers);
  CHECK(r.acquired);
  CHECK(r.heard);
}
