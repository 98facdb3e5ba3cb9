"""vmpod's settings file: today only the cache size cap.

    $VMPOD_CONFIG, else /etc/vmpod/vmpod.toml (a missing file means defaults):

        [cache]
        max_bytes = "20G"     # or a number of bytes; 0 or absent: no cap

``VMPOD_CACHE_MAX_BYTES`` (same syntax) overrides the file. Past the cap, the
least recently used derived cache entries that nothing uses (image trees, erofs
disks) are evicted when a new one is added (storage/cache.py).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/vmpod/vmpod.toml")
CONFIG_ENV = "VMPOD_CONFIG"
CAP_ENV = "VMPOD_CACHE_MAX_BYTES"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


@dataclass(frozen=True)
class CacheSettings:
    max_bytes: int = 0  # 0: no cap


def parse_size(value: object, where: str) -> int:
    """``1048576``, ``"512M"``, ``"20G"``, ``"1GiB"`` -> bytes (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            f"{where}: invalid size {value!r}", hint="give bytes or a number with K, M, G or T, e.g. 20G"
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_cache_settings() -> CacheSettings:
    """The cache settings: the config file, then the environment override."""
    path = config_path()
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        doc = {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"cannot read the config file {path}: {err}", hint=f"fix it or set {CONFIG_ENV}"
        ) from err
    cache = doc.get("cache", {})
    if not isinstance(cache, dict):
        raise ConfigError(f"{path}: [cache] must be a table")
    if unknown := sorted(set(cache) - {"max_bytes"}):
        raise ConfigError(f"{path}: unknown setting cache.{unknown[0]}", hint="known: cache.max_bytes")
    max_bytes = parse_size(cache.get("max_bytes", 0), f"{path}: cache.max_bytes")
    if env := os.environ.get(CAP_ENV, "").strip():
        max_bytes = parse_size(env, CAP_ENV)
    return CacheSettings(max_bytes=max_bytes)
