"""Resuming a loader from the checkpoint's ``loader`` entry: every old rank's cursor."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ddpm.data")


class ReshardNeeded(ValueError):
    """A state saved with another world size or worker count: pass {"resharded_from": states}."""


def restore_from_ranks(loader: Any, states: list[Any], rank: int, world_size: int) -> None:
    """Give a loader its cursor back from every old rank's state (the checkpoint's ``loader`` entry):
    exact with the same world size and workers, else the loader's reshard form."""
    if len(states) == world_size:
        try:
            loader.load_state_dict(states[rank])
            return
        except ReshardNeeded as e:  # e.g. data.num_workers changed: the loader asks for the reshard form
            reason = str(e)
    else:
        reason = f"world size changed from {len(states)} to {world_size}"
    log.warning("%s: the data loader resumes in the same epoch without repeating finished shards "
                "(the weaker guarantee; see data_pipeline/loader.py)", reason)
    loader.load_state_dict({"resharded_from": states})
