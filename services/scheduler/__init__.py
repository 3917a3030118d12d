"""GPU scheduler: places training jobs by memory, with gang placement, QoS, preemption and leases."""
