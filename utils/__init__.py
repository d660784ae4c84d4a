"""Small shared helpers for the command-line entry points."""
