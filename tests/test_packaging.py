"""The installed names: every package of the repository is in pyproject.toml under ``msretrieval.``, mapped to
its folder, and a checkout imports it by that name with nothing installed."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_and_mapped():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {path.parent.relative_to(REPO) for path in REPO.glob("*/**/__init__.py")
               if path.parts[len(REPO.parts)] not in ("tests", ".venv", "build")}
    expected = {"msretrieval." + ".".join(folder.parts) if folder.parts[0] != "msretrieval" else "msretrieval"
                for folder in folders} | {"msretrieval.configs"}
    assert set(setuptools["packages"]) == expected
    top_level = {name for name in setuptools["packages"] if name.count(".") <= 1}
    assert setuptools["package-dir"] == {name: name.split(".")[-1] for name in top_level}


def test_a_checkout_imports_its_packages_as_msretrieval_only(tmp_path):
    """From outside the repository with only the root on the path: msretrieval.* resolves to this tree, and no
    bare ``utils`` / ``models`` / ``data`` module gets imported along the way."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import msretrieval.retrieval.evaluation.catalogue, "
            "msretrieval.release, msretrieval.training.cli; "
            "bare = sorted(m for m in sys.modules if m.split('.')[0] in ('utils', 'models', 'data', 'release', "
            "'retrieval', 'training', 'baselines', 'losses', 'miners')); "
            "print(msretrieval.release.__file__, bare)")
    done = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(REPO / "release" / "__init__.py"), "[]"]
