"""The Python SDK for trainers and applications: typed clients over the mesh's client factory."""
