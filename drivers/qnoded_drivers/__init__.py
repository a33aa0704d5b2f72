"""Drivers shipped with qnoded (simulated and real I/O)."""
