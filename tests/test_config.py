"""Settings that act on the process: the thread pin every CLI command applies."""

from __future__ import annotations

import os

import pytest
import torch

from diffcurate.config import apply_threads, available_cpus, load_settings, resolve_threads


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


def test_unset_threads_default_to_the_cpus_this_process_may_use(restore_threads, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    monkeypatch.setattr("diffcurate.config.Path.read_text", lambda self: "max 100000\n")
    assert available_cpus() == 3
    monkeypatch.setattr("diffcurate.config.Path.read_text", lambda self: "150000 100000\n")
    assert available_cpus() == 2  # a 1.5-CPU quota rounds up
    assert apply_threads(None) == 2
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"


def test_unset_threads_keep_an_exported_openmp_count(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None) == 1 and resolve_threads(3) == 3
    assert apply_threads(None) == 1 and torch.get_num_threads() == 1
