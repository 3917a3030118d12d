"""``python -m services.abrouter``: run the abrouter until SIGTERM.

A store that cannot be used at start (unreachable, schema newer than this code) ends the process with
exit code 4 and one line naming the store's host and database (never its password): see
:func:`guardmesh.runtime.serve`.
"""

import sys

from guardmesh.runtime import serve

sys.exit(serve("abrouter"))
