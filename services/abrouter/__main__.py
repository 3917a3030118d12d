"""``python -m services.abrouter``: run the abrouter until SIGTERM.

A store that cannot be used at start (unreachable, schema newer than this code) ends the process with
exit code 4 and one line naming the store's host and database (never its password).
"""

import sys

from guardmesh.durable import StoreError
from guardmesh.runtime import serve

try:
    sys.exit(serve("abrouter"))
except StoreError as exc:
    print(f"guardmesh abrouter: {exc}", file=sys.stderr)
    sys.exit(4)
