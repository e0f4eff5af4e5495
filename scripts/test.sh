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

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast
else
  echo "cargo-nextest not found; running cargo test instead" >&2
  cargo test --all-targets --no-fail-fast
fi
