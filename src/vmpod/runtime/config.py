"""The runtime's own configuration: /etc/vmpod/runtime.json (``VMPOD_RUNTIME_CONFIG``).

Every key is optional::

    {
      "kernel": "6.1",                         # guest kernel of every VM
      "kernels": ["6.1", "6.12"],              # what org.vmpod.kernel may ask for
      "enable_annotations": ["org.vmpod.kernel",    # annotations containers may use
                             "org.vmpod.kernel_modules"],
      "accel": "auto",                          # auto | kvm | tcg
      "guest_runtime": "runc",                  # runc | crun inside the VM
      "boot_timeout": 60
    }

Annotations are how an untrusted pod spec reaches the host, so none is honoured
unless listed in ``enable_annotations`` (Kata's rule); a container that uses an
``org.vmpod.*`` annotation that is not enabled is refused, not silently run
with defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.jsonsafe import parse_json
from vmpod.runtime.errors import RuntimeCliError

CONFIG_PATH = "/etc/vmpod/runtime.json"
ANNOTATION_KERNEL = "org.vmpod.kernel"
# "NAME[=p1=v1 p2=v2];NAME2": modules of the guest kernel loaded before the
# container starts (like `vmpod run --kernel-module`)
ANNOTATION_MODULES = "org.vmpod.kernel_modules"
KNOWN_ANNOTATIONS = (ANNOTATION_KERNEL, ANNOTATION_MODULES)


@dataclass(frozen=True)
class RuntimeConfig:
    kernel: str = DEFAULT_KERNEL
    kernels: tuple[str, ...] = ("6.1", "6.1-generic", "6.12", "6.12-generic")
    enable_annotations: tuple[str, ...] = ()
    accel: str = "auto"
    guest_runtime: str = "runc"
    boot_timeout: float = 60.0
    source: str = ""  # the file it came from ("" = built-in defaults)


def config_path() -> str:
    return os.environ.get("VMPOD_RUNTIME_CONFIG", CONFIG_PATH)


def load_config(path: str | None = None) -> RuntimeConfig:
    path = path or config_path()
    try:
        with open(path) as fh:
            data = parse_json(fh.read())
    except FileNotFoundError:
        return RuntimeConfig()
    except (OSError, ValueError) as err:
        raise RuntimeCliError(f"cannot read {path}: {err}") from err
    return parse_config(data, path)


def parse_config(data: object, path: str) -> RuntimeConfig:
    if not isinstance(data, dict):
        raise RuntimeCliError(f"{path}: expected a JSON object")
    known = {f.name for f in fields(RuntimeConfig)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RuntimeCliError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    values: dict[str, object] = {"source": path}
    for key, value in data.items():
        if key in ("kernels", "enable_annotations"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RuntimeCliError(f"{path}: {key} must be a list of strings")
            values[key] = tuple(value)
        elif key == "boot_timeout":
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise RuntimeCliError(f"{path}: boot_timeout must be a positive number")
            values[key] = float(value)
        elif not isinstance(value, str) or not value:
            raise RuntimeCliError(f"{path}: {key} must be a non-empty string")
        else:
            values[key] = value
    cfg = RuntimeConfig(**values)  # type: ignore[arg-type]
    if cfg.accel not in ("auto", "kvm", "tcg"):
        raise RuntimeCliError(f"{path}: accel must be auto, kvm or tcg")
    if cfg.guest_runtime not in ("runc", "crun"):
        raise RuntimeCliError(f"{path}: guest_runtime must be runc or crun")
    for name in cfg.enable_annotations:
        if name not in KNOWN_ANNOTATIONS:
            raise RuntimeCliError(
                f"{path}: unknown annotation {name!r} in enable_annotations "
                f"(known: {', '.join(KNOWN_ANNOTATIONS)})"
            )
    return cfg
