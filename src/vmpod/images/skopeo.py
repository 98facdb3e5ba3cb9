"""Running skopeo for registry pulls: one deadline, bounded output, nothing left behind.

skopeo (containers/image) speaks the distribution API, follows the user's
containers conventions (auth.json / docker config.json scoped per registry,
policy.json, registries.conf) and verifies what it copies. What it does not
bound is ours to bound: every command runs in a process group of its own
under a wall-clock deadline (``--command-timeout`` too, so skopeo gives up
cleanly first), its output is capped while it is read, an optional watcher
may abort it (e.g. when it reads or writes more than a layer's declared
size), and on any way out (error, timeout, Ctrl-C, SIGTERM turned into an
exception) the whole group is killed and reaped.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import ConfigError, ImageError
from vmpod.images.reference import Reference
from vmpod.proc import die_with_parent

PULL_TIMEOUT_ENV = "VMPOD_PULL_TIMEOUT"
DEFAULT_PULL_TIMEOUT = 3600.0  # seconds for a whole pull, however the registry behaves
_STDERR_TAIL = 16 << 10
_POLL = 0.2  # how often a watcher runs while skopeo copies

Watcher = Callable[[int], None]  # called with skopeo's pid while it runs


def pull_timeout() -> float:
    """The overall deadline of one pull in seconds: ``VMPOD_PULL_TIMEOUT`` or one hour."""
    raw = os.environ.get(PULL_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_PULL_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise ConfigError(
            f"{PULL_TIMEOUT_ENV}={raw!r} is not a number of seconds", hint="e.g. VMPOD_PULL_TIMEOUT=600"
        )
    return value


@dataclass(frozen=True)
class Access:
    """How to reach one registry: TLS verification and the credentials meant for it."""

    registry: str  # host[:port] as in the reference; credentials are scoped to it
    tls_verify: bool = True
    creds: tuple[str, str] | None = None


def write_authfile(path: Path, access: Access) -> None:
    """An auth.json naming only ``access.registry``: skopeo sends nothing to any other."""
    import base64

    assert access.creds is not None
    token = base64.b64encode(":".join(access.creds).encode()).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {access.registry: {"auth": token}}}, f)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: str


class Deadline:
    """A monotonic deadline shared by every skopeo command of one pull."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class SkopeoTimeout(ImageError):
    """skopeo did not finish before its deadline (killed)."""


def skopeo_path() -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        raise ImageError(
            "registry pulls need skopeo, which is not installed", hint="install it: apt-get install skopeo"
        )
    return exe


def run_skopeo(
    args: list[str],
    *,
    timeout: float,
    stdout_limit: int,
    too_much: Callable[[], ImageError],
    watch: Watcher | None = None,
    https_only: bool = False,
) -> Result:
    """Run ``skopeo ARGS`` for at most ``timeout`` seconds; raise on a non-zero exit.

    stdout beyond ``stdout_limit`` bytes raises ``too_much()``; ``watch`` is
    called every few hundred milliseconds and may raise to abort the run.
    ``https_only`` makes every plain-HTTP request fail (a redirect from HTTPS
    down to HTTP, a token server on plain HTTP): skopeo has no switch for it,
    so plain HTTP goes to a proxy that is not there. The exit status is not
    checked here: callers turn stderr into a message.
    """
    if timeout <= 0:
        raise SkopeoTimeout("pull deadline passed")
    # --command-timeout lets skopeo stop by itself; our own kill backs it up.
    argv = [skopeo_path(), f"--command-timeout={max(1, int(timeout))}s", *args]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # not in the user's group; killed as a group below
        preexec_fn=die_with_parent,
        close_fds=True,
        env=_env(https_only),
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    end = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map():
                left = end - time.monotonic()
                if left <= 0:
                    raise SkopeoTimeout(f"skopeo {args[0]} did not finish within {timeout:g}s")
                for key, _ in sel.select(min(left, _POLL)):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf: bytearray = key.data
                    buf += chunk
                    if buf is out and len(out) > stdout_limit:
                        raise too_much()
                    if buf is err and len(err) > 2 * _STDERR_TAIL:
                        del err[:-_STDERR_TAIL]
                if watch is not None:
                    watch(proc.pid)
        left = max(end - time.monotonic(), 0.01)
        try:
            proc.wait(left)
        except subprocess.TimeoutExpired as exc:
            raise SkopeoTimeout(f"skopeo {args[0]} did not finish within {timeout:g}s") from exc
    finally:
        _kill_group(proc)
    return Result(proc.returncode, bytes(out), err[-_STDERR_TAIL:].decode(errors="replace"))


def bytes_read(pid: int) -> int:
    """How much a process has read so far (network included): ``rchar`` of /proc/PID/io."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill skopeo and anything it started, then reap it and close its pipes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _env(https_only: bool) -> dict[str, str]:
    env = dict(os.environ)
    # A stray debug setting must not print credentials or flood our capped stderr.
    for key in ("SKOPEO_DEBUG", "GODEBUG"):
        env.pop(key, None)
    if https_only:
        # Go's client sends http:// requests through $HTTP_PROXY (https:// ones through
        # $HTTPS_PROXY, left alone); port 9 on loopback refuses them, so nothing, and no
        # credential, ever leaves HTTPS. (Go never proxies loopback targets.)
        env["HTTP_PROXY"] = env["http_proxy"] = NO_PLAIN_HTTP
    return env


NO_PLAIN_HTTP = "http://127.0.0.1:9"


# -- skopeo's errors as one line --------------------------------------------------

_MSG_RE = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
_PREFIX_RE = re.compile(r'^(?:Error parsing image name|initializing source|reading manifest) "?[^"]*"?: ')


def fatal_message(stderr: str) -> str:
    """The text of skopeo's last ``level=fatal`` line (Go-unquoted), else its last line."""
    found = _MSG_RE.findall(stderr)
    if found:
        text = re.sub(r"\\(.)", r"\1", found[-1])
    else:
        lines = [line for line in stderr.splitlines() if line.strip()]
        text = lines[-1] if lines else "no output"
    text = _PREFIX_RE.sub("", text)
    return " ".join(text.split())  # one line, whatever the registry put in its error


def explain(stderr: str, ref: Reference, label: str, kind: str, *, has_creds: bool) -> ImageError:
    """Turn a failed skopeo run into one line that says what to do."""
    text = fatal_message(stderr)
    low = text.lower()
    host = ref.registry
    if "proxyconnect" in low and NO_PLAIN_HTTP.removeprefix("http://") in low:
        return ImageError(
            f"registry {host} sends us to plain HTTP ({_first_url(text)})",
            hint="refusing to leave HTTPS; use --insecure to allow it",
        )
    if "unsupported protocol scheme" in low:
        return ImageError(
            f"registry {host} redirects {label} to {_first_url(text, any_scheme=True)}",
            hint="refusing a redirect that is not HTTP(S)",
        )
    if "stopped after" in low and "redirects" in low:
        return ImageError(
            f"registry {host} redirects {label} in a loop", hint="the registry is misconfigured"
        )
    if "too many 1xx" in low:
        return ImageError(
            f"registry {host} answers {label} with endless interim (1xx) responses",
            hint="the registry is misbehaving",
        )
    if "connection refused" in low:
        return ImageError(f"cannot reach registry {host}: connection refused", hint="is it running?")
    if "no such host" in low or "server misbehaving" in low:
        return ImageError(
            f"cannot reach registry {host}: cannot resolve host name", hint="check the registry name and DNS"
        )
    if "unable to retrieve auth token" in low:
        return ImageError(
            f"the token server of registry {host} refused access to {ref.name}",
            hint="check --creds / REGISTRY_AUTH" if has_creds else "pass --creds USER:PASSWORD",
        )
    if "name unknown" in low or "name_unknown" in low:
        return ImageError(f"repository unknown: {ref.name} not found")
    if "manifest unknown" in low or "manifest_unknown" in low:
        return ImageError(f"manifest unknown: {label} not found")
    if "blob unknown" in low or "blob_unknown" in low:
        return ImageError(f"blob unknown: {label} not found", hint="the registry lost a blob of this image")
    if "unauthorized" in low or "authentication required" in low:
        if has_creds:
            return ImageError(
                f"authentication required by registry {host} for {ref.name}",
                hint="the credentials were refused",
            )
        return ImageError(
            f"authentication required by registry {host} for {ref.name}",
            hint="pass --creds USER:PASSWORD or set REGISTRY_AUTH=REGISTRY=USER:PASSWORD",
        )
    if "denied" in low:
        return ImageError(f"access to {ref.name} denied by registry {host}: {text}")
    if "toomanyrequests" in low or "too many requests" in low:
        return ImageError(f"registry {host}: too many requests", hint="retry later")
    if "x509" in low or "certificate" in low:
        return ImageError(
            f"TLS certificate of registry {host} is not trusted: {text}",
            hint="install its CA certificate (update-ca-certificates), or use --insecure",
        )
    if "http response to https client" in low:
        return ImageError(
            f"registry {host} speaks plain HTTP, not HTTPS", hint="use --insecure for this registry"
        )
    if "digest" in low and ("mismatch" in low or "not match" in low):
        pair = re.search(r"expected (\S+?),? got (\S+)", text)
        detail = f"expected {pair.group(1)}, got {pair.group(2)}" if pair else text
        return ImageError(f"{label}: digest mismatch ({detail})", hint="the registry sent corrupt data")
    if "exceeded maximum allowed size" in low:
        size = re.search(r"size of (\d+)", text)
        return ImageError(
            f"{kind} {label} is larger than {size.group(1) if size else 'the allowed'} bytes",
            hint="this does not look like an image document",
        )
    if "no space left" in low:
        return ImageError(f"cannot store {label}: no space left on device", hint="free some space")
    return ImageError(f"registry {host}: {kind} {label}: {text}")


def _first_url(text: str, *, any_scheme: bool = False) -> str:
    found = re.search(r'"([a-z][a-z0-9+.-]*://[^"?]*)' if any_scheme else r'"(https?://[^"?]*)', text)
    return found.group(1) if found else "another URL"
