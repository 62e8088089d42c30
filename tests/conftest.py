import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED / "cifar10-jpeg.tar.gz"
TINY_IMAGENET = SHARED / "tiny-imagenet-10.tar.gz"
REPO = Path(__file__).resolve().parents[1]


def need(path: Path) -> Path:
    """Offline datasets sit in ../shared in CI: missing there is a failure, elsewhere a skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-data cache for the whole session (decoding CIFAR takes ~10 s)."""
    d = Path(os.environ.get("RESNET_LAB_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["RESNET_LAB_CACHE"] = str(d)
    return d
