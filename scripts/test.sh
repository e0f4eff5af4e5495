#!/usr/bin/env bash
# Runs every test: unit tests, the store conformance suite, and the integration tests
# against the real server binary. Installs nothing system-wide beyond what cargo needs.
set -euo pipefail
cd "$(dirname "$0")/.."

# A fixed target directory outside the checkout lets fresh clones reuse earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/morag-jobs-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v cargo >/dev/null; then
  echo "cargo is required: install Rust from your distribution or rustup" >&2
  exit 1
fi

# --- Python for the Celery tests --------------------------------------------------------
# The Celery sink's tests run a real Celery worker (tests/python/celery_app.py) against the
# Redis at 127.0.0.1:6379 (override with MORAG_TEST_REDIS_URL). Its virtual environment lives
# outside the checkout and is reused while tests/python/requirements.txt is unchanged.
celery_venv="${MORAG_TEST_VENV:-$HOME/.cache/morag-jobs-venv}"
celery_requirements="tests/python/requirements.txt"
if ! cmp -s "$celery_requirements" "$celery_venv/installed-requirements.txt"; then
  echo "Creating the Celery test environment in $celery_venv" >&2
  rm -rf "$celery_venv"
  "${MORAG_TEST_PYTHON_BASE:-python3}" -m venv "$celery_venv"
  "$celery_venv/bin/pip" install --quiet --disable-pip-version-check -r "$celery_requirements"
  cp "$celery_requirements" "$celery_venv/installed-requirements.txt"
fi
export MORAG_TEST_PYTHON="$celery_venv/bin/python"
# -----------------------------------------------------------------------------------------

# The PostgreSQL tests need the server at 127.0.0.1:5432 (override with
# MORAG_TEST_POSTGRES_URL); they fail rather than skip when it is missing, and this says why first.
pg_url="${MORAG_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
if command -v pg_isready >/dev/null && ! pg_isready -q -d "$pg_url"; then
  echo "PostgreSQL is not reachable at $pg_url: the PostgreSQL tests will fail" >&2
fi

if cargo nextest --version >/dev/null 2>&1; then
  run_tests() { cargo nextest run --no-fail-fast "$@"; }
else
  echo "cargo-nextest not found; running cargo test instead" >&2
  run_tests() { cargo test --no-fail-fast "$@"; }
fi

# Everything once on the embedded default (the conformance suite runs on both backends)...
run_tests --all-targets
# ...then the whole HTTP suite again with the server on PostgreSQL.
MORAG_TEST_STORE=postgres run_tests --test it
