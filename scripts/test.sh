#!/usr/bin/env bash
# Runs every test: unit tests, the store conformance suite, and the integration tests
# against the real server binary, then the HTTP suite again on PostgreSQL. Installs
# nothing system-wide beyond what cargo needs.
#
# PostgreSQL: the server at MORAG_TEST_POSTGRES_URL (default
# postgres://postgres@127.0.0.1:5432/test) when it answers; otherwise a throwaway cluster
# started from any installed PostgreSQL (scripts/test-postgres.sh) and removed at the end;
# with no PostgreSQL installed at all, only the embedded-store tests run (a failure when
# CI is set).
set -euo pipefail
cd "$(dirname "$0")/.."

# A fixed target directory outside the checkout lets fresh clones reuse earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/morag-jobs-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v cargo >/dev/null; then
  echo "cargo is required: install Rust from your distribution or rustup" >&2
  exit 1
fi

# --- Python for the Celery and client tests -----------------------------------------------
# The Celery sink's tests run a real Celery worker (tests/python/celery_app.py) against the
# Redis at 127.0.0.1:6379 (override with MORAG_TEST_REDIS_URL); the Python client's tests and
# the Celery example (tests/it/python_client.rs) run pytest. Their virtual environment lives
# outside the checkout and is reused while tests/python/requirements.txt is unchanged.
celery_venv="${MORAG_TEST_VENV:-$HOME/.cache/morag-jobs-venv}"
celery_requirements="tests/python/requirements.txt"
if ! cmp -s "$celery_requirements" "$celery_venv/installed-requirements.txt"; then
  echo "Creating the Python test environment in $celery_venv" >&2
  rm -rf "$celery_venv"
  "${MORAG_TEST_PYTHON_BASE:-python3}" -m venv "$celery_venv"
  "$celery_venv/bin/pip" install --quiet --disable-pip-version-check -r "$celery_requirements"
  cp "$celery_requirements" "$celery_venv/installed-requirements.txt"
fi
# The client package is installed too (which checks that it builds), again whenever a file
# of it differs from what was installed: the environment is shared by every clone. The
# tests themselves import the package from the checkout they run in (PYTHONPATH).
client_stamp="$(cd clients/python && find pyproject.toml README.md src -type f -not -name '*.pyc' -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [[ "$client_stamp" != "$(cat "$celery_venv/installed-client-package" 2>/dev/null)" ]]; then
  echo "Installing clients/python into $celery_venv" >&2
  "$celery_venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall ./clients/python
  echo "$client_stamp" > "$celery_venv/installed-client-package"
fi
export MORAG_TEST_PYTHON="$celery_venv/bin/python"
if command -v redis-cli >/dev/null && ! redis-cli -u "${MORAG_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}" ping >/dev/null 2>&1; then
  echo "Redis is not reachable at ${MORAG_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}: the Celery tests will fail" >&2
fi
# -----------------------------------------------------------------------------------------

source scripts/test-postgres.sh
logs="$(mktemp -d "${TMPDIR:-/tmp}/morag-test-logs.XXXXXX")"
cleanup() {
  test_postgres_stop
  rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
test_postgres_start

if cargo nextest --version >/dev/null 2>&1; then
  nextest=1
  # Only failures and slow tests are listed; the summary line counts the rest.
  run_tests() { cargo nextest run --no-fail-fast --status-level slow --final-status-level slow "$@"; }
else
  nextest=0
  echo "cargo-nextest not found; running cargo test instead" >&2
  run_tests() { cargo test --no-fail-fast "$@"; }
fi

# Prints "PASSED FAILED" for one run's output.
count_results() {
  local log="$1"
  if [[ "$nextest" == 1 ]]; then
    # "Summary [  12.3s] 130 tests run: 128 passed, 2 failed, 1 skipped"
    local line passed failed
    line="$(grep -E '^ *Summary \[' "$log" | tail -1 || true)"
    passed="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$line")"
    failed="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$line")"
    local timed_out
    timed_out="$(sed -nE 's/.* ([0-9]+) timed out.*/\1/p' <<<"$line")"
    echo "${passed:-0} $(( ${failed:-0} + ${timed_out:-0} ))"
  else
    # "test result: ok. 12 passed; 0 failed; ..." once per test binary.
    grep -E '^test result:' "$log" \
      | sed -nE 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' \
      | awk '{p += $1; f += $2} END {print p + 0, f + 0}'
  fi
}

status=0
embedded_filter=()
if [[ "$TEST_POSTGRES_STATE" == none ]]; then
  # The PostgreSQL store tests cannot run; everything else still can.
  if [[ "$nextest" == 1 ]]; then
    embedded_filter=(-E 'not test(/postgres/)')
  else
    embedded_filter=(-- --skip postgres)
  fi
fi

# Everything once on the embedded default (the conformance suite runs on both backends),
# in every crate of the workspace (the client library's unit tests too)...
run_tests --workspace --all-targets "${embedded_filter[@]}" 2>&1 | tee "$logs/embedded.log" || status=1
read -r embedded_passed embedded_failed < <(count_results "$logs/embedded.log")

# ...then the whole HTTP suite again with the server on PostgreSQL.
postgres_passed=0
postgres_failed=0
if [[ "$TEST_POSTGRES_STATE" != none ]]; then
  MORAG_TEST_STORE=postgres run_tests --test it 2>&1 | tee "$logs/postgres.log" || status=1
  read -r postgres_passed postgres_failed < <(count_results "$logs/postgres.log")
fi

total_passed=$((embedded_passed + postgres_passed))
total_failed=$((embedded_failed + postgres_failed))
echo
if [[ "$TEST_POSTGRES_STATE" == none ]]; then
  echo "!!! PostgreSQL NOT TESTED: no server answered at $MORAG_TEST_POSTGRES_URL and no"
  echo "!!! PostgreSQL binaries (initdb, pg_ctl) were found on PATH or in /usr/lib/postgresql/*/bin."
  echo "!!! Install PostgreSQL (e.g. apt-get install postgresql) or set MORAG_TEST_POSTGRES_URL."
  echo "morag-jobs tests: $total_passed passed, $total_failed failed (embedded: $embedded_passed; PostgreSQL: NOT RUN)"
  if [[ -n "${CI:-}" ]]; then
    echo "CI is set: a run without PostgreSQL is a failure" >&2
    status=1
  fi
else
  where="PostgreSQL at $MORAG_TEST_POSTGRES_URL"
  [[ "$TEST_POSTGRES_STATE" == own ]] && where="throwaway PostgreSQL"
  echo "morag-jobs tests: $total_passed passed, $total_failed failed (embedded: $embedded_passed, HTTP suite on $where: $postgres_passed)"
fi
if [[ "$status" == 0 && "$total_failed" != 0 ]]; then
  status=1
fi
exit "$status"
