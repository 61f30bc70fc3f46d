"""Shared fixtures: real images (scikit-learn digits, scikit-image photos), crafted bad inputs,
a tiny open_clip checkpoint saved to disk, and a session-scoped Prefect test harness."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One torch/OpenMP thread per process unless the caller says otherwise: the suite's tensors are
# small, and pytest, Prefect's server and Dask workers share the cores (2 threads against a busy
# core ran several times slower than 1). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Prefect reads these at import time: point it at a throwaway home before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diffcurate-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from diffcurate.config import ClipSettings
from diffcurate.demo.corpus import digit_samples
from diffcurate.demo.writers import SampleFile
from imagebytes import jpeg_bytes

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (flows need an API to record runs)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def photo_samples() -> list[SampleFile]:
    """Real photographs (scikit-image's bundled samples) cut into 64x64 JPEG tiles."""
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)()
        for k, (y, x) in enumerate([(0, 0), (100, 100), (200, 50)]):
            tile = np.ascontiguousarray(img[y : y + 64, x : x + 64])
            out.append(
                SampleFile(
                    key=f"photo-{name}-{k}",
                    image=jpeg_bytes(tile),
                    ext="jpg",
                    caption=f"a photo tile of {name}",
                    metadata={"collection": "skimage", "subject": name},
                )
            )
    return out


@pytest.fixture(scope="session")
def digit_files() -> list[SampleFile]:
    """The first 60 real scikit-learn digits plus 3 exact duplicates of one of them."""
    samples, _ = digit_samples(n_duplicated=0, copies=1)
    base = samples[:60]
    dups = [
        SampleFile(f"dup-{c}", base[5].image, base[5].ext, base[5].caption, base[5].metadata)
        for c in range(3)
    ]
    return base + dups


@pytest.fixture(scope="session")
def corpus_files(digit_files, photo_samples) -> list[SampleFile]:
    return digit_files + photo_samples


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> ClipSettings:
    """A tiny open_clip architecture with weights saved to disk, loaded through the real
    ``pretrained=<path>`` code path exactly as real ViT-B-32 weights would be."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("clip")
    arch = root / "diffcurate-test-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model("diffcurate-test-clip")
    ckpt = root / "tiny-clip.pt"
    torch.save(model.state_dict(), ckpt)
    return ClipSettings(
        model="diffcurate-test-clip", checkpoint=ckpt, architecture_file=arch, device="cpu"
    )


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws
