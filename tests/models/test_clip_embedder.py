import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from diffcurate.config import ClipSettings
from diffcurate.models.clip_embedder import ClipEmbedder, EmbeddingsDisabledError


def test_loaded_checkpoint_reproduces_the_saved_model(tiny_clip):
    emb = ClipEmbedder(tiny_clip)
    # Independently rebuild the saved model and compare outputs: loading must be exact.
    ref = open_clip.create_model(tiny_clip.model)
    ref.load_state_dict(torch.load(tiny_clip.checkpoint, weights_only=True))
    ref.eval()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    got = emb.embed_images(imgs)
    with torch.no_grad():
        want = ref.encode_image(torch.stack([emb.preprocess(i) for i in imgs]))
        want = torch.nn.functional.normalize(want, dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (3, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_embeddings_are_unit_norm_and_deterministic(tiny_clip):
    emb = ClipEmbedder(tiny_clip.model_copy(update={"batch_size": 2}))
    a = emb.embed_texts(["a digit one", "a digit two", "a photo"])
    b = emb.embed_texts(["a digit one", "a digit two", "a photo"])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(a[0], a[2])


def test_disabled_without_checkpoint():
    with pytest.raises(EmbeddingsDisabledError):
        ClipEmbedder(ClipSettings())


def test_missing_checkpoint_is_a_clear_error(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint not found"):
        ClipEmbedder(tiny_clip.model_copy(update={"checkpoint": tmp_path / "nope.pt"}))


def test_hub_tags_are_never_downloaded(tiny_clip):
    # "openai" is an open_clip hub tag; we must refuse it rather than reach for the network.
    with pytest.raises(FileNotFoundError):
        ClipEmbedder(tiny_clip.model_copy(update={"checkpoint": "openai"}))


def test_mismatched_checkpoint_is_a_clear_error(tiny_clip, tmp_path):
    cfg = json.loads(tiny_clip.architecture_file.read_text())
    cfg["embed_dim"] = 16
    other = tmp_path / "other-test-clip.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match architecture"):
        ClipEmbedder(
            tiny_clip.model_copy(update={"model": "other-test-clip", "architecture_file": other})
        )
