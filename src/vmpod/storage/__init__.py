"""How a container's root filesystem reaches the guest."""
