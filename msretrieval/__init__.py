"""The import name of every package of this repository: ``msretrieval.models``, ``msretrieval.data``,
``msretrieval.retrieval``... so a downstream project's own ``utils``, ``models`` or ``data`` never collide with them.

The packages stay where the design puts them, at the repository root (``models/``, ``data/``, ``training/``...,
beside ``train.py``). In a checkout this package's search path is extended with that root, so
``import msretrieval.models`` finds ``models/`` with nothing installed; an installed wheel holds them under
``msretrieval/`` (``pyproject.toml`` maps each one), so the names are the same either way.
"""
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# a checkout (not site-packages): the root holds this repository's own files
if (_ROOT / "hubconf.py").is_file() and (_ROOT / "models" / "retrieval_net.py").is_file():
    if str(_ROOT) not in __path__:
        __path__.append(str(_ROOT))
