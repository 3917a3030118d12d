"""The four guardmesh services; each is a thin gRPC shell (``server.py``) around a pure core."""
