"""Hypervisors: a small interface and one driver module per VMM."""
