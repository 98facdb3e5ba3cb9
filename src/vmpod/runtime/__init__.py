"""`vmpod-runtime`: a runc-compatible OCI runtime that runs each container in its own VM.

``cli`` (and ``execcmd``) parse runc's command line; ``state`` keeps one
directory per container under ``--root``; ``bundle`` turns a bundle's
config.json into what the guest runs and how big the VM is (read its docstring
for what does not reach the VM: directory volumes, host namespaces);
``lifecycle`` does create/start/delete with the ``hooks``; ``monitor`` is the
per-container process that owns the VM and relays stdio (``relay``, and
``execs`` for exec'd processes); ``ipc`` is how commands talk to it; ``config``
reads /etc/vmpod/runtime.json; ``specgen`` writes `spec` and `features`.
"""
