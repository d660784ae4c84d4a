"""Command-line entry points (``python scripts/NAME.py``); installed, ``msretrieval.scripts``, whose ``cli``
functions are the console commands of ``pyproject.toml``. No library code lives here."""
