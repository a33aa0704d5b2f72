"""Simulated backends: the physics of a QKD link, seeded and reproducible."""
