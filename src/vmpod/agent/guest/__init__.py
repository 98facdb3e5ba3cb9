"""The guest agent: PID 1 of the guest after /init, serving the host over one channel.

Standard library only, and few imports (no subprocess, selectors, typing,
dataclasses or socket on the hot path): agent start-up is on every cold start
and each such module costs tens of ms to import under TCG.

    main      entry point of the real guest (``/opt/vmpod/agent.py``)
    server    the agent: wires loop, channel, processes and handlers; ``run_agent``
    loop      epoll and fd bookkeeping
    channel   the host link (virtio-serial, vsock, or a connected socket in tests)
    procs     the process table: spawn, stdio relay, stdin credit, reaping, exits
    process   one process and the fds of its stdio
    handlers  one thin ``_op_*`` per protocol op that validates, then ``_do_*``
    bundles   container bundles and the OCI runtime's command lines
    users     user/group names resolved in the container image
    stats     container cgroup (v2) usage
    config    ``AgentConfig``: everything environment-specific
    errors    ``AgentFailure``
    gproc     helper processes without subprocess
    gkernel   kernel log, module names, uptime and memory
"""
