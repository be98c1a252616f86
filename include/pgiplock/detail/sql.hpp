// ==== detail: every statement the library sends, and the SQLSTATEs it reads ==
//
// SQL is protocol: each statement is here once, with the reason it is written
// the way it is. Values are always bound parameters ($1...); identifiers are
// quoted by libpq (connection::quote_identifier) and spliced where a
// statement says @schema@ (the lock schema) or @claims@ (the execution-lock
// schema), by in_schema(). DDL cannot take parameters, so the bootstrap
// blocks read the schema name from a session setting that a bound parameter
// set, and quote it with format('%I').
#pragma once

#include "../errors.hpp"

namespace pgiplock::detail {

namespace sqlstate {
inline constexpr std::string_view invalid_statement_name = "26000";  // prepared statement gone (DISCARD ALL)
inline constexpr std::string_view read_only_transaction = "25006";   // a hot standby
inline constexpr std::string_view insufficient_privilege = "42501";
// Class 08 (connection exception) and 57P0x (admin shutdown, crash, cannot
// connect now): the session is over, whatever the statement was.
inline constexpr std::string_view connection_exception_class = "08";
inline constexpr std::string_view deadlock_detected = "40P01";
inline constexpr std::string_view fenced = "PGF01";  // pgiplock_ack: the tenure was replaced
inline constexpr std::string_view undefined_table = "42P01";
inline constexpr std::string_view undefined_column = "42703";
inline constexpr std::string_view undefined_function = "42883";
inline constexpr std::string_view operator_intervention_prefix = "57P0";
// What a concurrent bootstrap by another process can raise (a Node peer
// does not take our bootstrap lock, so these still happen).
inline constexpr std::string_view bootstrap_races[] = {
    "23505",  // unique_violation: two CREATEs of one catalog row
    "42P07",  // duplicate_table
    "42710",  // duplicate_object (the trigger)
    "42P06",  // duplicate_schema
    "42723",  // duplicate_function
    "40P01",  // deadlock_detected
    "XX000",  // "tuple concurrently updated" on catalog rows
};
inline bool is_bootstrap_race(std::string_view code) {
  return std::find(std::begin(bootstrap_races), std::end(bootstrap_races), code) != std::end(bootstrap_races);
}
// The journal's tables or functions are gone (dropped under us), or an
// older pgiplock put back its functions (they name journal 3's column).
inline bool journal_missing(std::string_view code) {
  return code == undefined_table || code == undefined_function || code == undefined_column;
}
inline bool ends_session(std::string_view code) {
  return code.substr(0, 2) == connection_exception_class || code.substr(0, 4) == operator_intervention_prefix;
}
}  // namespace sqlstate

namespace sql {

// ---- connection ----

// LISTEN and UNLISTEN take no parameters: the channel is a quoted identifier.
inline constexpr std::string_view listen = "LISTEN ";
inline constexpr std::string_view unlisten = "UNLISTEN ";
inline constexpr std::string_view unlisten_all = "UNLISTEN *";
// The probe's self-notification, with the pid of the server backend that
// serves us (through a proxy, PQbackendPID() is the proxy's own key).
inline constexpr std::string_view probe_notify = "SELECT pg_backend_pid(), pg_notify($1, '')";
// The end-to-end probe: a notification to itself, and the server's NOTIFY
// queue usage sampled in the same statement.
inline constexpr std::string_view echo_probe = "SELECT pg_notify($1, ''), pg_notification_queue_usage()";
// A server older than 14 does not report in_hot_standby: asked instead.
inline constexpr std::string_view in_recovery = "SELECT pg_is_in_recovery()";
// Whether a second session of a pool gets our backend while we hold it.
inline constexpr std::string_view begin = "BEGIN";
inline constexpr std::string_view backend_pid = "SELECT pg_backend_pid()";
inline constexpr std::string_view backend_pid_and_listening =
    "SELECT pg_backend_pid(), EXISTS (SELECT FROM pg_listening_channels() c WHERE c = $1)";
// The server's side of dead-link detection, per session (no restart, no
// superuser). tcp_user_timeout exists from PostgreSQL 12 on.
inline constexpr std::string_view server_keepalives =
    "SELECT set_config('tcp_keepalives_idle', $1, false), set_config('tcp_keepalives_interval', $1, false), "
    "set_config('tcp_keepalives_count', '3', false)";
inline constexpr std::string_view server_keepalives_and_user_timeout =
    "SELECT set_config('tcp_keepalives_idle', $1, false), set_config('tcp_keepalives_interval', $1, false), "
    "set_config('tcp_keepalives_count', '3', false), set_config('tcp_user_timeout', $2, false)";

// ---- lock schema bootstrap ----

// Everything init() needs, checked in one round trip before any DDL runs
// (the common case: another process made it). $1 .. $6: the quoted names.
inline constexpr std::string_view lock_schema_present =
    "SELECT to_regclass($1) IS NOT NULL "
    "AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) "
    "AND tgname = 'notify_release_lock_trigger') "
    "AND to_regprocedure($2) IS NOT NULL AND to_regprocedure($3) IS NOT NULL "
    "AND to_regprocedure($4) IS NOT NULL AND to_regclass($5) IS NOT NULL AND to_regprocedure($6) IS NOT NULL "
    "AND to_regclass($7) IS NOT NULL AND to_regprocedure($8) IS NOT NULL AND to_regprocedure($9) IS NOT NULL "
    "AND to_regprocedure($10) IS NOT NULL AND obj_description(to_regprocedure($9), 'pg_proc') = $11 "
    "AND to_regclass($12) IS NOT NULL";
// The DO block below reads the schema name from here (it cannot take a
// parameter); a separate setting per block, as both may run at once.
inline constexpr std::string_view set_bootstrap_schema = "SELECT set_config($1, $2, false)";
inline constexpr std::string_view lock_schema_setting = "pgiplock.lock_schema";
// pgiplock_claim carries the version of its body as a comment, like the
// journal's functions: a schema made by an older pgiplock gets the current
// one (CREATE OR REPLACE). 2: its sweep skips the rows another claim has
// locked, so that members reconnecting at once cannot deadlock on them.
inline constexpr std::string_view lock_version_setting = "pgiplock.lock_version";
inline constexpr std::string_view lock_version = "pgiplock lock 2";
// The Node package's DDL, made idempotent (it never drops) and serialised
// between our processes by a transaction-level advisory lock, plus what the
// fast failover needs: the tenure sequence, the bounded waiter and the
// LISTEN that commits together with its announcement. The advisory key is
// the one earlier versions used, so old and new bootstraps exclude each other.
inline constexpr std::string_view lock_schema_ddl = R"sql(DO $pgiplock$
DECLARE s text := current_setting('pgiplock.lock_schema');
BEGIN
PERFORM pg_advisory_xact_lock(hashtext('pgiplock bootstrap ' || s));
EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', s);
EXECUTE format('CREATE TABLE IF NOT EXISTS %I."lock" ('
  '"channel" CHARACTER VARYING NOT NULL PRIMARY KEY, "app" CHARACTER VARYING NOT NULL)', s);
IF to_regprocedure(format('%I.notify_lock()', s)) IS NULL THEN
  EXECUTE format($q$CREATE FUNCTION %I.notify_lock() RETURNS TRIGGER LANGUAGE PLPGSQL AS $f$
  BEGIN PERFORM PG_NOTIFY(OLD.channel, '1'); RETURN OLD; END; $f$$q$, s);
END IF;
IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('%I.lock', s)::regclass
               AND tgname = 'notify_release_lock_trigger') THEN
  EXECUTE format('CREATE CONSTRAINT TRIGGER notify_release_lock_trigger AFTER DELETE ON %I.lock '
    'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE PROCEDURE %I.notify_lock()', s, s);
END IF;
IF to_regprocedure(format('%I.deadlock_check(text,text)', s)) IS NULL THEN
  EXECUTE format($q$CREATE FUNCTION %I.deadlock_check(old_app TEXT, new_app TEXT)
  RETURNS TEXT LANGUAGE PLPGSQL AS $f$
  DECLARE num_apps INTEGER;
  BEGIN
    SELECT count(query) INTO num_apps FROM pg_stat_activity WHERE application_name = old_app;
    IF num_apps > 0 THEN
      RAISE EXCEPTION 'Duplicate channel for app %%', new_app USING DETAIL = 'LOCKED';
    END IF;
    RETURN new_app;
  END; $f$$q$, s);
END IF;
EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I.pgiplock_tenure', s);
-- Each channel's latest tenure as its winner recorded it (fencing token,
-- start), for pgiplock status: the Node-format lock table has no room for
-- them. A row whose app is not the lock row's is history (nothing deletes
-- it: the next win overwrites it, and a channel has one row).
EXECUTE format('CREATE TABLE IF NOT EXISTS %I.pgiplock_holder ('
  'channel text PRIMARY KEY, app text NOT NULL, token bigint NOT NULL, '
  'since timestamptz NOT NULL DEFAULT now())', s);
-- Waits for a holder's advisory lock for at most timeout_ms; the timeout is
-- caught here, so it never reaches the server log as an ERROR.
IF to_regprocedure(format('%I.pgiplock_wait_free(bigint,integer)', s)) IS NULL THEN
  EXECUTE format($q$CREATE FUNCTION %I.pgiplock_wait_free(key bigint, timeout_ms integer)
  RETURNS boolean LANGUAGE plpgsql AS $f$
  BEGIN
    PERFORM set_config('lock_timeout', timeout_ms::text, true);
    PERFORM pg_advisory_xact_lock(key);
    RETURN true;
  EXCEPTION WHEN lock_not_available THEN
    RETURN false;
  END; $f$$q$, s);
END IF;
-- A new holder's LISTEN and its announcement commit together: the exact cut
-- of a graceful handover.
IF to_regprocedure(format('%I.pgiplock_listen(text,text)', s)) IS NULL THEN
  EXECUTE format($q$CREATE FUNCTION %I.pgiplock_listen(channel text, lock_channel text)
  RETURNS void LANGUAGE plpgsql AS $f$
  BEGIN
    EXECUTE format('LISTEN %%I', channel);
    PERFORM pg_notify(lock_channel, 'listening');
  END; $f$$q$, s);
END IF;
-- Fleets (pubsub members): liveness per member, not per channel. A member
-- holds one session advisory lock, `key`, for as long as it lives; its row
-- here names it, and the channels it holds are Node-format rows in lock.
EXECUTE format('CREATE TABLE IF NOT EXISTS %I.pgiplock_member ('
  'app text PRIMARY KEY, key bigint NOT NULL, pid integer NOT NULL, '
  'since timestamptz NOT NULL DEFAULT now())', s);
-- A member's watch: waits, for at most slice_ms, for the session lock of the
-- next member in the ring (ordered by app), re-reading the ring every
-- step_ms so a member that joins is watched within a step. Yields the app
-- of a member found dead, or NULL. Lock timeouts are caught: no ERROR in
-- the server log. One statement per slice, however many channels.
IF to_regprocedure(format('%I.pgiplock_watch(text,integer,integer)', s)) IS NULL THEN
  EXECUTE format($q$CREATE FUNCTION %1$I.pgiplock_watch(me text, slice_ms integer, step_ms integer)
  RETURNS text LANGUAGE plpgsql AS $f$
  DECLARE
    deadline timestamptz := clock_timestamp() + slice_ms * interval '1 millisecond';
    target record;
    left_ms integer;
  BEGIN
    LOOP
      left_ms := ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000);
      IF left_ms <= 0 THEN RETURN NULL; END IF;
      SELECT m.app, m.key INTO target FROM %1$I.pgiplock_member m WHERE m.app > me ORDER BY m.app LIMIT 1;
      IF NOT FOUND THEN
        SELECT m.app, m.key INTO target FROM %1$I.pgiplock_member m WHERE m.app < me ORDER BY m.app LIMIT 1;
      END IF;
      IF NOT FOUND THEN
        PERFORM pg_sleep(least(step_ms, left_ms) / 1000.0);
      ELSE
        BEGIN
          PERFORM set_config('lock_timeout', least(step_ms, left_ms)::text, true);
          PERFORM pg_advisory_xact_lock(target.key);
          RETURN target.app;
        EXCEPTION WHEN lock_not_available THEN
          NULL;
        END;
      END IF;
    END LOOP;
  END; $f$$q$, s);
END IF;
-- A member's claim on the channels it wants and does not hold, in one
-- transaction: rows of dead members (session lock free), of sessions that
-- are gone (a Node peer's), or free ones become ours, each with a new
-- fencing token and its LISTEN; a row that was released (a fresh insert)
-- is announced on the fleet channel with the LISTEN, the exact cut of a
-- graceful handover. Set-based: per channel it costs a row, not a round of
-- PL/pgSQL. A watcher that just got a member's lock knows it is dead
-- (`gone`): then pg_locks is not scanned. With `sweep`, the dead members'
-- other rows are freed for whoever wants them (the Node trigger and 'free'
-- on the fleet channel tell them). With a `quota` (balanced members), at
-- most that many channels that nobody alive holds are taken, picked at
-- random so that members short of their share do not all reach for the
-- same ones. Yields the won channels, then who holds the others.
IF obj_description(to_regprocedure(format('%I.pgiplock_claim(text,text[],text,text,text,boolean,integer)', s)),
                   'pg_proc') IS DISTINCT FROM current_setting('pgiplock.lock_version') THEN
  EXECUTE format($q$CREATE OR REPLACE FUNCTION %1$I.pgiplock_claim(me text, want text[], fleet text, prefix text, gone text,
                                                        sweep boolean, quota integer)
  RETURNS TABLE (ch text, tok bigint, is_fresh boolean, held_by text, by_member boolean)
  LANGUAGE plpgsql AS $f$
  #variable_conflict use_column
  DECLARE
    dead text[];
    won text[];
    released boolean[];
    freed bigint;
    asked text[] := want;
  BEGIN
    IF gone IS NOT NULL THEN
      dead := ARRAY[gone];
    ELSE
      SELECT coalesce(array_agg(m.app), '{}') INTO dead FROM %1$I.pgiplock_member m
      WHERE m.app <> me AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
          AND l.classid = ((m.key >> 32) & 4294967295)::oid AND l.objid = (m.key & 4294967295)::oid);
    END IF;
    IF quota IS NOT NULL THEN
      -- Sorted (bytewise, as every member sends its lists) so that claims
      -- lock rows in one order: no deadlock between members.
      SELECT coalesce(array_agg(t.w ORDER BY t.w COLLATE "C"), '{}') INTO want FROM (
        SELECT w FROM unnest(asked) AS w
        WHERE NOT EXISTS (
          SELECT 1 FROM %1$I.lock l WHERE l.channel = prefix || w AND l.app <> me AND l.app <> ALL (dead)
            AND (EXISTS (SELECT 1 FROM %1$I.pgiplock_member m WHERE m.app = l.app)
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.application_name = l.app)))
        ORDER BY random() LIMIT quota) AS t;
    END IF;
    WITH taken AS (
      INSERT INTO %1$I.lock AS l (channel, app) SELECT prefix || w, me FROM unnest(want) AS w
      ON CONFLICT (channel) DO UPDATE SET app = EXCLUDED.app
      WHERE l.app = EXCLUDED.app OR l.app = ANY (dead)
         OR (NOT EXISTS (SELECT 1 FROM %1$I.pgiplock_member m WHERE m.app = l.app)
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.application_name = l.app))
      RETURNING substr(l.channel, length(prefix) + 1) AS w, (l.xmax = 0) AS f)
    SELECT coalesce(array_agg(w), '{}'), coalesce(array_agg(f), '{}') INTO won, released FROM taken;
    IF cardinality(won) > 0 THEN
      EXECUTE (SELECT string_agg(format('LISTEN %%I', w), '; ') FROM unnest(won) AS w);
      PERFORM pg_notify(fleet, 'listening:' || x.w) FROM unnest(won, released) AS x(w, f) WHERE x.f;
    END IF;
    IF sweep AND cardinality(dead) > 0 THEN
      -- Members that reconnect at once (a failover) sweep the same dead
      -- rows in different orders: a row another sweep holds is its to
      -- delete, so none waits for another and none deadlocks.
      DELETE FROM %1$I.pgiplock_member m WHERE m.app IN (
        SELECT d.app FROM %1$I.pgiplock_member d WHERE d.app = ANY (dead) FOR UPDATE SKIP LOCKED);
      DELETE FROM %1$I.lock l WHERE l.channel IN (
        SELECT d.channel FROM %1$I.lock d WHERE d.app = ANY (dead) FOR UPDATE SKIP LOCKED);
      GET DIAGNOSTICS freed = ROW_COUNT;
      -- Only when others may want them: a 'free' wakes every member.
      IF freed > 0 THEN PERFORM pg_notify(fleet, 'free'); END IF;
    END IF;
    RETURN QUERY SELECT x.w, nextval(%2$L), x.f, me, true FROM unnest(won, released) AS x(w, f);
    IF cardinality(won) = cardinality(asked) THEN RETURN; END IF;  -- a takeover won them all: nobody else to name
    RETURN QUERY SELECT substr(l.channel, length(prefix) + 1), NULL::bigint, false, l.app::text,
      EXISTS (SELECT 1 FROM %1$I.pgiplock_member m WHERE m.app = l.app)
      FROM %1$I.lock l WHERE l.channel IN (SELECT prefix || w FROM unnest(asked) AS w) AND l.app <> me;
  END; $f$$q$, s, format('%I.pgiplock_tenure', s));
  EXECUTE format('COMMENT ON FUNCTION %I.pgiplock_claim(text,text[],text,text,text,boolean,integer) IS %L', s,
                 current_setting('pgiplock.lock_version'));
END IF;
-- LISTEN and UNLISTEN many channels in one round trip.
IF to_regprocedure(format('%I.pgiplock_listen_many(text[],text[])', s)) IS NULL THEN
  EXECUTE format($q$CREATE FUNCTION %I.pgiplock_listen_many(listen text[], unlisten text[])
  RETURNS void LANGUAGE plpgsql AS $f$
  DECLARE c text;
  BEGIN
    FOREACH c IN ARRAY unlisten LOOP EXECUTE format('UNLISTEN %%I', c); END LOOP;
    FOREACH c IN ARRAY listen LOOP EXECUTE format('LISTEN %%I', c); END LOOP;
  END; $f$$q$, s);
END IF;
END $pgiplock$)sql";

// ---- fleet members (pubsub in single-listener mode) ----

// Joins the fleet: the session lock first, then the row, so a member whose
// row is visible always holds its lock; 'join' on the fleet channel tells
// balanced members to make room. $1 app, $2 key, $3 fleet channel.
inline constexpr std::string_view member_join =
    "WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock($2::bigint) AS got), "
    "i AS (INSERT INTO @schema@.pgiplock_member (app, key, pid) SELECT $1, $2, pg_backend_pid() FROM l WHERE l.got "
    "ON CONFLICT (app) DO NOTHING RETURNING 1) "
    "SELECT count(*), (SELECT count(pg_notify($3, 'join')) FROM i) FROM i";
// One statement per slice, whatever the channel count (see pgiplock_watch).
inline constexpr std::string_view member_watch = "SELECT @schema@.pgiplock_watch($1, $2::integer, $3::integer)";
// Every channel a member wants and lacks, in one round trip.
// $1 app, $2 channels (text[]), $3 fleet channel, $4 lock prefix.
// $5: a member the watcher found dead, or NULL; $6: sweep the dead (the
// last of a claim's chunks does); $7: a balanced member's quota, or NULL.
inline constexpr std::string_view member_claim =
    "SELECT ch, tok, is_fresh, held_by, by_member "
    "FROM @schema@.pgiplock_claim($1, $2::text[], $3, $4, $5, $6, $7::integer)";
// A balanced member's view of the fleet: how many balanced members (their
// apps start with $2, names.hpp balanced_member_prefix: the single-listener
// members of other channels in the same schema do not share these), and how
// many come before it (its rank decides who holds one more when shares are
// uneven). Only live ones count, those holding their member lock: after a
// server restart every row stays until swept or rejoined, and a share left
// for a member still reconnecting is a channel nobody holds. $1 app, $2
// balanced_member_prefix.
inline constexpr std::string_view member_census =
    "SELECT count(*), count(*) FILTER (WHERE m.app < $1) FROM @schema@.pgiplock_member m "
    "WHERE starts_with(m.app, $2) AND (m.app = $1 OR EXISTS (SELECT 1 FROM pg_catalog.pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database()) "
    "AND l.classid = ((m.key >> 32) & 4294967295)::oid AND l.objid = (m.key & 4294967295)::oid))";
// The holder's liveness check, for all its channels at once: how many rows
// it still has (a DELETE or TRUNCATE fires no event we hear); its member row
// is put back if someone deleted it. $1 app, $2 key.
inline constexpr std::string_view member_heartbeat =
    "WITH m AS (INSERT INTO @schema@.pgiplock_member (app, key, pid) VALUES ($1, $2, pg_backend_pid()) "
    "ON CONFLICT (app) DO NOTHING) SELECT count(*) FROM @schema@.lock WHERE app = $1";
// A claim's won tenures, recorded for pgiplock status after the claim, so
// the takeover's transaction stays as short as before (2,000 more row writes
// in it cost the 3 x 2,000 takeover 25 ms of median). A newer tenure's
// record (a greater token) is never overwritten by a late one.
// $1 app, $2 channels, $3 lock prefix, $4 tokens.
inline constexpr std::string_view member_record =
    "INSERT INTO @schema@.pgiplock_holder AS h (channel, app, token) "
    "SELECT $3 || x.c, $1, x.t FROM unnest($2::text[], $4::bigint[]) AS x(c, t) "
    "ON CONFLICT (channel) DO UPDATE SET app = EXCLUDED.app, token = EXCLUDED.token, since = now() "
    "WHERE h.token < EXCLUDED.token";
inline constexpr std::string_view member_rows =
    "SELECT substr(channel, length($2) + 1) FROM @schema@.lock WHERE app = $1";
// Releases channels in one statement: the rows go (the trigger tells Node
// standbys), 'free' on the fleet channel tells ours; $5 also leaves the
// fleet. Yields how many rows went and how many other members' sessions
// there are (whether a successor may announce; unregistered members too).
// $1 app, $2 channels, $3 lock prefix, $4 fleet channel, $5 leaving,
// $6 the member app prefix || '%'.
inline constexpr std::string_view member_release =
    "WITH d AS (DELETE FROM @schema@.lock WHERE app = $1 "
    "AND channel IN (SELECT $3 || c FROM unnest($2::text[]) AS c) RETURNING 1), "
    "n AS MATERIALIZED (SELECT count(*) AS gone FROM d), "
    "m AS (DELETE FROM @schema@.pgiplock_member WHERE app = $1 AND $5::boolean) "
    "SELECT n.gone, (SELECT count(pg_notify($4, 'free')) FROM n WHERE n.gone > 0), "
    "(SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name LIKE $6 "
    "AND application_name <> $1) FROM n";
inline constexpr std::string_view member_unlock = "SELECT pg_advisory_unlock($1::bigint)";
// Rows gone under a live holder (deleted, truncated): others may take them.
inline constexpr std::string_view fleet_free = "SELECT pg_notify($1, 'free')";
inline constexpr std::string_view listen_many = "SELECT @schema@.pgiplock_listen_many($1::text[], $2::text[])";

// ---- ip_lock ----

// One statement: take the advisory lock if free; only then insert our row,
// take over one whose app has no session any more or is one of ours (ours
// hold the advisory lock for their whole tenure: we got it, so that holder
// is gone), or keep one that is already ours; a live holder's row is left
// alone (0 rows and no error, unlike the Node package's deadlock_check, which
// logs an ERROR per standby per interval). Two takers of one dead row
// serialise on its row lock; the second re-checks, finds the new app alive
// and gets 0. A won tenure draws its fencing token, and LISTENs $4 in the
// same transaction when given. $1 lock channel, $2 our app, $3 advisory
// key, $4 data channel or '', $5 the tenure sequence, $6 our app prefix || '%'.
// The token and the tenure's start go to pgiplock_holder (for status).
// Yields: advisory got, won, token, fresh row (the predecessor released it).
inline constexpr std::string_view acquire =
    "WITH me AS MATERIALIZED (SELECT pg_try_advisory_lock($3::bigint) AS got), "
    "taken AS (INSERT INTO @schema@.lock AS l (channel, app) SELECT $1, $2 FROM me WHERE me.got "
    "ON CONFLICT (channel) DO UPDATE SET app = EXCLUDED.app "
    "WHERE l.app = EXCLUDED.app OR l.app LIKE $6 OR NOT EXISTS ("
    "SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.application_name = l.app) "
    "RETURNING (xmax = 0) AS fresh), "
    "tok AS MATERIALIZED (SELECT nextval($5::regclass) AS t FROM (SELECT 1 FROM taken LIMIT 1) w), "
    "h AS (INSERT INTO @schema@.pgiplock_holder (channel, app, token) SELECT $1, $2, t FROM tok "
    "ON CONFLICT (channel) DO UPDATE SET app = EXCLUDED.app, token = EXCLUDED.token, since = now()) "
    "SELECT (SELECT got FROM me), EXISTS (SELECT 1 FROM taken), (SELECT t FROM tok), "
    "coalesce((SELECT bool_or(fresh) FROM taken), false), "
    "CASE WHEN EXISTS (SELECT 1 FROM taken) AND $4 <> '' THEN @schema@.pgiplock_listen($4, $1) END";
// The holder's liveness check: a DELETE or TRUNCATE under a live holder
// fires no release event, so its row is looked at.
inline constexpr std::string_view holds_row =
    "SELECT EXISTS (SELECT 1 FROM @schema@.lock WHERE channel = $1 AND app = $2)";
inline constexpr std::string_view advisory_unlock = "SELECT pg_advisory_unlock($1::bigint)";
// Members that announce their LISTEN hold this shared lock (the channel's
// key as an int4 pair: its own key space) while they take part, so a
// releasing holder knows whether anyone will announce.
inline constexpr std::string_view presence_lock = "SELECT pg_advisory_lock_shared($1::integer, $2::integer)";
inline constexpr std::string_view presence_unlock = "SELECT pg_advisory_unlock_shared($1::integer, $2::integer)";
// A release without the advisory lock (a Node-style holder): just the row.
inline constexpr std::string_view release_row = "DELETE FROM @schema@.lock WHERE channel = $1 AND app = $2";
// One statement. The advisory unlock takes effect at once, the release
// NOTIFY only at commit, so a standby woken by either finds the lock free
// (and, if it races the commit, its INSERT waits for it). The unlock reads
// the DELETE's result, so it runs after it: a waiter woken by the unlock must
// find the row deleted (its INSERT then waits for our commit and starts a
// fresh tenure), never still ours to take over as if we had died (it would
// then deliver at once, beside our drain). A data-modifying CTE always runs.
// Yields how many other members hold the presence lock: announcing C++
// standbys, whether or not they wait right now. $3 key, $4/$5 its halves.
inline constexpr std::string_view release_row_and_unlock =
    "WITH w AS MATERIALIZED (SELECT count(*) AS n FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
    "AND granted AND classid = $4::oid AND objid = $5::oid AND objsubid = 2 AND pid <> pg_backend_pid() "
    "AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())), "
    "d AS (DELETE FROM @schema@.lock WHERE channel = $1 AND app = $2 RETURNING 1), "
    "u AS MATERIALIZED (SELECT pg_advisory_unlock($3::bigint) AS ok FROM w, (SELECT count(*) FROM d) gone) "
    "SELECT (SELECT n FROM w), (SELECT ok FROM u)";
// A standby's fast path: wait server-side, for at most $2 ms (a waiting
// statement pins the xmin horizon: never unbounded), for the holder's
// advisory lock. Yields whether it came free.
inline constexpr std::string_view wait_free = "SELECT @schema@.pgiplock_wait_free($1::bigint, $2::integer)";

// ---- pubsub ----

// LISTEN and the "listening" announcement on the lock channel commit together.
inline constexpr std::string_view listen_and_announce = "SELECT @schema@.pgiplock_listen($1, $2)";
// Every notify() of one turn of the loop: one statement, one transaction.
inline constexpr std::string_view notify_many =
    "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)";

// ---- durable channels (DESIGN.md section 8, docs/durable.md) ----

// Order and completeness: each channel's publishers serialise on its row in
// pgiplock_channel (an upsert holds the row lock until commit), so ids are
// drawn in commit order with no gaps: id n commits before id n + 1 can be
// drawn, and a rolled-back draw is drawn again. A reader that saw id n has
// seen everything below it. (A sequence read "by value" is not enough: a
// transaction holding a smaller id may commit after a larger one was read.)
// The cursor lives in a table of its own, so acknowledging never waits for
// an open publisher. The journal is list-partitioned into time slots that
// are truncated whole once every row in them is acknowledged (or older than
// the retention): no per-message DELETE on the hot path, and the disk space
// comes back at once. A nudge is "pgiplock#<id>:<payload>" when it fits in
// a notification, else "pgiplock#<id>" (the payload is read from the
// journal): the prefix (names.hpp nudge_prefix) keeps a plain notification
// on the channel, say a number, from passing for one.
// A publishing statement's messages of one channel share journal rows of up
// to `per_row` (256, a read's page: journal.hpp journal_page) messages (ids
// first_id..id, their payloads in `bodies`), when there are several and each
// fits in a nudge: a row and an index entry per message were most of a
// durable publish's cost (docs/benchmarks.md). The cap bounds what a read
// unpacks beyond its page (an array is read whole): one row of 200,000 took
// 117 s to replay page by page, rows of 256 1.7 s. A lone or large message
// has a row of its own (first_id NULL, its payload in `body`), so a read past
// a page of large ones never loads them.
inline constexpr std::string_view journal_setting = "pgiplock.journal_schema";
inline constexpr std::string_view journal_version_setting = "pgiplock.journal_version";
// The functions carry the version of their bodies as a comment: a schema
// made by an older pgiplock gets the current ones (CREATE OR REPLACE).
inline constexpr std::string_view journal_version = "pgiplock journal 4";
inline constexpr std::string_view journal_present =
    "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL "
    "AND to_regprocedure($4) IS NOT NULL AND to_regprocedure($5) IS NOT NULL AND to_regprocedure($6) IS NOT NULL "
    "AND to_regprocedure($7) IS NOT NULL AND obj_description(to_regprocedure($7), 'pg_proc') = $8";
inline constexpr std::string_view journal_ddl = R"sql(DO $pgiplock$
DECLARE s text := current_setting('pgiplock.journal_schema');
BEGIN
PERFORM pg_advisory_xact_lock(hashtext('pgiplock journal ' || s));
EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', s);
EXECUTE format('CREATE TABLE IF NOT EXISTS %I.pgiplock_channel ('
  'channel text PRIMARY KEY, last_id bigint NOT NULL DEFAULT 0)', s);
EXECUTE format('CREATE TABLE IF NOT EXISTS %I.pgiplock_cursor ('
  'channel text PRIMARY KEY, acked bigint NOT NULL DEFAULT 0, token bigint NOT NULL DEFAULT 0, '
  'acked_at timestamptz)', s);
EXECUTE format('CREATE TABLE IF NOT EXISTS %I.pgiplock_journal (slot smallint NOT NULL, channel text NOT NULL, '
  'id bigint NOT NULL, body text NOT NULL, published timestamptz NOT NULL DEFAULT now(), first_id bigint, '
  'bodies text[]) PARTITION BY LIST (slot)', s);
-- Journal 3 (a row per message) called the payload "payload": renamed, so
-- that a member of that version fails loudly on this journal instead of
-- reading a shared row as one empty message.
IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = format('%I.pgiplock_journal', s)::regclass
           AND attname = 'payload' AND NOT attisdropped) THEN
  EXECUTE format('ALTER TABLE %I.pgiplock_journal RENAME COLUMN payload TO body', s);
END IF;
IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = format('%I.pgiplock_journal', s)::regclass
               AND attname = 'bodies' AND NOT attisdropped) THEN
  EXECUTE format('ALTER TABLE %I.pgiplock_journal ADD COLUMN IF NOT EXISTS first_id bigint, '
    'ADD COLUMN bodies text[]', s);
END IF;
-- Slots 0..7 are the time slots; 8 holds the backlog that pruning moved out
-- of them.
FOR i IN 0..8 LOOP
  IF to_regclass(format('%I.pgiplock_journal_%s', s, i)) IS NULL THEN
    EXECUTE format('CREATE TABLE %1$I.pgiplock_journal_%2$s PARTITION OF %1$I.pgiplock_journal '
      'FOR VALUES IN (%2$s)', s, i);
    EXECUTE format('ALTER TABLE %I.pgiplock_journal_%s ADD PRIMARY KEY (channel, id)', s, i);
  END IF;
END LOOP;
-- The current time slot: 4 s each, 8 of them, so a slot is written for 4 s
-- and can be truncated from then on, for 28 s, before it comes round again.
EXECUTE format($q$CREATE OR REPLACE FUNCTION %I.pgiplock_slot() RETURNS smallint LANGUAGE sql STABLE AS
  $b$SELECT (floor(extract(epoch FROM now()) / 4)::bigint %% 8)::smallint$b$$q$, s);
-- Journals messages in the order given and nudges their channels, all at the
-- commit of the caller's transaction. Counter rows are locked in channel
-- order (bytewise): two publishers of several channels cannot deadlock.
-- Messages of one channel (a loop turn's notify() calls, a lone publish)
-- take a short path: the general one's numbering and grouping cost 4x its
-- time for 1,000 messages (measured with pgbench).
EXECUTE format($q$CREATE OR REPLACE FUNCTION %1$I.pgiplock_publish_many(chs text[], payloads text[])
  RETURNS SETOF bigint LANGUAGE plpgsql AS $f$
  DECLARE ids bigint[]; nudges text[]; names text[]; k integer := cardinality(chs); last bigint;
    per_row CONSTANT integer := 256;
  BEGIN
    IF k IS DISTINCT FROM cardinality(payloads) THEN
      RAISE EXCEPTION 'pgiplock_publish_many: %% channels but %% payloads', cardinality(chs), cardinality(payloads);
    END IF;
    IF k > 0 AND chs[1] <> '' AND chs[1] = ALL(chs) THEN
      payloads := array_replace(payloads, NULL, '');
      -- The journal before the counter row, as in one statement: a session
      -- that locked the journal to truncate it may want the row next.
      LOCK TABLE ONLY %1$I.pgiplock_journal IN ROW EXCLUSIVE MODE;
      INSERT INTO %1$I.pgiplock_channel AS x (channel, last_id) VALUES (chs[1], k)
        ON CONFLICT (channel) DO UPDATE SET last_id = x.last_id + EXCLUDED.last_id RETURNING x.last_id INTO last;
      IF k > 1 AND NOT EXISTS (SELECT 1 FROM unnest(payloads) AS p WHERE octet_length(p) > 7900) THEN
        INSERT INTO %1$I.pgiplock_journal (slot, channel, id, body, first_id, bodies)
          SELECT %1$I.pgiplock_slot(), chs[1], last - k + least(g + per_row, k), '', last - k + g + 1,
                 payloads[g + 1 : g + per_row]
          FROM generate_series(0, k - 1, per_row) AS g;
      ELSE
        INSERT INTO %1$I.pgiplock_journal (slot, channel, id, body)
          SELECT %1$I.pgiplock_slot(), chs[1], last - k + u.o, u.p FROM unnest(payloads) WITH ORDINALITY AS u(p, o);
      END IF;
      PERFORM pg_notify(chs[1], CASE WHEN octet_length(u.p) <= 7900 THEN 'pgiplock#' || (last - k + u.o) || ':' || u.p
                                     ELSE 'pgiplock#' || (last - k + u.o) END)
        FROM unnest(payloads) WITH ORDINALITY AS u(p, o);
      RETURN QUERY SELECT generate_series(last - k + 1, last);
      RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(chs) AS c WHERE c IS NULL OR c = '') THEN
      RAISE EXCEPTION 'pgiplock_publish: the channel name is empty or NULL';
    END IF;
    WITH m AS (SELECT t.c, coalesce(t.p, '') AS p, t.o FROM unnest(chs, payloads) WITH ORDINALITY AS t(c, p, o)),
    n AS (SELECT m.c, count(*) AS k, bool_and(octet_length(m.p) <= 7900) AS small FROM m GROUP BY m.c),
    ctr AS (INSERT INTO %1$I.pgiplock_channel AS x (channel, last_id)
            SELECT n.c, n.k FROM n ORDER BY n.c COLLATE "C"
            ON CONFLICT (channel) DO UPDATE SET last_id = x.last_id + EXCLUDED.last_id
            RETURNING x.channel, x.last_id),
    numbered AS (SELECT m.c, m.p, m.o, n.k > 1 AND n.small AS shared,
                   ctr.last_id - n.k + row_number() OVER (PARTITION BY m.c ORDER BY m.o) AS id
                 FROM m JOIN ctr ON ctr.channel = m.c JOIN n ON n.c = m.c),
    own AS (INSERT INTO %1$I.pgiplock_journal (slot, channel, id, body)
            SELECT %1$I.pgiplock_slot(), numbered.c, numbered.id, numbered.p FROM numbered WHERE NOT numbered.shared),
    shared AS (INSERT INTO %1$I.pgiplock_journal (slot, channel, id, body, first_id, bodies)
               SELECT %1$I.pgiplock_slot(), numbered.c, max(numbered.id), '', min(numbered.id),
                      array_agg(numbered.p ORDER BY numbered.id)
               FROM numbered WHERE numbered.shared GROUP BY numbered.c, (numbered.id - 1) / per_row)
    SELECT array_agg(numbered.id ORDER BY numbered.o), array_agg(numbered.c ORDER BY numbered.o),
           array_agg(CASE WHEN octet_length(numbered.p) <= 7900 THEN 'pgiplock#' || numbered.id || ':' || numbered.p
                          ELSE 'pgiplock#' || numbered.id END ORDER BY numbered.o)
      INTO ids, names, nudges FROM numbered;
    PERFORM pg_notify(x.c, x.n) FROM unnest(names, nudges) AS x(c, n);
    RETURN QUERY SELECT unnest(ids);
  END; $f$$q$, s);
EXECUTE format($q$CREATE OR REPLACE FUNCTION %1$I.pgiplock_publish(channel text, payload text)
  RETURNS bigint LANGUAGE sql AS
  $b$SELECT %1$I.pgiplock_publish_many(ARRAY[channel], ARRAY[payload])$b$$q$, s);
-- Moves a cursor inside the caller's transaction, which then commits its own
-- writes with it (exactly-once effects); a replaced tenure raises PGF01.
EXECUTE format($q$CREATE OR REPLACE FUNCTION %1$I.pgiplock_ack(ch text, upto bigint, tok bigint)
  RETURNS void LANGUAGE plpgsql AS $f$
  BEGIN
    INSERT INTO %1$I.pgiplock_cursor AS c (channel, acked, token, acked_at) VALUES (ch, upto, tok, now())
      ON CONFLICT (channel) DO UPDATE SET acked = greatest(c.acked, EXCLUDED.acked), token = EXCLUDED.token,
        acked_at = EXCLUDED.acked_at WHERE c.token <= EXCLUDED.token;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'pgiplock: tenure %% of channel "%%" was replaced: its acknowledgement is refused', tok, ch
        USING ERRCODE = 'PGF01';
    END IF;
  END; $f$$q$, s);
-- Retention, one caller at a time. A time slot other than the current one
-- is emptied with TRUNCATE once none of its rows is both unacknowledged and
-- younger than keep. Its few live rows (an idle channel's, a slow
-- listener's) do not stop that: up to 10,000 of them and 16 MiB are first
-- moved to the backlog partition (slot 8, never current), so one forgotten
-- channel cannot keep every slot from being truncated. A slot with more
-- live rows than that loses its dead ones in one DELETE; so does the
-- backlog partition, every round. A slot that a publisher still writes to
-- (a transaction open since that slot was current) cannot be locked within
-- 20 ms and waits for the next round.
EXECUTE format($q$CREATE OR REPLACE FUNCTION %1$I.pgiplock_prune(keep interval)
  RETURNS integer LANGUAGE plpgsql AS $f$
  DECLARE cur smallint := %1$I.pgiplock_slot(); part text; busy boolean; live bigint; live_bytes bigint;
    backlog text := format('%%I.%%I', %2$L, 'pgiplock_journal_8'); cut integer := 0;
    -- A partition's acknowledged and expired rows, one by one ($1 keep).
    purge text := 'DELETE FROM %%s j WHERE j.published <= now() - $1 OR EXISTS (SELECT 1 FROM '
      || quote_ident(%2$L) || '.pgiplock_cursor c WHERE c.channel = j.channel AND j.id <= c.acked)';
  BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgiplock prune ' || %2$L)) THEN RETURN 0; END IF;
    FOR i IN 0..7 LOOP
      CONTINUE WHEN i = cur;
      part := format('%%I.%%I', %2$L, 'pgiplock_journal_' || i);
      EXECUTE format('SELECT EXISTS (SELECT 1 FROM %%s)', part) INTO busy;
      CONTINUE WHEN NOT busy;
      BEGIN
        PERFORM set_config('lock_timeout', '20', true);
        EXECUTE format('LOCK TABLE %%s IN ACCESS EXCLUSIVE MODE', part);
        -- Per channel, an index probe from its cursor: no scan of the acknowledged rows.
        EXECUTE format('SELECT count(*), coalesce(sum(l.bytes), 0) FROM (SELECT octet_length(j.body) '
                       '+ coalesce(pg_column_size(j.bodies), 0) AS bytes '
                       'FROM %%I.pgiplock_channel n LEFT JOIN %%I.pgiplock_cursor c ON c.channel = n.channel '
                       'JOIN %%s j ON j.channel = n.channel AND j.id > coalesce(c.acked, 0) '
                       'WHERE j.published > now() - $1 LIMIT 10001) l', %2$L, %2$L, part)
          USING keep INTO live, live_bytes;
        IF live > 10000 OR live_bytes > 16777216 THEN
          EXECUTE format(purge, part) USING keep;
          CONTINUE;
        END IF;
        IF live > 0 THEN
          -- A row of the same id there is left from before the journal was
          -- rebuilt (its ids restarted): the newer one wins.
          EXECUTE format('INSERT INTO %%s (slot, channel, id, body, published, first_id, bodies) SELECT 8, '
                         'j.channel, j.id, j.body, j.published, j.first_id, j.bodies FROM %%s j '
                         'JOIN %%I.pgiplock_channel n ON n.channel = j.channel '
                         'LEFT JOIN %%I.pgiplock_cursor c ON c.channel = j.channel '
                         'WHERE j.id > coalesce(c.acked, 0) AND j.published > now() - $1 ON CONFLICT (channel, id) '
                         'DO UPDATE SET body = EXCLUDED.body, published = EXCLUDED.published, '
                         'first_id = EXCLUDED.first_id, bodies = EXCLUDED.bodies',
                         backlog, part, %2$L, %2$L)
            USING keep;
        END IF;
        EXECUTE format('TRUNCATE %%s', part);
        cut := cut + 1;
      EXCEPTION WHEN lock_not_available THEN
        NULL;
      END;
    END LOOP;
    PERFORM set_config('lock_timeout', '0', true);
    EXECUTE format(purge, backlog) USING keep;
    RETURN cut;
  END; $f$$q$, s, s);
-- Last: the version says every function above is current.
EXECUTE format('COMMENT ON FUNCTION %I.pgiplock_prune(interval) IS %L', s, current_setting('pgiplock.journal_version'));
END $pgiplock$)sql";
// The messages of many channels after their positions: a takeover's replay
// and a live gap, in one round trip for all channels. Per channel at most
// $3 messages and, after the first, $4 bytes of payload (a page of 64 MiB
// messages must not be read at once): the messages past the page come back
// without their payload (not read from disk), only to say there is more.
// Shared rows are unpacked here, only those the page reaches (r.before: how
// many messages after the position the rows ahead hold); the first may
// begin before the position.
inline constexpr std::string_view journal_read =
    "SELECT x.c, m.id, CASE WHEN m.keep THEN m.body END, m.keep "
    "FROM unnest($1::text[], $2::bigint[]) AS x(c, f) "
    "CROSS JOIN LATERAL (SELECT e.id, e.body, row_number() OVER w <= $3 "
    "AND coalesce(sum(octet_length(e.body)) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) < $4 AS keep "
    "FROM (SELECT j.id, j.first_id, j.body, j.bodies, coalesce(sum(j.id - greatest(coalesce(j.first_id, j.id), x.f + 1) "
    "+ 1) OVER (ORDER BY j.id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before "
    "FROM @schema@.pgiplock_journal j WHERE j.channel = x.c AND j.id > x.f ORDER BY j.id LIMIT $3 + 1) r "
    "CROSS JOIN LATERAL (SELECT r.id AS id, r.body AS body WHERE r.first_id IS NULL UNION ALL "
    "SELECT r.first_id + u.k - 1, u.b FROM unnest(r.bodies) WITH ORDINALITY AS u(b, k) WHERE r.first_id IS NOT NULL) e "
    "WHERE r.before <= $3 AND e.id > x.f "
    "WINDOW w AS (ORDER BY e.id) ORDER BY e.id LIMIT $3 + 1) m ORDER BY x.c, m.id";
// A new tenure fences the cursor: from its commit on, only this token moves
// it. Yields each channel's position, or nothing for a channel whose cursor
// a newer tenure holds already (taking it again with the same token, after
// the journal was rebuilt, is no loss of tenure). $1 channels, $2 tokens.
inline constexpr std::string_view cursor_take =
    "INSERT INTO @schema@.pgiplock_cursor AS c (channel, token) "
    "SELECT x.c, x.t FROM unnest($1::text[], $2::bigint[]) AS x(c, t) ORDER BY x.c COLLATE \"C\" "
    "ON CONFLICT (channel) DO UPDATE SET token = EXCLUDED.token WHERE c.token <= EXCLUDED.token "
    "RETURNING c.channel, c.acked";
// Acknowledges many channels, each only under its tenure's token (or a
// newer one: a cursor row a replaced holder put back after it was deleted);
// a row that is gone (the table truncated) is put back where this holder
// stands. Yields per channel whether it was accepted; the channel's last
// id: lower than what this holder delivered means the journal was dropped
// and began again (ids from 1), which the holder then follows; and the age
// of the oldest message after the acknowledged one, in ms (for stats()).
// $1 channels, $2 ids (0: only check), $3 tokens.
inline constexpr std::string_view cursor_ack =
    "WITH a AS (INSERT INTO @schema@.pgiplock_cursor AS c (channel, acked, token, acked_at) "
    "SELECT x.ch, x.id, x.tok, now() FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS x(ch, id, tok) "
    "ORDER BY x.ch COLLATE \"C\" "
    "ON CONFLICT (channel) DO UPDATE SET acked = greatest(c.acked, EXCLUDED.acked), token = EXCLUDED.token, "
    "acked_at = EXCLUDED.acked_at WHERE c.token <= EXCLUDED.token RETURNING c.channel) "
    "SELECT x.ch, EXISTS (SELECT 1 FROM a WHERE a.channel = x.ch), "
    "(SELECT n.last_id FROM @schema@.pgiplock_channel n WHERE n.channel = x.ch), "
    "(SELECT (extract(epoch FROM now() - j.published) * 1000)::bigint FROM @schema@.pgiplock_journal j "
    "WHERE j.channel = x.ch AND j.id > x.id ORDER BY j.id LIMIT 1) FROM unnest($1::text[], $2::bigint[]) AS x(ch, id)";
// The journal began again: the cursor follows it, under this tenure only.
inline constexpr std::string_view cursor_reset =
    "UPDATE @schema@.pgiplock_cursor SET acked = 0, acked_at = now() WHERE channel = $1 AND token = $2::bigint";
inline constexpr std::string_view publish_many = "SELECT @schema@.pgiplock_publish_many($1::text[], $2::text[])";
inline constexpr std::string_view ack_one = "SELECT @schema@.pgiplock_ack($1, $2::bigint, $3::bigint)";
inline constexpr std::string_view prune = "SELECT @schema@.pgiplock_prune($1::interval)";
inline constexpr std::string_view rollback = "ROLLBACK";
inline constexpr std::string_view commit = "COMMIT";
// Per durable channel: published, acknowledged, backlog, age of the oldest
// unacknowledged message, and the token of the tenure that holds its cursor
// (for pgiplock status; a plain channel's token lives only in its holder).
inline constexpr std::string_view durable_status =
    "SELECT n.channel, n.last_id, coalesce(c.acked, 0), n.last_id - coalesce(c.acked, 0), "
    "extract(epoch FROM now() - (SELECT min(j.published) FROM @schema@.pgiplock_journal j "
    "WHERE j.channel = n.channel AND j.id > coalesce(c.acked, 0))), c.token "
    "FROM @schema@.pgiplock_channel n LEFT JOIN @schema@.pgiplock_cursor c ON c.channel = n.channel "
    "ORDER BY n.channel";

// ---- execution lock ----

inline constexpr std::string_view claim_schema_present = "SELECT to_regclass($1) IS NOT NULL";
inline constexpr std::string_view claim_schema_setting = "pgiplock.claim_schema";
inline constexpr std::string_view claim_schema_ddl = R"sql(DO $pgiplock$
DECLARE s text := current_setting('pgiplock.claim_schema');
BEGIN
PERFORM pg_advisory_xact_lock(hashtext('pgiplock claims ' || s));
EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', s);
EXECUTE format('CREATE TABLE IF NOT EXISTS %I.claim ('
  'key text PRIMARY KEY, channel text NOT NULL, app text NOT NULL, '
  'claimed_at timestamptz NOT NULL DEFAULT now())', s);
EXECUTE format('CREATE INDEX IF NOT EXISTS claim_claimed_at ON %I.claim (claimed_at)', s);
END $pgiplock$)sql";
// Expired markers go in one statement per interval, not per message.
inline constexpr std::string_view prune_claims =
    "DELETE FROM @claims@.claim WHERE claimed_at < now() - $1::interval";
// A turn of the loop's claims in one statement; what it returns is won.
inline constexpr std::string_view claim_many =
    "INSERT INTO @claims@.claim (key, channel, app) SELECT k, ch, $3 FROM unnest($1::text[], $2::text[]) "
    "AS t(k, ch) ON CONFLICT (key) DO NOTHING RETURNING key";

// Splices quoted schema names into a statement.
inline std::string in_schema(std::string_view statement, std::string_view quoted_schema,
                             std::string_view marker = "@schema@") {
  std::string out;
  std::size_t from = 0;
  for (std::size_t at; (at = statement.find(marker, from)) != std::string_view::npos; from = at + marker.size()) {
    out.append(statement.substr(from, at - from));
    out.append(quoted_schema);
  }
  out.append(statement.substr(from));
  return out;
}

}  // namespace sql
}  // namespace pgiplock::detail
