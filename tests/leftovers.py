"""What interrupted or finished writes leave behind, apart from what `atomic_dir` keeps on purpose."""
from __future__ import annotations

from pathlib import Path

from pipeline.common import kept_versions


def leftovers(folder: Path) -> list[str]:
    """Names starting with a dot anywhere under `folder` (temporaries, lock files, versions set aside,
    caches), relative to it, apart from the versions `atomic_dir` keeps behind each name: the one the
    name links to and the one before it."""
    folder = Path(folder)
    if not folder.exists():
        return []
    kept = {v for link in folder.rglob("*") if link.is_symlink() for v in kept_versions(link)}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p not in kept)


def visible(folder: Path) -> list[str]:
    """The names in `folder` a person listing it sees (hidden version folders and locks left out)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))
