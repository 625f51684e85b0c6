#!/usr/bin/env bash
# Run the demo federation: a coordinator and ten sites on digits-straggler, on a real RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/fedq demo "$@"
