"""Local container images (OCI layouts, OCI/docker archives, rootfs dirs) → root filesystems."""

from vmpod.images.resolve import resolve_image
from vmpod.images.source import ImageConfig, ImageSource, resolve_rootfs

__all__ = ["ImageConfig", "ImageSource", "resolve_image", "resolve_rootfs"]
