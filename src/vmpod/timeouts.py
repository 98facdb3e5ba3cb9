"""Deadlines that two layers must agree on (standard library only, cheap to import).

A caller that gives up before the layer it waits for has made the thing happen
reports a failure for something that then happens anyway — e.g. `vmpod-runtime
start` timing out while the container starts a moment later. So the outer
deadline is always the inner one plus a margin.
"""

from __future__ import annotations

# Starting a container's process in the guest: the guest runtime (runc: a Go
# program, slow to start under TCG) creates the namespaces, mounts and cgroup.
# Measured 0.7-0.9 s alone; many times that on a host whose cores are shared by
# several multi-vCPU TCG guests.
CONTAINER_START = 120.0
# What the monitor adds around it (a control-socket round trip, hooks excluded).
MONITOR_MARGIN = 15.0
