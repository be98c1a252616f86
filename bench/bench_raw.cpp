// bench_raw - the baselines, written against plain libpq the way its manual
// shows (blocking connection, poll(2) on the socket):
//
//   bench_raw listen  DSN CH COUNT        LISTEN; poll; PQconsumeInput; drain
//                                          PQnotifies; PQfreemem. The floor.
//   bench_raw publish DSN CH COUNT BATCH TAG
//                                          SELECT pg_notify(...) FROM
//                                          generate_series(...), BATCH rows per
//                                          transaction, 64-byte payloads
//   bench_raw naive   DSN CH COUNT        one SELECT pg_notify per transaction,
//                                          awaited one at a time; a second
//                                          connection counts deliveries
//   bench_raw ticker  DSN CH              pg_notify(CH, seq) every ms until
//                                          stdin closes
//   bench_raw crashfloor DSN              how fast the server frees a SIGKILLed
//                                          session's advisory lock for a waiter
//   bench_raw listenmany DSN PREFIX N     LISTEN PREFIX0 ... PREFIX<N-1> (in
//                                          that order), then for each `drain K`
//                                          line on stdin: drain K notifications
//                                          and report; exits when stdin closes
//   bench_raw sql     DSN STATEMENT       runs one statement; `result <first
//                                          field>` (or `error <message>`)
//   bench_raw journal_size DSN SCHEMA MS  every MS ms, `size <t> <bytes>`: the
//                                          durable journal's partitions on disk
//                                          (pg_total_relation_size), until stdin
//                                          closes
//
// Protocol: see bench/driver.py.
#include "bench_common.hpp"

#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

PGconn* connect_or_die(const char* dsn) {
  PGconn* c = PQconnectdb(dsn);
  if (PQstatus(c) != CONNECTION_OK) bench::die(std::string("connect: ") + PQerrorMessage(c));
  return c;
}

void exec_or_die(PGconn* c, const char* sql) {
  PGresult* r = PQexec(c, sql);
  auto st = PQresultStatus(r);
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) bench::die(std::string(sql) + ": " + PQerrorMessage(c));
  PQclear(r);
}

std::string quoted(PGconn* c, const char* ident) {
  char* q = PQescapeIdentifier(c, ident, std::strlen(ident));
  std::string s = q;
  PQfreemem(q);
  return s;
}

// Waits for the socket, consumes, drains; counts until `count`.
// Returns the number received (less than count only on timeout).
long drain(PGconn* c, long count, int timeout_ms, std::int64_t* t_first = nullptr) {
  long got = 0;
  pollfd p{PQsocket(c), POLLIN, 0};
  while (got < count) {
    int n = ::poll(&p, 1, timeout_ms);
    if (n == 0) break;
    if (n < 0) continue;
    if (!PQconsumeInput(c)) bench::die(std::string("PQconsumeInput: ") + PQerrorMessage(c));
    while (PGnotify* note = PQnotifies(c)) {
      if (got == 0 && t_first) *t_first = bench::now_ns();
      ++got;
      PQfreemem(note);
    }
  }
  return got;
}

int listen(int argc, char** argv) {
  if (argc < 5) bench::die("usage: listen DSN CH COUNT");
  PGconn* c = connect_or_die(argv[2]);
  long count = bench::arg_long(argc, argv, 4, 0);
  exec_or_die(c, ("LISTEN " + quoted(c, argv[3])).c_str());
  bench::say("ready %d", static_cast<int>(::getpid()));
  std::int64_t cpu0 = bench::cpu_us(), t_first = 0;
  long got = drain(c, count, -1, &t_first);
  std::int64_t t_done = bench::now_ns(), cpu1 = bench::cpu_us();
  bench::say("done %ld %lld %lld %lld", got, static_cast<long long>(cpu1 - cpu0), static_cast<long long>(t_done),
             static_cast<long long>(t_first));
  bench::wait_for_driver();
  PQfinish(c);
  return 0;
}

int publish(int argc, char** argv) {
  if (argc < 7) bench::die("usage: publish DSN CH COUNT BATCH TAG");
  PGconn* c = connect_or_die(argv[2]);
  long count = bench::arg_long(argc, argv, 4, 0), batch = bench::arg_long(argc, argv, 5, 10000);
  std::string tag = argv[6];
  std::string pad = std::to_string(62 - tag.size());
  std::string sql = "SELECT count(pg_notify($1, '\"' || $2 || lpad(i::text, " + pad +
                    ", '0') || '\"')) FROM generate_series($3::int, $4::int) AS i";
  std::int64_t t0 = bench::now_ns();
  for (long from = 0; from < count; from += batch) {
    std::string lo = std::to_string(from), hi = std::to_string(std::min(count, from + batch) - 1);
    const char* values[] = {argv[3], tag.c_str(), lo.c_str(), hi.c_str()};
    PGresult* r = PQexecParams(c, sql.c_str(), 4, nullptr, values, nullptr, nullptr, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) bench::die(std::string("publish: ") + PQerrorMessage(c));
    PQclear(r);
  }
  std::int64_t t1 = bench::now_ns();
  bench::say("published %ld %lld %lld", count, static_cast<long long>(t0), static_cast<long long>(t1));
  PQfinish(c);
  return 0;
}

int naive(int argc, char** argv) {
  if (argc < 5) bench::die("usage: naive DSN CH COUNT");
  PGconn* c = connect_or_die(argv[2]);
  PGconn* l = connect_or_die(argv[2]);
  long count = bench::arg_long(argc, argv, 4, 0);
  exec_or_die(l, ("LISTEN " + quoted(l, argv[3])).c_str());
  std::int64_t t0 = bench::now_ns();
  for (long i = 0; i < count; ++i) {
    std::string p = bench::payload("n", i);
    const char* values[] = {argv[3], p.c_str()};
    PGresult* r = PQexecParams(c, "SELECT pg_notify($1, $2)", 2, nullptr, values, nullptr, nullptr, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) bench::die(std::string("notify: ") + PQerrorMessage(c));
    PQclear(r);
  }
  std::int64_t t1 = bench::now_ns();
  long got = drain(l, count, 5000);
  bench::say("sent %ld %lld delivered %ld", count, static_cast<long long>(t1 - t0), got);
  PQfinish(l);
  PQfinish(c);
  return 0;
}

int ticker(int argc, char** argv) {
  if (argc < 4) bench::die("usage: ticker DSN CH");
  PGconn* c = connect_or_die(argv[2]);
  bench::say("ready %d", static_cast<int>(::getpid()));
  pollfd in{0, POLLIN, 0};
  for (long i = 0;; ++i) {
    std::string seq = std::to_string(i);
    const char* values[] = {argv[3], seq.c_str()};
    PGresult* r = PQexecParams(c, "SELECT pg_notify($1, $2)", 2, nullptr, values, nullptr, nullptr, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) bench::die(std::string("ticker: ") + PQerrorMessage(c));
    PQclear(r);
    if (::poll(&in, 1, 1) != 0) break;  // stdin closed or written: stop
  }
  PQfinish(c);
  return 0;
}

// A child takes a session advisory lock and is SIGKILLed; a waiter on a
// second session reports how long the server took to hand the lock over.
// This is the floor any crash takeover over PostgreSQL can reach.
int crashfloor(int argc, char** argv) {
  if (argc < 3) bench::die("usage: crashfloor DSN");
  int ready[2];
  if (::pipe(ready) != 0) bench::die("pipe");
  pid_t child = ::fork();
  if (child == 0) {
    PGconn* h = connect_or_die(argv[2]);
    exec_or_die(h, "SELECT pg_advisory_lock(734211)");
    char x = 'r';
    if (::write(ready[1], &x, 1) != 1) std::_Exit(1);
    for (;;) ::pause();
  }
  char x;
  if (::read(ready[0], &x, 1) != 1) bench::die("holder did not start");
  PGconn* w = connect_or_die(argv[2]);
  if (!PQsendQuery(w, "SELECT pg_advisory_lock(734211)")) bench::die(PQerrorMessage(w));
  ::usleep(30000);  // the waiter is now blocked on the lock server-side
  std::int64_t t0 = bench::now_ns();
  ::kill(child, SIGKILL);
  pollfd p{PQsocket(w), POLLIN, 0};
  std::int64_t t1 = 0;
  for (;;) {
    ::poll(&p, 1, 5000);
    PQconsumeInput(w);
    if (!PQisBusy(w)) {
      t1 = bench::now_ns();
      break;
    }
  }
  while (PGresult* r = PQgetResult(w)) PQclear(r);
  ::waitpid(child, nullptr, 0);
  bench::say("wake %lld", static_cast<long long>(t1 - t0));
  PQfinish(w);
  return 0;
}

// One connection LISTENing to many channels: what PostgreSQL's own listen
// list costs its backend (bench/driver.py listen_scale). The LISTENs go 1,000
// to a statement string (one implicit transaction each); `ready` reports the
// server backend's pid, which the driver stops, resumes and reads the CPU of.
int listenmany(int argc, char** argv) {
  if (argc < 5) bench::die("usage: listenmany DSN PREFIX N");
  PGconn* c = connect_or_die(argv[2]);
  long n = bench::arg_long(argc, argv, 4, 1);
  std::string prefix = argv[3];
  for (long from = 0; from < n; from += 1000) {
    std::string sql;
    for (long i = from; i < std::min(n, from + 1000); ++i)
      sql += "LISTEN " + quoted(c, (prefix + std::to_string(i)).c_str()) + ";";
    exec_or_die(c, sql.c_str());
  }
  bench::say("ready %d %d", static_cast<int>(::getpid()), PQbackendPID(c));
  char line[64];
  while (std::fgets(line, sizeof line, stdin)) {
    long count = 0;
    if (std::sscanf(line, "drain %ld", &count) != 1) continue;
    std::int64_t cpu0 = bench::cpu_us(), t_first = 0;
    long got = drain(c, count, -1, &t_first);
    std::int64_t t_done = bench::now_ns(), cpu1 = bench::cpu_us();
    bench::say("done %ld %lld %lld %lld", got, static_cast<long long>(cpu1 - cpu0), static_cast<long long>(t_done),
               static_cast<long long>(t_first));
  }
  PQfinish(c);
  return 0;
}

// The driver's settings (fsync for the durable rows) and checks. A failure
// is a line, not an exit: the driver decides what it means.
int sql(int argc, char** argv) {
  if (argc < 4) bench::die("usage: sql DSN STATEMENT");
  PGconn* c = connect_or_die(argv[2]);
  PGresult* r = PQexec(c, argv[3]);
  auto st = PQresultStatus(r);
  if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && PQnfields(r) > 0) {
    bench::say("result %s", PQgetvalue(r, 0, 0));
  } else if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
    bench::say("result ");
  } else {
    std::string msg = PQerrorMessage(c);
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    bench::say("error %s", msg.c_str());
  }
  PQclear(r);
  PQfinish(c);
  return 0;
}

// The journal's size: its time-slot partitions with their indexes and TOAST.
int journal_size(int argc, char** argv) {
  if (argc < 5) bench::die("usage: journal_size DSN SCHEMA MS");
  PGconn* c = connect_or_die(argv[2]);
  int ms = static_cast<int>(bench::arg_long(argc, argv, 4, 200));
  const char* sql =
      "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
      "JOIN pg_namespace n ON n.oid = c.relnamespace "
      "WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname ~ '^pgiplock_journal_[0-9]+$'";
  pollfd in{0, POLLIN, 0};
  for (;;) {
    const char* values[] = {argv[3]};
    PGresult* r = PQexecParams(c, sql, 1, nullptr, values, nullptr, nullptr, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) bench::die(std::string("journal_size: ") + PQerrorMessage(c));
    bench::say("size %lld %s", static_cast<long long>(bench::now_ns()), PQgetvalue(r, 0, 0));
    PQclear(r);
    if (::poll(&in, 1, ms) != 0) break;  // stdin closed or written: stop
  }
  PQfinish(c);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "listen") return listen(argc, argv);
  if (cmd == "publish") return publish(argc, argv);
  if (cmd == "naive") return naive(argc, argv);
  if (cmd == "ticker") return ticker(argc, argv);
  if (cmd == "crashfloor") return crashfloor(argc, argv);
  if (cmd == "listenmany") return listenmany(argc, argv);
  if (cmd == "sql") return sql(argc, argv);
  if (cmd == "journal_size") return journal_size(argc, argv);
  bench::die("usage: bench_raw listen|publish|naive|ticker|crashfloor|listenmany|sql|journal_size ...");
}
