"""qnoded: control daemon for QKD nodes."""

__version__ = "0.1.0"
