"""Guest assets: kernels, the initramfs and the read-only guest root image."""
