#!/usr/bin/env bash
# `npx deno task test`: every test. Most files run in parallel; the files in SERIAL run alone
# afterwards, one at a time: the isolation tests time one VM's transfer against another's
# attack, and the hostile front-end tests race reconnects against the back end's accept
# loop, so other test files must not take the CPU they depend on. Each run is bounded (a
# hung test must not hold CI).
set -u
cd "$(dirname "$0")/.."
D=./node_modules/.bin/deno
status=0
SERIAL="tests/integration/isolation_test.ts,tests/integration/hostile_front_end_test.ts"
timeout --signal=INT --kill-after=30s 20m \
  $D test --allow-all --parallel --ignore="$SERIAL" tests/ "$@" || status=1
timeout --signal=INT --kill-after=30s 5m \
  $D test --allow-all ${SERIAL//,/ } "$@" || status=1
exit $status
