"""The latent cache: exact round trips, idempotent atomic puts, keys that change with the VAE."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.latent_cache import (
    TABLE,
    LatentCache,
    latent_cache_key,
    vae_fingerprint,
)
from tiny_unets import tiny_vae


@pytest.fixture
def cache(tmp_path) -> LatentCache:
    return LatentCache(LanceStore(str(tmp_path / "db")))


def _latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, 3, 3)).astype(np.float32)


KEY = latent_cache_key(tiny_vae(), 8, "center-crop", torch.float64)


def test_get_returns_exactly_what_was_stored(cache):
    values = _latents(4)
    values[0, 0, 0, 0] = np.float32(1e-38)  # a subnormal-adjacent value survives bytes exactly
    ids = ["s0", "s1", "s2", "s3"]
    assert cache.put("d", ids, KEY, values) == 4
    got = cache.get("d", ["s3", "s1", "nope"], KEY)
    assert sorted(got) == ["s1", "s3"]
    for sid in ("s1", "s3"):
        assert got[sid].dtype == np.float32 and got[sid].shape == (2, 3, 3)
        assert np.array_equal(got[sid], values[ids.index(sid)])
    assert cache.get("other", ids, KEY) == {}  # datasets are separate
    assert cache.get("d", [], KEY) == {}
    assert cache.count(KEY) == 4 and cache.count(KEY, "d") == 4 and cache.count(KEY, "x") == 0


def test_torch_latents_are_stored_as_float32(cache):
    t = torch.tensor([[1.0, 2.0 + 2**-30]], dtype=torch.float64)
    cache.put("d", ["a"], KEY, t)
    assert np.array_equal(cache.get("d", ["a"], KEY)["a"], np.array([1.0, 2.0], dtype=np.float32))


def test_reputs_add_nothing_and_each_put_is_one_commit(cache):
    values = _latents(5)
    assert cache.put("d", ["a", "b", "c"], KEY, values[:3]) == 3
    version = cache.store.table(TABLE).version
    assert cache.put("d", ["a", "b", "c"], KEY, values[:3]) == 0
    assert cache.store.table(TABLE).version == version + 1
    assert cache.put("d", ["b", "c", "d", "e"], KEY, values[1:]) == 2
    table = cache.store.table(TABLE)
    assert table.version == version + 2  # one Lance commit per put
    assert cache.count(KEY) == 5 and table.count_rows() == 5
    got = cache.get("d", list("abcde"), KEY)
    assert all(np.array_equal(got[s], values[i]) for i, s in enumerate("abcde"))


def test_more_ids_than_an_in_list_holds(cache):
    n = 1100
    ids = [f"s{i:05d}" for i in range(n)]
    values = np.arange(n, dtype=np.float32).reshape(n, 1)
    assert cache.put("d", ids, KEY, values) == n
    got = cache.get("d", ids[::-1], KEY)
    assert len(got) == n and all(got[s][0] == i for i, s in enumerate(ids))


def test_bad_puts_are_refused(cache):
    with pytest.raises(ValueError, match="non-finite"):
        cache.put("d", ["a", "b"], KEY, np.array([[0.0], [np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="duplicates"):
        cache.put("d", ["a", "a"], KEY, _latents(2))
    with pytest.raises(ValueError, match="2 sample ids"):
        cache.put("d", ["a", "b"], KEY, _latents(3))
    with pytest.raises(ValueError, match="invalid latent cache key"):
        cache.get("d", ["a"], "x' OR '1'='1")
    assert cache.count(KEY) == 0


def test_fingerprint_survives_save_and_load_but_not_a_changed_weight(tmp_path):
    vae = tiny_vae().float()
    fp = vae_fingerprint(vae)
    assert len(fp) == 64 and vae_fingerprint(vae) == fp
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(str(tmp_path / "vae"), local_files_only=True)
    assert vae_fingerprint(loaded) == fp  # another path and object, same VAE
    assert vae_fingerprint(copy.deepcopy(vae)) == fp
    assert vae_fingerprint(tiny_vae(seed=1).float()) != fp

    with torch.no_grad():  # one weight, in place: the memo must notice
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    changed = vae_fingerprint(vae)
    assert changed != fp and changed == vae_fingerprint(copy.deepcopy(vae))
    assert vae_fingerprint(tiny_vae()) != fp  # same weights in float64: another dtype


def test_scaling_factor_is_part_of_the_fingerprint():
    a, b = tiny_vae(), tiny_vae()
    b.register_to_config(scaling_factor=0.5)
    assert vae_fingerprint(a) != vae_fingerprint(b)


def test_every_key_component_changes_the_key(cache):
    vae = tiny_vae()
    base = latent_cache_key(vae, 8, "center-crop", torch.float64)
    assert base == KEY
    others = [
        latent_cache_key(vae, 16, "center-crop", torch.float64),
        latent_cache_key(vae, 8, "pad", torch.float64),
        latent_cache_key(vae, 8, "resize", torch.float64),
        latent_cache_key(vae, 8, "center-crop", torch.float32),
        latent_cache_key(tiny_vae(seed=3), 8, "center-crop", torch.float64),
    ]
    assert len({base, *others}) == 6
    cache.put("d", ["a"], base, _latents(1))
    for key in others:  # stale rows are never read under another key
        assert cache.get("d", ["a"], key) == {} and cache.count(key) == 0
