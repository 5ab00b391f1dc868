"""Training: config, losses, regularisers, samplers, the loop, checkpoints, sweeps."""
