"""Model scoring with drift-aware thresholds, explanations and automatic rollback."""

import os

# OpenMP (torch's intra-op pool) reads this once, when torch loads, which in the scorer's process is after this
# package is imported (by ``python -m services.scorer`` and by the runtime loading the service): idle pool
# threads then sleep instead of spinning after every operator. Spinning cost the small model ~0.4 ms of CPU
# per request at 16 requests per batch, on two cores shared with the gRPC threads (bench.runtime; issue #22).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
