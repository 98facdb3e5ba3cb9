"""QEMU driver: devices render their own arguments; the driver runs the process."""
