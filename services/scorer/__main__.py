"""``python -m services.scorer``: run the scorer until SIGTERM."""

import sys

from guardmesh.runtime import serve

sys.exit(serve("scorer"))
