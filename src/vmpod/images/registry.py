"""OCI distribution registry client: auth, manifests and verified blobs.

Standard library only (urllib): a pull needs a handful of GETs, and the
distribution API's auth dance (401 → token → retry) is small enough to keep
in view. Plain HTTP is used for loopback registries and with ``insecure``;
everything else is HTTPS verified against the system CAs. Every document is
size-limited and time-limited, every blob checked against its digest and
size while it streams, and credentials never follow redirects (blob
downloads are often redirected to object storage).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from vmpod.errors import ImageError
from vmpod.images.blobs import MAX_JSON_BYTES, parse_json, verify_bytes
from vmpod.images.oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Document
from vmpod.images.reference import Reference

ACCEPT = ", ".join(sorted(MANIFEST_TYPES | INDEX_TYPES))
_CHUNK = 1 << 20
_ERROR_BODY_LIMIT = 64 << 10
_DOC_DEADLINE = 60.0  # seconds for a whole manifest/config/token document

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf'[\s,]*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)')


def is_loopback(registry: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (with or without a port)."""
    host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (several challenges may share one)."""
    out = []
    for value in values:
        pos = 0
        while (scheme := _SCHEME_RE.match(value, pos)) is not None:
            pos, params = scheme.end(), {}
            while (param := _PARAM_RE.match(value, pos)) is not None:
                raw = param.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[param.group(1).lower()] = raw
                pos = param.end()
            out.append(Challenge(scheme.group(1).lower(), params))
    return out


def copy_verified(src: IO[bytes], dst: IO[bytes], digest: str, size: int, where: str) -> int:
    """Stream ``src`` to ``dst``, refusing more than ``size`` bytes or a wrong digest."""
    algorithm = digest.partition(":")[0]
    hasher, total = hashlib.new(algorithm), 0
    hint = "the registry sent corrupt data; retry, or check the registry's storage"
    while chunk := src.read(min(_CHUNK, size + 1 - total)):
        total += len(chunk)
        if total > size:
            raise ImageError(f"{where}: more data than its descriptor size {size}", hint=hint)
        hasher.update(chunk)
        try:
            dst.write(chunk)
        except OSError as err:  # a local failure (disk full), not the registry's
            raise ImageError(
                f"cannot store {where}: {err.strerror or err}", hint="free some space in the image store"
            ) from err
    if total != size:
        raise ImageError(f"{where}: got {total} bytes, descriptor size is {size}", hint=hint)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != digest:
        raise ImageError(f"{where}: digest mismatch (expected {digest}, got {actual})", hint=hint)
    return total


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https down to plain http."""

    def __init__(self, allow_http: bool) -> None:
        self._allow_http = allow_http

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if not self._allow_http and not newurl.lower().startswith("https:"):
            raise ImageError(
                f"registry redirected {req.full_url} to insecure {newurl}",
                hint="refusing to leave HTTPS; use --insecure to allow it",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RegistryClient:
    """GETs against one repository of one registry, with token/basic auth on demand."""

    def __init__(
        self,
        ref: Reference,
        *,
        insecure: bool = False,
        creds: tuple[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.ref = ref
        self.timeout = timeout
        self._plain = insecure or is_loopback(ref.registry)
        self._base = f"{'http' if self._plain else 'https'}://{ref.host}/v2/{ref.repository}"
        self._creds = creds
        self._auth = ""  # the Authorization header value once a challenge was answered
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=ssl.create_default_context()),
            _RedirectHandler(self._plain),
        ]
        if is_loopback(ref.registry):
            handlers.append(urllib.request.ProxyHandler({}))  # never proxy loopback
        self._opener = urllib.request.build_opener(*handlers)

    def manifest(self, reference: str, *, digest: str = "", size: int = -1) -> Document:
        """Fetch a manifest by tag or digest; by digest it must match (and ``size``)."""
        label = f"{self.ref.name}@{reference}" if ":" in reference else f"{self.ref.name}:{reference}"
        with self._get(f"/manifests/{reference}", ACCEPT, label, kind="manifest") as resp:
            data = self._read_doc(resp, f"manifest of {label}")
            content_type = resp.headers.get_content_type()
            announced = resp.headers.get("Docker-Content-Digest", "")
        where = f"manifest of {label}"
        if digest:
            verify_bytes(data, digest, size, where)
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if announced.startswith("sha256:") and announced != actual and not digest:
            raise ImageError(
                f"{where}: digest mismatch (registry says {announced}, content is {actual})",
                hint="the registry sent corrupt data",
            )
        return Document(digest or actual, content_type, data)

    def blob_bytes(self, blob: Descriptor) -> bytes:
        """A small blob (the image config), verified and size-limited."""
        where = f"blob {blob.digest} of {self.ref.name}"
        if blob.size > MAX_JSON_BYTES:
            raise ImageError(
                f"{where} is larger than {MAX_JSON_BYTES} bytes",
                hint="this does not look like an image config",
            )
        with self._get(f"/blobs/{blob.digest}", "*/*", f"{self.ref.name}@{blob.digest}") as resp:
            data = self._read_doc(resp, where)
        verify_bytes(data, blob.digest, blob.size, where)
        return data

    def download(self, blob: Descriptor, dst: IO[bytes]) -> int:
        """Stream a blob into ``dst``, verifying size and digest as it goes."""
        where = f"blob {blob.digest} of {self.ref.name}"
        with self._get(f"/blobs/{blob.digest}", "*/*", f"{self.ref.name}@{blob.digest}") as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) != blob.size:
                raise ImageError(
                    f"{where}: registry announces {length} bytes, descriptor size is {blob.size}",
                    hint="the registry or the manifest is corrupt",
                )
            try:
                return copy_verified(resp, dst, blob.digest, blob.size, where)
            except (OSError, http.client.HTTPException) as err:
                raise self._net_error(err) from err

    # -- transport -----------------------------------------------------------

    def _get(self, path: str, accept: str, what: str, *, kind: str = "blob") -> http.client.HTTPResponse:
        for attempt in range(2):
            req = urllib.request.Request(self._base + path, headers={"Accept": accept, "User-Agent": "vmpod"})
            if self._auth:
                req.add_unredirected_header("Authorization", self._auth)
            try:
                resp: http.client.HTTPResponse = self._opener.open(req, timeout=self.timeout)
                return resp
            except urllib.error.HTTPError as err:
                try:
                    challenges = parse_challenges(err.headers.get_all("WWW-Authenticate") or [])
                    if err.code == 401 and attempt == 0 and self._answer(challenges):
                        continue
                    raise self._http_error(err, what, kind) from None
                finally:
                    err.close()
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                raise self._net_error(err) from err
        raise AssertionError("unreachable")

    def _answer(self, challenges: list[Challenge]) -> bool:
        """Set the Authorization header for a 401; False if there is nothing to try."""
        for ch in challenges:
            if ch.scheme == "bearer" and ch.params.get("realm"):
                self._auth = f"Bearer {self._token(ch.params)}"
                return True
        if self._creds and not self._auth and any(ch.scheme == "basic" for ch in challenges):
            self._auth = _basic(self._creds)
            return True
        return False

    def _token(self, params: Mapping[str, str]) -> str:
        realm = params["realm"]
        scheme = urllib.parse.urlsplit(realm).scheme
        realm_host = urllib.parse.urlsplit(realm).netloc
        if scheme != "https" and not (scheme == "http" and (self._plain or is_loopback(realm_host))):
            raise ImageError(
                f"registry {self.ref.registry} sends us to token server {realm!r}",
                hint="refusing a non-HTTPS token server; use --insecure to allow it",
            )
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, headers={"User-Agent": "vmpod"})
        if self._creds:
            req.add_unredirected_header("Authorization", _basic(self._creds))
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                doc = parse_json(self._read_doc(resp, f"token from {realm_host}"), f"token from {realm_host}")
        except urllib.error.HTTPError as err:
            err.close()
            hint = "check --creds / REGISTRY_AUTH" if err.code in (401, 403) else ""
            raise ImageError(
                f"token server {realm_host} refused access to {self.ref.name} (HTTP {err.code})", hint=hint
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise self._net_error(err, realm_host) from err
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ImageError(f"token server {realm_host} sent no token")
        return token

    def _read_doc(self, resp: IO[bytes], where: str) -> bytes:
        deadline = time.monotonic() + _DOC_DEADLINE
        chunks, total = [], 0
        try:
            while chunk := resp.read(min(65536, MAX_JSON_BYTES + 1 - total)):
                total += len(chunk)
                if total > MAX_JSON_BYTES:
                    raise ImageError(
                        f"{where} is larger than {MAX_JSON_BYTES} bytes",
                        hint="this does not look like an image document",
                    )
                if time.monotonic() > deadline:
                    raise ImageError(
                        f"{where}: not received within {_DOC_DEADLINE:g}s",
                        hint="the registry is too slow; retry later",
                    )
                chunks.append(chunk)
        except (OSError, http.client.HTTPException) as err:
            raise self._net_error(err) from err
        return b"".join(chunks)

    def _http_error(self, err: urllib.error.HTTPError, what: str, kind: str) -> ImageError:
        codes, detail = _error_body(err)
        host = self.ref.registry
        if err.code == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}:
            if "NAME_UNKNOWN" in codes:
                return ImageError(f"repository unknown: {self.ref.name} not found")
            return ImageError(
                f"{kind} unknown: {what} not found",
                hint="the registry lost a blob of this image" if kind == "blob" else "",
            )
        if err.code == 401:
            hint = (
                "the credentials were refused"
                if self._creds
                else "pass --creds USER:PASSWORD or set REGISTRY_AUTH"
            )
            return ImageError(f"authentication required by registry {host} for {self.ref.name}", hint=hint)
        if err.code == 403:
            return ImageError(
                f"access to {self.ref.name} denied by registry {host}" + (f": {detail}" if detail else "")
            )
        if err.code == 429:
            return ImageError(f"registry {host}: too many requests", hint="retry later")
        hint = "the registry speaks HTTPS, not plain HTTP" if "HTTPS server" in detail else ""
        return ImageError(
            f"registry {host}: {what}: HTTP {err.code} {err.reason}" + (f": {detail}" if detail else ""),
            hint=hint,
        )

    def _net_error(self, err: BaseException, host: str = "") -> ImageError:
        host = host or self.ref.registry
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, ConnectionRefusedError):
            return ImageError(f"cannot reach registry {host}: connection refused", hint="is it running?")
        if isinstance(reason, socket.gaierror):
            return ImageError(
                f"cannot reach registry {host}: cannot resolve host name",
                hint="check the registry name and DNS",
            )
        if isinstance(reason, TimeoutError):
            return ImageError(
                f"registry {host} did not answer within {self.timeout:g}s",
                hint="is it reachable? retry later",
            )
        if isinstance(reason, ssl.SSLCertVerificationError):
            return ImageError(
                f"TLS certificate of registry {host} is not trusted: {reason.verify_message}",
                hint="install its CA certificate (update-ca-certificates)",
            )
        if isinstance(reason, ssl.SSLError):
            return ImageError(
                f"TLS with registry {host} failed: {reason.reason or reason}",
                hint="a plain-HTTP registry needs --insecure",
            )
        text = (
            reason.strerror
            if isinstance(reason, OSError) and reason.strerror
            else str(reason) or type(reason).__name__
        )
        return ImageError(f"connection to registry {host} failed: {text}")


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _error_body(err: urllib.error.HTTPError) -> tuple[set[str], str]:
    """Error codes and the first message of a distribution-API error body."""
    try:
        data = err.read(_ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        return set(), ""
    try:
        errors = json.loads(data).get("errors")
        codes = {str(e.get("code", "")) for e in errors}
        return codes, str(errors[0].get("message", "")) if errors else ""
    except (ValueError, AttributeError, TypeError):
        return set(), data[:200].decode(errors="replace").strip()
