"""Integration with the official opensora_plan sample script (not implemented yet; see the README)."""
