#!/usr/bin/env bash
# Run the test suite (unit tests and integration tests against a real RabbitMQ broker).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh "[test]"
set +e
# Most integration tests wait on the broker, on timers and on worker processes rather than on the
# CPU: three test processes on two cores took the suite from 911-955 s to 396 s. FEDQ_TEST_WORKERS=0
# runs it in one process. loadgroup keeps the tests of an xdist_group (tests/test_cluster.py's) in one
# process, so they share what their module fixture starts.
.venv/bin/python -m pytest -n "${FEDQ_TEST_WORKERS:-3}" --dist loadgroup "$@"
status=$?
# pytest exits 5 when it collected no tests: a suite that tests nothing has failed.
if [ "$status" -eq 5 ]; then
  echo "fedq: pytest collected no tests; failing" >&2
  status=1
fi
exit "$status"
