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
