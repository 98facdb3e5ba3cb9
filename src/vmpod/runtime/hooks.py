"""OCI hooks, run on the host with the container's state JSON on stdin.

When they run (runtime spec "Lifecycle"; hooks meant for the container's
namespaces run on the host too, since the container lives in another kernel):

- ``prestart``, ``createRuntime``, ``createContainer``: in ``create``, once the
  VM is up and the container prepared; a failure fails ``create`` and destroys
  the container (then ``poststop`` runs).
- ``startContainer``: in ``start``, before the process runs; a failure stops it.
- ``poststart``: in ``start``, after the process runs; a failure is a warning.
- ``poststop``: in ``delete``, after everything is gone; a failure is a warning.
"""

from __future__ import annotations

import json
import logging
import subprocess

from vmpod.runtime.errors import RuntimeCliError

log = logging.getLogger(__name__)
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
_OUTPUT_TAIL = 500


class HookError(RuntimeCliError):
    pass


def validate_hooks(value: object) -> dict[str, list[dict[str, object]]]:
    """The spec's ``hooks`` object, checked (paths absolute, timeouts positive)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RuntimeCliError("config.json: hooks must be an object")
    out: dict[str, list[dict[str, object]]] = {}
    for kind, hooks in value.items():
        if kind not in HOOK_KINDS:
            raise RuntimeCliError(f"config.json: unknown hook kind {kind!r}")
        if not isinstance(hooks, list):
            raise RuntimeCliError(f"config.json: hooks.{kind} must be a list")
        checked = []
        for i, hook in enumerate(hooks):
            where = f"config.json: hooks.{kind}[{i}]"
            if not isinstance(hook, dict):
                raise RuntimeCliError(f"{where} must be an object")
            path = hook.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise RuntimeCliError(f"{where}.path must be an absolute path")
            for key in ("args", "env"):
                if key in hook and not (
                    isinstance(hook[key], list) and all(isinstance(a, str) for a in hook[key])
                ):
                    raise RuntimeCliError(f"{where}.{key} must be a list of strings")
            timeout = hook.get("timeout")
            if timeout is not None and (
                not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0
            ):
                raise RuntimeCliError(f"{where}.timeout must be a positive integer")
            checked.append({k: hook[k] for k in ("path", "args", "env", "timeout") if k in hook})
        if checked:
            out[kind] = checked
    return out


def _tail(data: bytes) -> str:
    return data.decode(errors="replace").strip()[-_OUTPUT_TAIL:]


def run_hooks(hooks: dict[str, list[dict[str, object]]], kind: str, state: dict[str, object]) -> None:
    """Run every ``kind`` hook in order; the first failure raises HookError."""
    payload = json.dumps(state).encode()
    for i, hook in enumerate(hooks.get(kind, [])):
        path = str(hook["path"])
        args = [str(a) for a in hook.get("args") or [path]]  # type: ignore[attr-defined]
        env = None
        if "env" in hook:
            env = dict(e.partition("=")[::2] for e in hook["env"])  # type: ignore[attr-defined]
        timeout = hook.get("timeout")
        what = f"{kind} hook #{i} ({path})"
        log.debug("running %s", what)
        try:
            proc = subprocess.run(
                args,
                executable=path,
                env=env,
                input=payload,
                capture_output=True,
                check=False,
                timeout=float(timeout) if isinstance(timeout, int) else None,
            )
        except subprocess.TimeoutExpired:
            raise HookError(f"error running {what}: timed out after {timeout}s") from None
        except OSError as err:
            raise HookError(f"error running {what}: {err.strerror}") from err
        if proc.returncode != 0:
            detail = _tail(proc.stderr) or _tail(proc.stdout)
            status = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            raise HookError(f"error running {what}: {status}" + (f": {detail}" if detail else ""))


def run_hooks_warn(hooks: dict[str, list[dict[str, object]]], kind: str, state: dict[str, object]) -> None:
    """poststart/poststop: a failure is logged as a warning and the rest still run."""
    for i, hook in enumerate(hooks.get(kind, [])):
        try:
            run_hooks({kind: [hook]}, kind, state)
        except HookError as err:
            log.warning("%s", str(err).replace(f"{kind} hook #0", f"{kind} hook #{i}"))
