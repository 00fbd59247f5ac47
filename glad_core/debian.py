"""Files of Debian packages (labelled images, fonts, WordNet), used in place or fetched: the one fetcher.

A package's content folder is looked for in `$GLAD_DEBIAN_ROOT`, then system-wide (`/`), then in any
folder the caller adds, then under the cache (`cache_dir()/debian/` unless the caller names another);
only there it is fetched, with `apt-get download` (no root needed), unpacking just the files of its
content folder that end in its suffix (or its second suffix). The unpack goes to a scratch folder that
is moved into place when complete, so an interrupted fetch leaves nothing that looks fetched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm import tqdm

from .paths import cache_dir


class DemoDataUnavailable(RuntimeError):
    """The Debian packages cannot be fetched here (no apt-get / dpkg-deb) and are not unpacked."""


@dataclass(frozen=True)
class Package:
    """A Debian package and the folder (inside it) whose files are used.

    A copy counts when that folder holds `file` (when set: a font folder such as
    usr/share/fonts/truetype/noto is shared by several packages), else any file ending in `suffix` or `also`.
    `also`: a second suffix unpacked too (Tux Paint's `.txt` descriptions beside its stamps).
    """

    name: str
    content: str
    suffix: str
    file: str = ""
    also: str = ""

    def found_in(self, path: Path) -> bool:
        """Whether `path` is a copy of the content folder."""
        if not path.is_dir():
            return False
        if self.file:
            return (path / self.file).is_file()
        return any(p.suffix in (self.suffix, self.also or self.suffix) for p in path.rglob("*"))


_NO_APT = """\
The Debian package(s) {packages} are needed, but {missing} is not available to fetch them. Either \
install the packages on a Debian/Ubuntu system, or unpack their .deb files (`ar x` then \
`tar xf data.tar.*`) into one directory and set GLAD_DEBIAN_ROOT to it (the directory that holds \
usr/share/)."""


def content_dir(package: Package, also_in: Sequence[Path] = (), dest: Path | None = None) -> Path:
    """Where `package`'s content folder is: `$GLAD_DEBIAN_ROOT`, system-wide, one of `also_in`, or
    under `dest` (default `cache_dir()/debian`), fetched there if needed."""
    roots = [Path(os.environ["GLAD_DEBIAN_ROOT"])] if os.environ.get("GLAD_DEBIAN_ROOT") else []
    dest = dest or cache_dir() / "debian"
    for path in [*(r / package.content for r in roots + [Path("/")]), *also_in]:
        if package.found_in(path):
            return path
    if not package.found_in(dest / package.content):
        fetch_packages(dest, [package])
    return dest / package.content


def fetch_packages(dest: Path, packages: Sequence[Package]) -> None:
    """Download `packages` with `apt-get download` and unpack their content files into `dest`.

    The .deb files are kept in `cache_dir()/debs/` only until unpacked. Raises
    `DemoDataUnavailable` (saying what to do instead) where apt-get or dpkg-deb is missing.
    """
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise DemoDataUnavailable(_NO_APT.format(packages=", ".join(p.name for p in packages),
                                                 missing=" and ".join(missing)))
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _apt_download([p.name for p in packages], debs)
    for package in packages:
        deb = max(debs.glob(f"{package.name}_*.deb"))
        _unpack(deb, dest, package)
        deb.unlink()


def _apt_download(names: Sequence[str], cwd: Path) -> None:
    """`apt-get download`, retried once after `apt-get update` when root (package lists may be empty)."""
    cmd = ["apt-get", "download", *names]
    tqdm.write(f"Downloading {', '.join(names)} with apt-get ...")
    run = subprocess.run(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        run = subprocess.run(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}\n"
                           "Check network access to the Debian mirrors and run `apt-get update` (as root), "
                           "or install the packages and retry.")


def _unpack(deb: Path, dest: Path, package: Package) -> None:
    """Extract the files (and symlinks) under `package.content` ending in `package.suffix` (or `.also`) from
    `deb` into a scratch folder, then move the content folder to `dest` in one step."""
    content = PurePosixPath(package.content)
    scratch = dest / f".{package.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    links: list[tuple[Path, str]] = []
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tqdm(tar, desc=f"unpacking {package.name}", unit=" files"):
            name = PurePosixPath(os.path.normpath(member.name))
            if not (name.is_relative_to(content) and name.suffix in (package.suffix, package.also or package.suffix)):
                continue
            out = scratch / name
            out.parent.mkdir(parents=True, exist_ok=True)
            if member.isfile():
                with tar.extractfile(member) as src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
            elif member.issym():
                links.append((out, member.linkname))
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb could not read {deb}")
    root = (scratch / package.content).resolve()
    for out, target in links:  # symlinks last, so their targets exist; only those inside the package
        if (out.parent / target).resolve().is_relative_to(root):
            out.unlink(missing_ok=True)
            out.symlink_to(target)
    if not root.is_dir():
        raise RuntimeError(f"{deb} holds no {package.suffix} files under {package.content}/")
    final = dest / package.content
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(scratch / package.content, final)
    shutil.rmtree(scratch)
