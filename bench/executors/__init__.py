"""Executors behind one interface (local, slurm, ray)."""
