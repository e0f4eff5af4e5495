#!/usr/bin/env bash
# Finds a PostgreSQL server for the tests, or starts a throwaway one.
#
# Run as `scripts/test-postgres.sh COMMAND [ARGS...]`: runs COMMAND with
# MORAG_TEST_POSTGRES_URL pointing at a server that answers, then removes any cluster it
# started. Or source it and call `test_postgres_start` / `test_postgres_stop` (test.sh does).
#
# 1. If a server answers at MORAG_TEST_POSTGRES_URL (default
#    postgres://postgres@127.0.0.1:5432/test), it is used as it is.
# 2. Otherwise, with the initdb and pg_ctl found on PATH or in /usr/lib/postgresql/*/bin
#    (MORAG_TEST_POSTGRES_SEARCH, a colon-separated list of directories, replaces both),
#    a cluster is created in a temporary directory on a free loopback port with trust auth
#    and a database `test`, and removed again afterwards.
# 3. Without any PostgreSQL binaries, TEST_POSTGRES_STATE is `none` and nothing is started.
#
# Afterwards TEST_POSTGRES_STATE is `external`, `own` or `none`; with `own`,
# MORAG_TEST_POSTGRES_DIR is the cluster's temporary directory.

test_postgres_log() { echo "test-postgres: $*" >&2; }

# Host and port of a postgres:// URL (defaults 127.0.0.1 and 5432).
test_postgres_host_port() {
  local rest="${1#*://}"
  rest="${rest#*@}"
  rest="${rest%%/*}"
  local host="${rest%%:*}" port=5432
  [[ "$rest" == *:* ]] && port="${rest##*:}"
  echo "${host:-127.0.0.1} ${port:-5432}"
}

# True when a PostgreSQL server accepts connections at the URL.
test_postgres_answers() {
  local url="$1" bin_dir="${2:-}"
  local pg_isready=""
  if [[ -n "$bin_dir" && -x "$bin_dir/pg_isready" ]]; then
    pg_isready="$bin_dir/pg_isready"
  elif command -v pg_isready >/dev/null 2>&1; then
    pg_isready="$(command -v pg_isready)"
  fi
  if [[ -n "$pg_isready" ]]; then
    "$pg_isready" -q -t 3 -d "$url"
    return
  fi
  # Without pg_isready, an open TCP port is the best evidence available.
  local host port
  read -r host port < <(test_postgres_host_port "$url")
  timeout 3 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

# Prints the directory holding initdb and pg_ctl, newest version first; fails if none.
test_postgres_find_binaries() {
  local candidates=()
  if [[ -n "${MORAG_TEST_POSTGRES_SEARCH+set}" ]]; then
    IFS=: read -r -a candidates <<<"$MORAG_TEST_POSTGRES_SEARCH"
  else
    local initdb
    if initdb="$(command -v initdb 2>/dev/null)"; then
      candidates+=("$(dirname "$(readlink -f "$initdb")")")
    fi
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -rn); do
      candidates+=("$dir")
    done
  fi
  local dir
  for dir in "${candidates[@]}"; do
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

# A free loopback TCP port (the kernel's choice for port 0).
test_postgres_free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 40000))
    if ! timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

# Runs a PostgreSQL program as a user it accepts: initdb and postgres refuse root.
test_postgres_as_owner() {
  if [[ "$(id -u)" != 0 ]]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u "$TEST_POSTGRES_OWNER" -- "$@"
  else
    su "$TEST_POSTGRES_OWNER" -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

test_postgres_start() {
  # Only a cluster this shell started is ever stopped: a directory inherited from an outer
  # run (test.sh running the tests that run this script) belongs to that run.
  TEST_POSTGRES_OWN_DIR=""
  unset MORAG_TEST_POSTGRES_DIR
  MORAG_TEST_POSTGRES_URL="${MORAG_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
  export MORAG_TEST_POSTGRES_URL
  TEST_POSTGRES_STATE=none
  local bin_dir=""
  bin_dir="$(test_postgres_find_binaries)" || bin_dir=""
  if test_postgres_answers "$MORAG_TEST_POSTGRES_URL" "$bin_dir"; then
    TEST_POSTGRES_STATE=external
    test_postgres_log "using the PostgreSQL server at $MORAG_TEST_POSTGRES_URL"
    return 0
  fi
  if [[ -z "$bin_dir" ]]; then
    test_postgres_log "no PostgreSQL answers at $MORAG_TEST_POSTGRES_URL and no initdb/pg_ctl was found (PATH, /usr/lib/postgresql/*/bin)"
    return 0
  fi
  test_postgres_log "no PostgreSQL answers at $MORAG_TEST_POSTGRES_URL: starting a throwaway cluster with $bin_dir"

  TEST_POSTGRES_OWNER="$(id -un)"
  if [[ "$(id -u)" == 0 ]]; then
    if id postgres >/dev/null 2>&1; then
      TEST_POSTGRES_OWNER=postgres
    elif id nobody >/dev/null 2>&1; then
      TEST_POSTGRES_OWNER=nobody
    else
      test_postgres_log "running as root without a postgres or nobody user: initdb cannot run"
      return 1
    fi
  fi
  local dir port
  dir="$(mktemp -d "${TMPDIR:-/tmp}/morag-pg.XXXXXX")"
  TEST_POSTGRES_OWN_DIR="$dir"
  MORAG_TEST_POSTGRES_DIR="$dir"
  export MORAG_TEST_POSTGRES_DIR
  TEST_POSTGRES_BIN_DIR="$bin_dir"
  if [[ "$(id -u)" == 0 ]]; then
    chown "$TEST_POSTGRES_OWNER" "$dir"
  fi
  port="$(test_postgres_free_port)"
  # fsync off: the cluster is thrown away, and the tests are about our code, not its disks.
  if ! test_postgres_as_owner "$bin_dir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
      --no-sync >"$dir/initdb.log" 2>&1; then
    test_postgres_log "initdb failed:"
    cat "$dir/initdb.log" >&2
    test_postgres_stop
    return 1
  fi
  if ! test_postgres_as_owner "$bin_dir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
      start >/dev/null; then
    test_postgres_log "pg_ctl start failed:"
    cat "$dir/server.log" >&2
    test_postgres_stop
    return 1
  fi
  TEST_POSTGRES_STATE=own
  MORAG_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  local psql="$bin_dir/psql"
  [[ -x "$psql" ]] || psql="$(command -v psql || true)"
  if [[ -n "$psql" ]]; then
    "$psql" -q -X -d "$MORAG_TEST_POSTGRES_URL" -c 'CREATE DATABASE test' >/dev/null
    MORAG_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/test"
  fi
  # Without psql the tests use the `postgres` database, which serves them just as well.
  test_postgres_log "throwaway PostgreSQL at $MORAG_TEST_POSTGRES_URL (in $dir)"
}

# Stops and removes a cluster test_postgres_start created; does nothing otherwise.
test_postgres_stop() {
  local dir="${TEST_POSTGRES_OWN_DIR:-}"
  [[ -n "$dir" && -d "$dir" ]] || return 0
  if [[ -f "$dir/data/postmaster.pid" ]]; then
    test_postgres_as_owner "$TEST_POSTGRES_BIN_DIR/pg_ctl" -D "$dir/data" -m immediate -w stop \
      >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  TEST_POSTGRES_OWN_DIR=""
  unset MORAG_TEST_POSTGRES_DIR
  if [[ "${TEST_POSTGRES_STATE:-}" == own ]]; then
    test_postgres_log "throwaway PostgreSQL removed"
  fi
}

# Run as a program: start (or find) a server, run the command, clean up.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
  fi
  trap test_postgres_stop EXIT
  trap 'exit 130' INT TERM
  test_postgres_start
  export TEST_POSTGRES_STATE
  if [[ "$TEST_POSTGRES_STATE" == none ]]; then
    echo "!!! no PostgreSQL for the tests: install PostgreSQL or set MORAG_TEST_POSTGRES_URL" >&2
    if [[ -n "${CI:-}" ]]; then
      echo "!!! CI is set: failing instead of running without PostgreSQL" >&2
      exit 1
    fi
  fi
  status=0
  "$@" || status=$?
  exit "$status"
fi
