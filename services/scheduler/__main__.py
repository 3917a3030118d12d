"""``python -m services.scheduler``: run the scheduler service until SIGTERM."""

import sys

from guardmesh.runtime import serve

sys.exit(serve("scheduler"))
