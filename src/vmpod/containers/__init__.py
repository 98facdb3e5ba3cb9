"""docker-like named containers of `vmpod`: records, rootfs overlays, logs, copies.

A detached or named `vmpod run` container is a vmpod-runtime container (one
state store, one monitor per container) plus a persistent record under the vmpod
home (``<home>/containers/<id>/``). Submodules are imported directly; this
package imports nothing so the monitor can use ``logs`` alone.
"""
