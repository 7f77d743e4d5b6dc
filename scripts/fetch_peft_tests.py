"""Fetch the test suite of the installed peft release for `tests/peft_rst/test_peft_generic.py`.

peft's source distribution ships its `tests/` folder; nothing of peft is vendored in this repository. This script
downloads the sdist of the installed peft version from the package index (`pip download --no-binary :all:`) and
extracts its `tests/` into a cache folder. The test suite itself never downloads: without the cache the generic
tests skip and name this command.

    python scripts/fetch_peft_tests.py            # -> ~/.cache/peft_rst/peft-<version>-tests (or $XDG_CACHE_HOME)
    python scripts/fetch_peft_tests.py --dest DIR # then: export PEFT_RST_UPSTREAM_TESTS=DIR

`.ci/run` runs it before pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ENV_VAR = "PEFT_RST_UPSTREAM_TESTS"
COMMAND = "python scripts/fetch_peft_tests.py"
MARKER = "testing_common.py"  # the file the generic tests need; its presence marks a complete cache


def default_dest(peft_version: str | None = None) -> Path:
    """Where the tests are cached unless $PEFT_RST_UPSTREAM_TESTS names another folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peft_rst" / f"peft-{peft_version or version('peft')}-tests"


def upstream_tests_dir() -> Path:
    """The folder the generic tests read: $PEFT_RST_UPSTREAM_TESTS if set, else the default cache."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else default_dest()


def fetch(dest: Path, peft_version: str) -> Path:
    """Download peft's sdist and extract its tests/ into `dest` (atomically: a staging folder, then a rename)."""
    if (dest / MARKER).is_file():
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SystemExit(f"error: {dest} exists but holds no {MARKER}; remove it or pick another --dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        subprocess.run([*cmd, f"peft=={peft_version}", "-d", tmp], check=True)
        sdists = sorted(Path(tmp).glob("peft-*.tar.gz"))
        if not sdists:
            raise SystemExit(f"error: pip downloaded no peft-{peft_version}.tar.gz sdist into {tmp}")
        prefix = f"peft-{peft_version}/tests/"
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".staging-"))
        try:
            with tarfile.open(sdists[0]) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
                if not any(m.name == prefix + MARKER for m in members):
                    raise SystemExit(f"error: the peft {peft_version} sdist ships no tests/{MARKER}")
                for member in members:
                    member.name = member.name[len(prefix) :]
                    tar.extract(member, staging, filter="data")
            if dest.exists():  # an empty folder
                dest.rmdir()
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help=f"target folder (default: ${ENV_VAR} or {default_dest()})")
    args = parser.parse_args(argv)
    dest = fetch(args.dest or upstream_tests_dir(), version("peft"))
    print(f"peft {version('peft')} tests in {dest}")


if __name__ == "__main__":
    main()
