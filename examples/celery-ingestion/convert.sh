#!/bin/sh
# The converter `morag-jobs worker` runs for each job of the example: it reads the
# downloaded source file ($1) and prints the "transcript" on stdout. A file saying
# CANNOT CONVERT fails with exit code 3, which the worker reports as final (no retries).
set -eu
if grep -q "CANNOT CONVERT" "$1"; then
  echo "unsupported codec in $(basename "$1")" >&2
  exit 3
fi
echo "PROGRESS 50 transcribing" >&2
printf 'transcript of %s: ' "$MORAG_JOB_CONTENT_TYPE"
tr 'a-z' 'A-Z' < "$1"
