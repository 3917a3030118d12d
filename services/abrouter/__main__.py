"""``python -m services.abrouter``: run the abrouter until SIGTERM."""

import sys

from guardmesh.runtime import serve

sys.exit(serve("abrouter"))
