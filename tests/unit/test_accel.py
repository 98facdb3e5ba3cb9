"""Accelerator choice: KVM only where hardware KVM really works, explicit wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmpod.errors import ConfigError
from vmpod.hypervisor import accel
from vmpod.hypervisor.accel import AccelChoice, choose_accel, probe_kvm

NO_VIRT = "fpu vme de pse tsc msr pae sse sse2 hypervisor"


def cpuinfo(tmp_path: Path, flags: str, *, extra: str = "") -> Path:
    f = tmp_path / "cpuinfo"
    f.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Fake CPU\n"
        f"flags\t\t: {flags}\n{extra}bugs\t\t: spectre_v1\n\n"
        "processor\t: 1\n"
        f"flags\t\t: {flags}\n"
    )
    return f


def setup(tmp_path: Path, flags: str, modules: tuple[str, ...] = (), dev: bool = True) -> dict[str, Path]:
    mods = tmp_path / "module"
    mods.mkdir()
    for m in modules:
        (mods / m).mkdir()
    kvm = tmp_path / "kvm"
    if dev:
        kvm.write_bytes(b"")
        kvm.chmod(0o666)
    return {"dev": kvm, "cpuinfo": cpuinfo(tmp_path, flags), "modules": mods}


def test_no_vmx_with_software_kvm_module(tmp_path: Path) -> None:
    ok, why = probe_kvm(**setup(tmp_path, NO_VIRT, ("kvm", "kvm_pvm")))
    assert ok is False
    assert "no vmx/svm" in why
    assert "kvm_pvm" in why
    assert "software KVM" in why


def test_no_vmx_without_software_kvm(tmp_path: Path) -> None:
    ok, why = probe_kvm(**setup(tmp_path, NO_VIRT, ("kvm",)))
    assert ok is False
    assert "no vmx/svm" in why
    assert "kvm_pvm" not in why


def test_vmx_flags_line_is_not_the_flags_line(tmp_path: Path) -> None:
    # modern kernels print a separate "vmx flags" line; only "flags" counts
    paths = setup(tmp_path, NO_VIRT, ("kvm_intel",))
    paths["cpuinfo"].write_text(f"vmx flags\t: vnmi ept vpid\nflags\t\t: {NO_VIRT}\n")
    assert probe_kvm(**paths)[0] is False


def test_missing_cpuinfo_means_no_kvm(tmp_path: Path) -> None:
    paths = setup(tmp_path, "vmx", ("kvm_intel",))
    paths["cpuinfo"].unlink()
    ok, why = probe_kvm(**paths)
    assert ok is False and "no vmx/svm" in why


def test_vmx_with_kvm_intel_and_rw_dev_is_usable(tmp_path: Path) -> None:
    paths = setup(tmp_path, NO_VIRT + " vmx ept", ("kvm", "kvm_intel"))
    ok, why = probe_kvm(**paths)
    assert ok is True
    assert why == f"kvm_intel loaded and {paths['dev']} usable"


def test_svm_with_kvm_amd_is_usable(tmp_path: Path) -> None:
    ok, why = probe_kvm(**setup(tmp_path, NO_VIRT + " svm", ("kvm", "kvm_amd")))
    assert ok is True
    assert why.startswith("kvm_amd loaded")


def test_vmx_without_vendor_module_not_usable(tmp_path: Path) -> None:
    # kvm_amd loaded does not help an Intel CPU
    ok, why = probe_kvm(**setup(tmp_path, NO_VIRT + " vmx", ("kvm", "kvm_amd", "kvm_pvm")))
    assert ok is False
    assert "kvm_intel is not loaded" in why


def test_vmx_without_dev_not_usable(tmp_path: Path) -> None:
    paths = setup(tmp_path, "vmx", ("kvm_intel",), dev=False)
    ok, why = probe_kvm(**paths)
    assert ok is False
    assert why == f"{paths['dev']} does not exist"


def test_vmx_with_unwritable_dev_not_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = setup(tmp_path, "vmx", ("kvm_intel",))
    asked = []

    def access(path: object, mode: int) -> bool:  # root may open anything: fake it
        asked.append((Path(str(path)), mode))
        return False

    monkeypatch.setattr(os, "access", access)  # accel calls os.access
    ok, why = probe_kvm(**paths)
    assert asked == [(paths["dev"], os.R_OK | os.W_OK)]
    assert ok is False and "not readable and writable" in why


@pytest.mark.parametrize("requested", ["kvm", "tcg"])
def test_explicit_choice_always_wins(monkeypatch: pytest.MonkeyPatch, requested: str) -> None:
    def boom(*a: object, **k: object) -> tuple[bool, str]:
        raise AssertionError("probe must not run for an explicit choice")

    monkeypatch.setattr(accel, "probe_kvm", boom)
    choice = choose_accel(requested)
    assert choice == AccelChoice(requested, f"requested with --accel {requested}")


def test_auto_picks_kvm_when_probe_says_yes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "probe_kvm", lambda: (True, "kvm_intel loaded"))
    assert choose_accel() == AccelChoice("kvm", "kvm_intel loaded")
    assert choose_accel("auto").accel == "kvm"


def test_auto_falls_back_to_tcg_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "probe_kvm", lambda: (False, "CPU has no vmx/svm flag"))
    assert choose_accel("auto") == AccelChoice("tcg", "TCG emulation: CPU has no vmx/svm flag")


@pytest.mark.parametrize("requested", ["KVM", "hvf", "", "kvm ", "whpx", "tcg,thread=multi"])
def test_invalid_accel_is_config_error(requested: str) -> None:
    with pytest.raises(ConfigError, match="unknown accelerator") as info:
        choose_accel(requested)
    assert "auto, kvm or tcg" in info.value.hint
