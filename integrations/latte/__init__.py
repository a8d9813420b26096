"""Integration with the official latte sample script (not implemented yet; see the README)."""
