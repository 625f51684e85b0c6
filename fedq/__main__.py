"""``python -m fedq``: the ``fedq`` command, for environments where the script is not on PATH."""

import sys

from fedq.cli import main

sys.exit(main())
