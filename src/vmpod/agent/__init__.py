"""Host/guest agent: protocol (shared, stdlib only), client (host), server (guest)."""
