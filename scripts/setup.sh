#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for vmpod (idempotent): Debian packages, the
# pinned Python environment in .venv, the guest assets, and an example busybox
# root filesystem in examples/busybox. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    exec ./scripts/as-root "$PWD/scripts/setup.sh" "$@"  # through sudo
fi

APT_PACKAGES=(
    qemu-system-x86      # the VMM (microvm machine, TCG or KVM)
    busybox-static       # example rootfs and test images
    mmdebstrap           # builds the guest root from Debian packages
    erofs-utils          # read-only images for the guest root and container roots
    kmod cpio            # depmod for kernel modules, the initramfs archive
    lz4 xz-utils zstd    # kernel and layer decompressors
    python3-venv
    catatonit            # `vmpod run --init` (a static init bind-mounted as PID 1)
    containernetworking-plugins iptables  # `vmpod run --network bridge` (CNI), podman's networks
    # tests and integrations
    docker-registry skopeo              # a real OCI registry on loopback, pushes
    podman containerd runc              # real clients of vmpod-runtime; runc to compare
    gcc make libc6-dev dwarves          # out-of-tree kernel module builds (pahole: 6.12)
    bubblewrap                          # the sandbox `vmpod matrix` builds modules in
    criu                                # crit/pycriu: `vmpod forensics inspect`; host-side capture
)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# Kernel packages are fetched with apt-get download, so the lists must be fresh.
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Runtime packages, then the test and lint tools (pytest plugins, ruff, mypy): both
# hash-pinned; requirements-dev.in says how requirements-dev.lock is regenerated.
.venv/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
.venv/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

./scripts/busybox-rootfs.sh examples/busybox
.venv/bin/vmpod assets build
