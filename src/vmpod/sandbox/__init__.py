"""Sandbox (one VM per pod) and container lifecycle."""
