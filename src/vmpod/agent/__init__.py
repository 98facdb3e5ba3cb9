"""Host/guest agent: protocol (shared, stdlib only), client (host), guest/ (the agent
in the VM, stdlib only)."""
