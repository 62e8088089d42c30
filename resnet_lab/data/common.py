"""Shared data plumbing: the cache directory, ImageFolder archives, clear errors."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class DataError(UserError, RuntimeError):
    """Data that cannot be used; the message says what to do about it."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $RESNET_LAB_CACHE, else ~/.cache/resnet-lab. Never the repo."""
    root = cache_dir or os.environ.get("RESNET_LAB_CACHE") or Path.home() / ".cache" / "resnet-lab"
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def source_key(path: str | os.PathLike) -> str:
    """A short key that changes when the file or tree at `path` changes: for a tree,
    every file's relative path, size and mtime (stat only, ~0.1 s for 60k files)."""
    p = Path(path).resolve()
    h = hashlib.sha1(str(p).encode())
    if p.is_dir():
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                rel = os.path.relpath(os.path.join(dirpath, name), p)
                h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        st = p.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def absolute(path: str | os.PathLike | None) -> str | None:
    """`path` made absolute (user and relative parts resolved); None stays None."""
    return None if path is None else str(Path(path).expanduser().resolve())


def check_counts(prefix: str, **counts: int | None) -> None:
    """Every given count must be None or >= 1; one DataError names the option and the fix."""
    for name, v in counts.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DataError(f"{prefix}.{name}={v!r} must be a positive integer (or null for the default)")


def folder_classes(path: str | os.PathLike, splits: tuple[str, ...] = ("train",), bare: bool = False) -> list[str]:
    """Sorted class names of an ImageFolder tree or archive, without decoding any image
    (an archive's member names are listed, nothing is extracted): the folders under the
    first of `splits` that holds images, or with `bare`, a folder of class folders."""
    path = Path(path)
    if path.is_dir():
        members = [f.relative_to(path).parts for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTS]
    elif is_archive(path):
        try:
            with tarfile.open(path) as tar:
                members = [Path(m).parts for m in tar.getnames() if Path(m).suffix.lower() in IMAGE_EXTS]
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"cannot read archive {path}: {e}. Re-download or re-copy it.") from e
    else:
        raise DataError(f"{path} is neither a directory nor a .tar/.tar.gz archive")
    for split in splits:
        names = {parts[parts.index(split) + 1] for parts in members if split in parts[:-2]}  # ImageFolder's classes
        if names:
            return check_classes(path, sorted(names))
    if bare and members:
        return check_classes(path, sorted({parts[-2] for parts in members if len(parts) >= 2}))
    want = "/".join(splits)
    raise DataError(f"{path} holds no {want}/<class>/ images; expected an ImageFolder tree {want}/<class>/*.jpg")


def check_classes(where: str | os.PathLike, classes: list[str]) -> list[str]:
    """A classifier needs two classes or more: one class folder is a wrong layout."""
    if len(classes) < 2:
        raise DataError(
            f"{where} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a classifier needs two or "
            "more. Expected an ImageFolder tree {train,test or val}/<class>/*.jpg with one folder per class"
        )
    return classes


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).endswith((".tar.gz", ".tgz", ".tar"))


def iter_image_members(path: str | os.PathLike) -> Iterator[tuple[tuple[str, ...], str, bytes]]:
    """Yield (path parts, display name, bytes) for every image file under an
    ImageFolder tree or inside a .tar/.tar.gz archive, streaming, in sorted order
    for trees and archive order for archives."""
    path = Path(path)
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                yield f.relative_to(path).parts, str(f), f.read_bytes()
    elif is_archive(path):
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        yield Path(m.name).parts, f"{path}:{m.name}", data
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"cannot read archive {path}: {e}. Re-download or re-copy it.") from e
    else:
        raise DataError(f"{path} is neither a directory nor a .tar/.tar.gz archive")


def decode_image(data: bytes, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB; one clear error naming the file when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)).strip() or type(e).__name__
        raise DataError(f"corrupt or non-image file {name} ({why}). Delete or replace it.") from e
    if size is not None and arr.shape[:2] != size:
        raise DataError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, expected {size[1]}x{size[0]}")
    return arr


def extract_archive(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract an archive once into the cache and return the folder. Extraction
    goes to a temporary folder that is renamed when complete, so a killed run
    never leaves a half-extracted tree behind."""
    path = Path(path)
    dest = cache_root(cache_dir) / "extracted" / f"{path.name.split('.')[0]}-{source_key(path)}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot extract archive {path}: {e}. Re-download or re-copy it.") from e
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_split_root(root: Path, splits: tuple[str, ...]) -> Path:
    """The folder under `root` (itself or one level down) that holds `splits`."""
    for cand in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if all((cand / s).is_dir() for s in splits):
            return cand
    raise DataError(f"{root} has no {'/'.join(splits)} folders; expected an ImageFolder tree {splits[0]}/<class>/...")
