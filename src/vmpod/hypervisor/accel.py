"""Choosing the accelerator: KVM only where it really works, TCG everywhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str  # one line shown by `vmpod doctor` and on --verbose


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def probe_kvm(
    dev: Path = Path("/dev/kvm"), cpuinfo: Path = Path("/proc/cpuinfo"), modules: Path = Path("/sys/module")
) -> tuple[bool, str]:
    """(usable, why). Hardware KVM needs the vmx/svm CPU flag, the vendor module and
    a /dev/kvm we may open; a software KVM (e.g. kvm_pvm) fails stock kernels."""
    flags = _cpu_flags(cpuinfo.read_text()) if cpuinfo.exists() else set()
    if not flags & {"vmx", "svm"}:
        soft = [m for m in ("kvm_pvm",) if (modules / m).exists()]
        extra = f"; /dev/kvm is {soft[0]}, a software KVM that cannot boot stock kernels" if soft else ""
        return False, f"CPU has no vmx/svm flag (no hardware virtualization){extra}"
    vendor = "kvm_intel" if "vmx" in flags else "kvm_amd"
    if not (modules / vendor).exists():
        return False, f"CPU supports virtualization but module {vendor} is not loaded"
    if not dev.exists():
        return False, f"{dev} does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, f"{dev} is not readable and writable by this user"
    return True, f"{vendor} loaded and {dev} usable"


def choose_accel(requested: str = "auto") -> AccelChoice:
    """Explicit choices always win; ``auto`` picks KVM only when ``probe_kvm`` says yes."""
    if requested not in ACCELS:
        raise ConfigError(f"unknown accelerator '{requested}'", hint="use auto, kvm or tcg")
    if requested == "kvm":
        return AccelChoice("kvm", "requested with --accel kvm")
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")
    ok, why = probe_kvm()
    return AccelChoice("kvm", why) if ok else AccelChoice("tcg", f"TCG emulation: {why}")
