"""vmpod: containers that each run inside their own lightweight virtual machine."""

__version__ = "0.1.0"
