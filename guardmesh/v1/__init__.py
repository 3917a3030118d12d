"""Generated protobuf and gRPC code for the ``guardmesh.v1`` API (from ``protos/``; not committed)."""
