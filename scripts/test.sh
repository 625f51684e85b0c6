#!/usr/bin/env bash
# Run the test suite (unit tests and integration tests against a real RabbitMQ broker).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh "[test]"
set +e
.venv/bin/python -m pytest "$@"
status=$?
# pytest exits 5 when it collected no tests: a suite that tests nothing has failed.
if [ "$status" -eq 5 ]; then
  echo "fedq: pytest collected no tests; failing" >&2
  status=1
fi
exit "$status"
