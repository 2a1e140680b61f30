"""portrait stage."""
