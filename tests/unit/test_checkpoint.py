"""Checkpoints: atomic write, latest pointer, retention, milestones, fallback on corrupt files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    ckpt_name,
    load_checkpoint,
    resolve_checkpoint,
)


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "ema": {}, "optimizer": {}, "train_state": {"nimg": int(v)},
            "config": {}, "fingerprint": "x"}


@pytest.mark.parametrize("async_write", [True, False])
def test_write_read_latest_and_retention(tmp_path: Path, async_write: bool) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, milestone_every_images=200, async_write=async_write)
    for nimg in (100, 200, 300, 400):
        m.save(_state(nimg), nimg)
    m.wait()
    names = [p.name for p in m.complete_checkpoints()]
    assert names == [ckpt_name(300), ckpt_name(400)]
    assert (tmp_path / "latest").read_text().strip() == ckpt_name(400)
    # milestones survive pruning (hard links)
    assert load_checkpoint(tmp_path / "milestone-000000000200.pt")["train_state"]["nimg"] == 200
    assert (tmp_path / "milestone-000000000400.pt").exists()
    state, path = m.load_latest()
    assert path.name == ckpt_name(400) and torch.equal(state["model"]["w"], torch.full((4,), 400.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_saved_state_is_a_snapshot(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, async_write=True)
    s = _state(1)
    m.save(s, 1)
    s["model"]["w"].fill_(99)  # training goes on mutating the live tensors
    m.wait()
    assert torch.equal(load_checkpoint(tmp_path / ckpt_name(1))["model"]["w"], torch.ones(4))


def test_truncated_newest_falls_back_with_a_message(tmp_path: Path, caplog) -> None:
    m = CheckpointManager(tmp_path, keep_last=5, async_write=False)
    m.save(_state(1), 1)
    m.save(_state(2), 2)
    newest = tmp_path / ckpt_name(2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="ddpm"):
        state, path = m.load_latest()
    assert path.name == ckpt_name(1) and state["train_state"]["nimg"] == 1
    assert "unreadable" in caplog.text and ckpt_name(2) in caplog.text


def test_garbage_and_incomplete_entries_are_not_trusted(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=5, async_write=False)
    m.save(_state(1), 1)
    (tmp_path / ckpt_name(3)).write_bytes(b"")  # zero bytes
    torch.save({"model": {}}, tmp_path / ckpt_name(4))  # lacks required entries
    (tmp_path / (ckpt_name(5) + ".tmp")).write_bytes(b"partial")  # a killed writer
    state, path = m.load_latest()
    assert path.name == ckpt_name(1)
    m.remove_partial()
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "none").load_latest() is None
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resolve_checkpoint(tmp_path)


def test_background_error_surfaces(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = CheckpointManager(blocker / "ckpts", async_write=True)
    m.save(_state(1), 1)
    with pytest.raises(NotADirectoryError):  # raised as it is in the training thread
        m.wait()


def test_best_link(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=1, async_write=True)
    m.save(_state(1), 1, best="fid")
    m.save(_state(2), 2)
    m.wait()
    assert load_checkpoint(tmp_path / "best-fid.pt")["train_state"]["nimg"] == 1
    assert [p.name for p in m.complete_checkpoints()] == [ckpt_name(2)]
