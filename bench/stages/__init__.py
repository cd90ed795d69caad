"""The kinds of job, one registered stage per module (`bench.registry.STAGES`); see `base`."""
