"""Image references (``[REGISTRY/]NAME[:TAG][@DIGEST]``), parsed and normalised like docker.

Kept apart from the registry client so that telling a registry reference from a
local path (``resolve.registry_reference``) does not load urllib and ssl.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmpod.errors import ImageError
from vmpod.images.blobs import check_digest_format

DEFAULT_REGISTRY = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"  # docker.io's API endpoint

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = (
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:]+\])"
    r"(?::[0-9]+)?"
)
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_RE = re.compile(_DOMAIN)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")


def is_registry_name(text: str) -> bool:
    """True if ``text`` is a registry host[:port] as references spell it."""
    return bool(_DOMAIN_RE.fullmatch(text))


@dataclass(frozen=True)
class Reference:
    """``registry/repository[:tag][@digest]``, normalised like docker does."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def host(self) -> str:
        """Where the registry API answers (docker.io's lives elsewhere)."""
        return _DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """Parse ``[REGISTRY/]NAME[:TAG][@DIGEST]``; no registry means docker.io."""
    hint = "expected REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST"
    rest, _, digest = text.partition("@")
    if digest:
        check_digest_format(digest, f"image reference {text!r}")
    name, tag = rest, ""
    slash = rest.rfind("/")
    if ":" in rest[slash + 1 :]:
        name, _, tag = rest.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise ImageError(f"invalid tag {tag!r} in image reference {text!r}", hint=hint)
    first, sep, remainder = name.partition("/")
    # docker's rule: the first component is a registry if it looks like a host.
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        registry, repository = first, remainder
        if not _DOMAIN_RE.fullmatch(registry):
            raise ImageError(f"invalid registry {registry!r} in image reference {text!r}", hint=hint)
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPO_RE.fullmatch(repository) or len(repository) > 255:
        raise ImageError(
            f"invalid repository name in image reference {text!r}", hint=hint + " (names are lower case)"
        )
    return Reference(registry, repository, tag if tag or digest else "latest", digest)
