"""Integration with the official wan sample script (not implemented yet; see the README)."""
