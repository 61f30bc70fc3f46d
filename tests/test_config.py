"""Settings that act on the process: the thread pin every CLI command applies."""

from __future__ import annotations

import os

import pytest
import torch

from diffcurate.config import apply_threads, load_settings


@pytest.fixture
def restore_threads(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_setting_read_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFCURATE_THREADS", "3")
    assert load_settings(tmp_path).threads == 3
    monkeypatch.setenv("DIFFCURATE_THREADS", "0")
    with pytest.raises(ValueError):
        load_settings(tmp_path)


def test_apply_threads_sets_torch_and_openmp(restore_threads):
    apply_threads(1)
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "1"


def test_apply_threads_none_leaves_defaults(restore_threads):
    torch.set_num_threads(2)
    apply_threads(None)
    assert torch.get_num_threads() == 2
    assert "OMP_NUM_THREADS" not in os.environ
