"""Generated code of the Open Inference Protocol (KServe v2) gRPC contract, from protos/inference/."""
