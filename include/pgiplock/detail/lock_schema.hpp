// ==== detail: the lock schema on the server ==================================
//
// Creating the schema the locks live in (shared with @imqueue/pg-pubsub) and
// the statements that read and write it, with the schema's quoted name
// spliced in once per lock.
#pragma once

#include "../connection.hpp"

namespace pgiplock::detail {

// The lock statements of one schema (see sql.hpp for why each is written so).
struct lock_statements {
  std::string quoted_schema;
  std::string acquire, holds_row, release_row, release_row_and_unlock, wait_free, listen_and_announce;
  std::string tenure_sequence;  // a value: nextval($n::regclass) takes it
  std::string app_pattern;      // a value: LIKE $n matches our sessions

  static lock_statements for_schema(std::string quoted) {
    lock_statements s;
    s.acquire = sql::in_schema(sql::acquire, quoted);
    s.holds_row = sql::in_schema(sql::holds_row, quoted);
    s.release_row = sql::in_schema(sql::release_row, quoted);
    s.release_row_and_unlock = sql::in_schema(sql::release_row_and_unlock, quoted);
    s.wait_free = sql::in_schema(sql::wait_free, quoted);
    s.listen_and_announce = sql::in_schema(sql::listen_and_announce, quoted);
    s.tenure_sequence = quoted + ".pgiplock_tenure";
    s.app_pattern = std::string(app_prefix) + "%";
    s.quoted_schema = std::move(quoted);
    return s;
  }
};

// Runs a bootstrap DO block that reads its schema from the session setting
// `setting`. A peer bootstrapping at the same moment (a Node one does not
// take our bootstrap lock) can make it collide: retried a few times.
inline task<void> run_bootstrap(std::shared_ptr<connection> client, std::string_view setting, std::string schema,
                                std::string_view ddl, std::string what) {
  for (int attempt = 1;; ++attempt) {
    std::string failure;
    try {
      co_await client->query(std::string(sql::set_bootstrap_schema), setting, schema);
      co_await client->query(std::string(ddl));
      co_return;
    } catch (const sql_error& e) {
      if (e.sqlstate() == sqlstate::insufficient_privilege) {
        throw sql_error("pgiplock: cannot create " + what + " " + client->quote_identifier(schema) +
                            ": permission denied (SQLSTATE 42501). Grant the CREATE privilege on the database "
                            "(GRANT CREATE ON DATABASE ... TO ...) or have a role that has it run init() once. "
                            "Server said: " + without_prefix(e.what()),
                        e.sqlstate());
      }
      if (!sqlstate::is_bootstrap_race(e.sqlstate()) || attempt == 5) throw;
      failure = e.what();
    }
    log(client->logger(), log_level::debug, what + " bootstrap collided, retrying: " + failure);
    co_await client->loop().sleep(std::chrono::milliseconds(10 * attempt));
  }
}

// The Node package's lock table, trigger and function, plus ours; nothing
// is sent but one check when another process made them already.
inline task<void> ensure_lock_schema(std::shared_ptr<connection> client, std::string schema) {
  std::string s = client->quote_identifier(schema);
  auto present = co_await client->query(std::string(sql::lock_schema_present), s + ".lock", s + ".notify_lock()",
                                        s + ".deadlock_check(text,text)", s + ".pgiplock_wait_free(bigint,integer)",
                                        s + ".pgiplock_tenure", s + ".pgiplock_listen(text,text)",
                                        s + ".pgiplock_member", s + ".pgiplock_watch(text,integer,integer)",
                                        s + ".pgiplock_claim(text,text[],text,text,text,boolean,integer)",
                                        s + ".pgiplock_listen_many(text[],text[])", sql::lock_version,
                                        s + ".pgiplock_holder");
  if (present.get(0, 0) == "t") co_return;
  co_await client->query(std::string(sql::set_bootstrap_schema), sql::lock_version_setting, sql::lock_version);
  co_await run_bootstrap(client, sql::lock_schema_setting, std::move(schema), sql::lock_schema_ddl, "the lock schema");
}

// Deletes our row (and frees the advisory lock, when held, in the same
// statement). Yields how many announcing standbys are present.
inline task<int> release_row(std::shared_ptr<connection> client, lock_statements sql,
                             std::string lock_channel, std::int64_t key, bool advisory_held) {
  if (!advisory_held) {
    co_await client->query(sql.release_row, lock_channel, client->app_name());
    co_return 0;
  }
  auto [hi, lo] = split_key(key);
  auto r = co_await client->query(sql.release_row_and_unlock, lock_channel, client->app_name(), key,
                                  static_cast<std::uint32_t>(hi), static_cast<std::uint32_t>(lo));
  co_return std::atoi(std::string(r.get(0, 0)).c_str());
}

}  // namespace pgiplock::detail
