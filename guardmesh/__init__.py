"""guardmesh: a mesh of gRPC services guarding the ML iteration chain.

The package holds what every service stands on (configuration, logging, tracing, errors, discovery, the
server runtime and the client factory), the generated contracts in ``guardmesh.v1`` and the Python SDK.
"""

__version__ = "0.1.0"
