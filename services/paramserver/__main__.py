"""``python -m services.paramserver``: run one parameter-server shard until SIGTERM."""

import os
import sys

# OpenMP reads this once, when the native kernels load: idle worker threads sleep instead of spinning, so a
# busy machine does not make every threaded aggregation wait for a spinning thread to be descheduled.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from guardmesh.runtime import serve

sys.exit(serve("paramserver"))
