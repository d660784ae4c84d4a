"""The Revisited Oxford / Paris layout (``revisitop``), for any set name.

``DATA_ROOT/<name>/gnd_<name>.pkl`` holds a dict with ``imlist`` (database image names), ``qimlist``
(query image names) and ``gnd`` (one dict per query: ``bbx`` = [x1, y1, x2, y2] in the query image, and
``easy`` / ``hard`` / ``junk`` index lists into ``imlist``). Images are ``DATA_ROOT/<name>/jpg/<name>.jpg``.
Queries are cropped to ``bbx`` before any resizing (forgetting it is the most common evaluation bug), and the
crop keeps the scale of its full image (:mod:`data.transforms`). :meth:`RevisitopSet.labelled_images` labels
the images by landmark, for fitting methods on a revisitop set other than the one evaluated.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msretrieval.utils.errors import UserError

from .manifest import LabelledImageSet

PROTOCOLS = ("easy", "medium", "hard")


class RevisitopError(UserError):
    """The ground-truth file is missing or malformed."""


#: the only globals a ground-truth pickle may name: NumPy arrays, scalars and dtypes (plain containers and
#: numbers need no global). Anything else - os.system, builtins.eval, a class with __reduce__ - is refused.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and NumPy arrays only: a downloaded .pkl cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: ground truth holds only lists, dicts, "
                                     f"numbers and arrays")


def load_ground_truth_pickle(path: Path) -> object:
    """``pickle.load`` restricted to data (see :class:`_GroundTruthUnpickler`)."""
    with path.open("rb") as handle:
        return _GroundTruthUnpickler(handle).load()


@dataclass(frozen=True)
class QueryTruth:
    bbox: tuple[float, float, float, float]
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray

    def protocol(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(positives, junk) database indices under the Easy / Medium / Hard protocol."""
        if name == "easy":
            return self.easy, np.concatenate([self.junk, self.hard])
        if name == "medium":
            return np.concatenate([self.easy, self.hard]), self.junk
        if name == "hard":
            return self.hard, np.concatenate([self.junk, self.easy])
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {name!r}")


@dataclass(frozen=True)
class RevisitopSet:
    name: str
    root: Path
    database: tuple[str, ...]
    queries: tuple[str, ...]
    truth: tuple[QueryTruth, ...]
    extension: str = ".jpg"

    @property
    def database_paths(self) -> list[Path]:
        return [self.root / "jpg" / f"{name}{self.extension}" for name in self.database]

    @property
    def query_paths(self) -> list[Path]:
        return [self.root / "jpg" / f"{name}{self.extension}" for name in self.queries]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        return [truth.bbox for truth in self.truth]

    def protocol(self, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-query (positives, junk) index arrays for one protocol."""
        pairs = [truth.protocol(name) for truth in self.truth]
        return [p for p, _ in pairs], [j for _, j in pairs]

    def landmark_groups(self) -> np.ndarray:
        """Per query, its landmark group: queries that share a positive (easy or hard) database image are one
        landmark, transitively (connected components; groups numbered 0, 1, ... in order of first query)."""
        parent = list(range(len(self.truth)))

        def root(q: int) -> int:
            while parent[q] != q:
                parent[q] = parent[parent[q]]
                q = parent[q]
            return q

        first_query: dict[int, int] = {}
        for q, truth in enumerate(self.truth):
            for image in np.concatenate([truth.easy, truth.hard]).tolist():
                if image in first_query:
                    parent[root(q)] = root(first_query[image])
                else:
                    first_query[image] = q
        roots = [root(q) for q in range(len(self.truth))]
        numbers: dict[int, int] = {}
        return np.asarray([numbers.setdefault(r, len(numbers)) for r in roots], dtype=np.int64)

    def labelled_images(self) -> LabelledImageSet:
        """Every image of the set (database, then queries not already in it; whole images, no boxes) with a
        label, for fitting on this set (``--fit-on revisitop:NAME``): the landmark group of
        :meth:`landmark_groups` for the queries and their easy and hard positives; every other image (junk,
        distractors) a label of its own, numbered after the groups - it matches nothing that is known."""
        groups = self.landmark_groups()
        labels = np.full(len(self.database), -1, dtype=np.int64)
        for truth, group in zip(self.truth, groups):
            labels[np.concatenate([truth.easy, truth.hard])] = group
        database_paths = self.database_paths
        known = {path: i for i, path in enumerate(database_paths)}
        paths, query_labels = list(database_paths), []
        for path, group in zip(self.query_paths, groups):
            if path in known:  # a query that is also a database image joins its landmark
                labels[known[path]] = group if labels[known[path]] < 0 else labels[known[path]]
            else:
                paths.append(path)
                query_labels.append(group)
        labels = np.concatenate([labels, np.asarray(query_labels, dtype=np.int64)])
        unlabelled = np.flatnonzero(labels < 0)
        labels[unlabelled] = len(set(groups.tolist())) + np.arange(len(unlabelled))
        return LabelledImageSet(name=self.name, paths=tuple(paths), labels=labels)


def _indices(value, where: str, size: int) -> np.ndarray:
    array = np.asarray(value if value is not None else [], dtype=np.int64).reshape(-1)
    if array.size and (array.min() < 0 or array.max() >= size):
        raise RevisitopError(f"{where}: index out of range [0, {size})")
    return array


def load_revisitop(data_root: str | Path, name: str) -> RevisitopSet:
    root = Path(data_root) / name
    gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file():
        raise RevisitopError(
            f"ground truth not found: {gnd_path}. Expected the revisitop layout "
            f"DATA_ROOT/{name}/gnd_{name}.pkl and DATA_ROOT/{name}/jpg/; "
            f"scripts/download_revisitop.py fetches roxford5k / rparis6k.")
    try:
        cfg = load_ground_truth_pickle(gnd_path)
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a dict, got {type(cfg).__name__}")
    except Exception as error:  # a corrupt or hostile pickle can raise nearly anything
        raise RevisitopError(f"cannot read {gnd_path}: {type(error).__name__}: {error}") from None
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise RevisitopError(f"{gnd_path}: missing key {key!r}")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise RevisitopError(f"{gnd_path}: {len(cfg['gnd'])} ground-truth entries for "
                             f"{len(cfg['qimlist'])} queries")
    size = len(cfg["imlist"])
    truth = []
    for q, entry in enumerate(cfg["gnd"]):
        where = f"{gnd_path} query {q}"
        bbox = entry.get("bbx")
        if bbox is None or len(bbox) != 4:
            raise RevisitopError(f"{where}: 'bbx' must be [x1, y1, x2, y2], got {bbox!r}")
        truth.append(QueryTruth(
            bbox=tuple(float(v) for v in bbox),
            easy=_indices(entry.get("easy"), where, size),
            hard=_indices(entry.get("hard"), where, size),
            junk=_indices(entry.get("junk"), where, size),
        ))
    return RevisitopSet(name=name, root=root, database=tuple(cfg["imlist"]), queries=tuple(cfg["qimlist"]),
                        truth=tuple(truth), extension=cfg.get("ext", ".jpg"))


def save_revisitop(data_root: str | Path, name: str, database: list[str], queries: list[str],
                   truth: list[dict]) -> Path:
    """Write ``gnd_<name>.pkl`` in the revisitop format (for a user's own set, and for tests)."""
    root = Path(data_root) / name
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    gnd = [{"bbx": list(t["bbx"]), "easy": list(t.get("easy", [])), "hard": list(t.get("hard", [])),
            "junk": list(t.get("junk", []))} for t in truth]
    path = root / f"gnd_{name}.pkl"
    with path.open("wb") as handle:
        pickle.dump({"imlist": list(database), "qimlist": list(queries), "gnd": gnd}, handle)
    return path
