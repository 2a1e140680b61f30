"""segments stage."""
