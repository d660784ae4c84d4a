"""Retrieval evaluation: methods, extraction, search, metrics and the harness."""
