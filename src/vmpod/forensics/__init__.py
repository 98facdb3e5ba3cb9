"""Forensics: capture a running container's process tree (CRIU in its VM) into an
evidence archive, verify the archive, restore it into a fresh isolated VM."""
