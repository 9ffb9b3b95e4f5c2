"""The checkpoint's host copy: what the step waits for, and no race with the next optimizer step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointManager, host_copy, load_checkpoint


def _state(device: str) -> dict:
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    return {"model": {"w": w, "b": torch.randn(64, device=device)}, "ema": {"decays": [0.9999]},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0, device=device)}}}, "train_state": {"nimg": 8},
            "config": {}, "fingerprint": "x"}


def test_host_copy_is_a_deep_cpu_copy_that_keeps_strides() -> None:
    state = _state("cpu")
    host, done = host_copy(state)
    assert done is None  # nothing to wait for on the CPU
    state["model"]["w"].add_(1.0)  # the next optimizer step
    assert not torch.equal(host["model"]["w"], state["model"]["w"])
    assert host["model"]["w"].stride() == state["model"]["w"].stride()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("async_write", [True, False])
def test_cuda_checkpoint_holds_the_weights_of_its_step_not_the_next(tmp_path: Path, async_write: bool) -> None:
    state = _state("cuda")
    expected = {k: v.cpu() for k, v in state["model"].items()}
    ckpt = CheckpointManager(tmp_path, async_write=async_write)
    ckpt.save(state, nimg=8)
    for _ in range(20):  # the next optimizer steps, queued right behind the copies
        for v in state["model"].values():
            v.mul_(1.5).add_(1.0)
    ckpt.wait()
    saved = load_checkpoint(tmp_path / "ckpt-000000000008.pt")
    for k, v in expected.items():
        assert torch.equal(saved["model"][k], v), k
    assert saved["optimizer"]["state"][0]["step"].item() == 3.0
