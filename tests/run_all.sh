#!/usr/bin/env bash
# `npx deno task test`: every test. Most files run in parallel; the isolation tests, which
# time one VM's transfer against another's attack, run alone afterwards so that other test
# files do not take the CPU they measure. Each run is bounded (a hung test must not hold CI).
set -u
cd "$(dirname "$0")/.."
D=./node_modules/.bin/deno
status=0
timeout --signal=INT --kill-after=30s 20m \
  $D test --allow-all --parallel --ignore=tests/integration/isolation_test.ts tests/ "$@" || status=1
timeout --signal=INT --kill-after=30s 5m \
  $D test --allow-all tests/integration/isolation_test.ts "$@" || status=1
exit $status
