"""Stage a self-contained SageMaker source dir: the ``models`` package + entry points.

Layout::

    <dest>/train_pca.py        (copy of models/train_pca.py)
    <dest>/train_siamese.py    (copy of models/train_siamese.py)
    <dest>/requirements.txt    (copy of models/requirements.txt)
    <dest>/models/...          (the package, without __pycache__)

The entry points import only ``models.*``, which imports nothing from flows/, tasks/ or
core/, so the directory runs unchanged in a SageMaker container or a local subprocess.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_POINTS = ("train_pca.py", "train_siamese.py")


def stage_source_dir(dest: Path) -> Path:
    """Create (or refresh) ``dest`` as a source dir and return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "models"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    )
    for name in ENTRY_POINTS:
        shutil.copy2(PACKAGE_DIR / name, dest / name)
    shutil.copy2(PACKAGE_DIR / "requirements.txt", dest / "requirements.txt")
    return dest
