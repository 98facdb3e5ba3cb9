"""`vmpod kernel list|add|rm|info`: the guest kernel catalog."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vmpod.cli.common import guarded, progress
from vmpod.errors import ConfigError
from vmpod.guest.headers import ensure_headers, headers_dir
from vmpod.guest.kernel import (
    add_local,
    aliases_of,
    cached_kernels,
    ensure_kernel,
    kernel_summary,
    load_cached,
    remove,
)
from vmpod.paths import default_paths


@click.group("kernel")
def kernel() -> None:
    """Guest kernels: Debian packages (6.1, 6.12-generic, debian:RELEASE...) or local builds."""


@kernel.command("list")
@guarded
def list_() -> None:
    """Kernels in the catalog."""
    paths = default_paths()
    rows = cached_kernels(paths)
    if not rows:
        click.echo("no kernels yet: `vmpod kernel add 6.1` or the first `vmpod run` adds one")
        return
    click.echo(f"{'ID':<32} {'RELEASE':<28} {'SOURCE':<48} {'PVH':<4} {'HEADERS':<8} NAMES")
    for k in rows:
        source = "local" if k.package == "local" else f"{k.package}"
        click.echo(
            f"{k.id:<32} {k.release:<28} {source:<48} {'yes' if k.pvh else 'no':<4} "
            f"{'yes' if headers_dir(k) else 'no':<8} {','.join(aliases_of(paths, k.id))}"
        )


@kernel.command("add")
@click.argument("name", required=False, default="")
@click.option("--vmlinuz", type=click.Path(path_type=Path), help="A local kernel image.")
@click.option("--modules", type=click.Path(path_type=Path), help="Its lib/modules/RELEASE dir.")
@click.option("--headers", type=click.Path(path_type=Path), help="Its kbuild dir (for modules).")
@click.option("--no-headers", is_flag=True, help="Debian kernels: skip the headers download.")
@guarded
def add(
    name: str, vmlinuz: Path | None, modules: Path | None, headers: Path | None, no_headers: bool
) -> None:
    """Add NAME from Debian packages (with headers), or a local kernel (--vmlinuz,
    --modules [--headers]; NAME then becomes a short name for it)."""
    paths = default_paths()
    if vmlinuz or modules:
        if vmlinuz is None or modules is None:
            raise ConfigError("a local kernel needs both --vmlinuz and --modules")
        k = add_local(paths, vmlinuz, modules, headers, name)
    else:
        if not name:
            raise ConfigError("no kernel given", hint="e.g. vmpod kernel add 6.12-generic")
        progress(f"adding kernel {name}")
        k = ensure_kernel(paths, name)
        if not no_headers:
            progress(f"fetching headers of {k.release}")
            ensure_headers(paths, k)
    click.echo(k.id)


@kernel.command("rm")
@click.argument("name")
@guarded
def rm(name: str) -> None:
    """Remove a kernel (by release or name) from the catalog."""
    click.echo(remove(default_paths(), name))


@kernel.command("info")
@click.argument("name")
@guarded
def info(name: str) -> None:
    """Details of one kernel, as JSON."""
    paths = default_paths()
    k = load_cached(paths, name)
    if k is None:
        raise ConfigError(f"kernel '{name}' is not in the catalog", hint="see 'vmpod kernel list'")
    h = headers_dir(k)
    click.echo(
        json.dumps(
            {
                **kernel_summary(k),
                "id": k.id,
                "names": aliases_of(paths, k.id),
                "boot_image": str(k.boot_image),
                "modules": str(k.modules_dir),
                "headers": str(h) if h else None,
            },
            indent=2,
        )
    )
