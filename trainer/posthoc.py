"""Post-hoc EMA (EDM2 section 3.2): any power-function profile, reconstructed from a run's snapshots.

``plan`` reads the snapshots' headers (``<run>/ema/snapshot-*.pt``, trainer.ema_snapshots), and
solves for each wanted sigma_rel the least-squares combination of the stored profiles at or
before the chosen snapshot time (trainer.ema_math). ``reconstruct`` then streams the snapshots
(memory-mapped, one tensor at a time) into one fp32 accumulator per wanted profile, so memory
stays at (profiles in the group + 1) model copies whatever the number of snapshots.
``inference_state`` turns the result into a checkpoint that ``open_for_inference`` (ddpm-sample,
ddpm-evaluate, the diffusers export) reads as EMA index 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.config import SetupError
from data_pipeline.storage import atomic_open
from trainer.checkpoint import state_bytes
from trainer.ema_math import SIGMA_REL_WIDEST, gamma_from_sigma_rel, solve
from trainer.ema_snapshots import list_snapshots, snapshot_dir

log = logging.getLogger("ddpm")

min_snapshots = 2  # snapshot times at or before --at-images: one time alone cannot separate widths


class PosthocError(SetupError):
    """A request that cannot be reconstructed (one line, exit code 2)."""


@dataclass
class SnapshotInfo:
    """One snapshot file's header."""

    nimg: int
    path: Path
    batch: int
    sigma_rels: list[float]
    gammas: list[float]


@dataclass
class Plan:
    """What to reconstruct and how: coefficients (targets, snapshots, profiles) and each target's error."""

    at: int
    sigma_rels: list[float]
    snapshots: list[SnapshotInfo]
    coeffs: np.ndarray
    errors: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    def subset(self, keep: Sequence[int]) -> Plan:
        """The plan of some of its targets only."""
        keep = list(keep)
        return Plan(self.at, [self.sigma_rels[i] for i in keep], self.snapshots, self.coeffs[keep],
                    self.errors[keep], self.config)

    @property
    def gammas(self) -> list[float]:
        """The exponent of each wanted profile."""
        return [gamma_from_sigma_rel(s) for s in self.sigma_rels]


def _load(path: Path) -> dict[str, Any]:
    # mmap: the header costs no read of the tensors, and a pass reads one tensor at a time.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_snapshots(run_dir: str | Path) -> list[SnapshotInfo]:
    """The usable snapshots of a run, oldest first; an unreadable one is named and left out."""
    directory = snapshot_dir(run_dir)
    found = []
    for nimg, path in list_snapshots(directory):
        try:
            s = _load(path)
            info = SnapshotInfo(int(s["nimg"]), path, int(s["batch"]), [float(v) for v in s["sigma_rels"]],
                                [float(v) for v in s["gammas"]])
            if info.nimg != nimg or len(s["shadows"]) != len(info.sigma_rels):
                raise ValueError("header and contents disagree")
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            log.warning("EMA snapshot %s is unreadable (%s); reconstructing without it", path,
                        (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
            continue
        found.append(info)
    if not found:
        raise PosthocError(f"{run_dir} has no EMA snapshots ({directory}/snapshot-*.pt): train with power-function "
                           "profiles (ema.sigma_rels, default [0.05, 0.1]); runs started before them have none")
    first = found[0]
    odd = [s.path.name for s in found if (s.batch, s.sigma_rels) != (first.batch, first.sigma_rels)]
    if odd:
        raise PosthocError(f"snapshots {odd[:3]} track other profiles or batches than {first.path.name}: "
                           f"{snapshot_dir(run_dir)} mixes runs; keep one run's snapshots there")
    return found


def check_sigma_rels(sigma_rels: Sequence[float]) -> None:
    """PosthocError (one line) for a width no power-function profile has."""
    bad = [s for s in sigma_rels if not 0.0 < s < SIGMA_REL_WIDEST]
    if bad or not sigma_rels:
        raise PosthocError(f"sigma_rel {bad[0] if bad else 'list'} is out of range: power-function EMA widths lie in "
                           f"(0, {SIGMA_REL_WIDEST:.4f}) (EDM2 uses 0.01 to 0.25), e.g. --sigma-rel 0.05,0.07")


def _basis(used: Sequence[SnapshotInfo]) -> list[tuple[float, int]]:
    return [(g, s.nimg) for s in used for g in s.gammas]


def reconstructable(snapshots: Sequence[SnapshotInfo], at: int, max_error: float,
                    grid: Sequence[float] | None = None) -> tuple[float, float] | None:
    """The widest interval of a sigma_rel grid around the tracked widths whose profiles the snapshots
    up to ``at`` reproduce within ``max_error`` (relative L2 over the per-update weights)."""
    used = [s for s in snapshots if s.nimg <= at]
    grid = list(grid if grid is not None else np.geomspace(0.003, SIGMA_REL_WIDEST * 0.999, 80))
    times = np.arange(used[0].batch, at + 1, used[0].batch, dtype=np.float64)
    _, err = solve(_basis(used), [(gamma_from_sigma_rel(s), at) for s in grid], times)
    ok = [s for s, e in zip(grid, err) if e <= max_error]
    return (min(ok), max(ok)) if ok else None


def plan(snapshots: Sequence[SnapshotInfo], sigma_rels: Sequence[float], at: int | None = None,
         max_error: float = 0.05) -> Plan:
    """Coefficients for every wanted sigma_rel at snapshot time ``at`` (default: the newest snapshot)."""
    check_sigma_rels(sigma_rels)
    times_avail = [s.nimg for s in snapshots]
    at = times_avail[-1] if at is None else int(at)
    if at not in times_avail:
        before = [t for t in times_avail if t <= at][-2:]
        after = [t for t in times_avail if t > at][:1]
        raise PosthocError(f"--at-images {at} is not a snapshot time; the nearest are {before + after} "
                           f"(snapshots every {times_avail[1] - times_avail[0] if len(times_avail) > 1 else '?'} "
                           f"images, {len(times_avail)} in all)")
    used = [s for s in snapshots if s.nimg <= at]
    if len(used) < min_snapshots:
        raise PosthocError(f"--at-images {at} has {len(used)} snapshot(s) at or before it; a reconstruction needs at "
                           f"least {min_snapshots}: choose a later snapshot time (the newest is {times_avail[-1]})")
    batch = used[0].batch
    times = np.arange(batch, at + 1, batch, dtype=np.float64)  # every EMA update: each global batch
    targets = [(gamma_from_sigma_rel(s), at) for s in sigma_rels]
    x, err = solve(_basis(used), targets, times)
    bad = [(s, e) for s, e in zip(sigma_rels, err) if e > max_error]
    if bad:
        s, e = bad[0]
        span = reconstructable(snapshots, at, max_error)
        where = f"; within it here: {span[0]:.3f} to {span[1]:.3f}" if span else ""
        fewer = f", only {len(used)} snapshots at or before {at} images (a later --at-images has more)" \
            if len(used) < len(snapshots) else ""
        raise PosthocError(f"sigma_rel {s:g} cannot be reconstructed at {at} images: the snapshots (tracked sigma_rel "
                           f"{used[0].sigma_rels}{fewer}) reproduce its profile only to {e:.1%} (limit --max-error "
                           f"{max_error:.0%}){where}")
    coeffs = x.reshape(len(sigma_rels), len(used), len(used[0].gammas))
    config = _load(used[-1].path)["config"]
    return Plan(at, [float(s) for s in sigma_rels], list(used), coeffs, err, config)


@torch.no_grad()
def reconstruct(p: Plan, targets: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """The fp32 weights of the targets ``targets`` (indices into ``p.sigma_rels``): one pass over the
    snapshots, each memory-mapped and read one tensor at a time."""
    acc: list[dict[str, torch.Tensor]] = []
    for j, snap in enumerate(p.snapshots):
        state = _load(snap.path)
        for k, shadow in enumerate(state["shadows"]):
            if not acc:
                acc = [{n: torch.zeros(t.shape, dtype=torch.float32) for n, t in shadow.items()} for _ in targets]
            for name, t in shadow.items():
                t32 = t.float()
                for a, r in zip(acc, targets):
                    a[name].add_(t32, alpha=float(p.coeffs[r, j, k]))
        del state
    return acc


def inference_state(p: Plan, index: int, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A checkpoint of one reconstructed profile: EMA index 0 for open_for_inference, plus its provenance."""
    s, at = p.sigma_rels[index], p.at
    return {
        "config": p.config,
        "ema": {"decays": [], "sigma_rels": [s], "warmup": False, "num_updates": at // p.snapshots[0].batch,
                "nimg": at, "shadows": [weights]},
        "posthoc": {"sigma_rel": s, "gamma": p.gammas[index], "at_images": at,
                    "profile_error": float(p.errors[index]),
                    "snapshots": [snap.path.name for snap in p.snapshots],
                    "tracked_sigma_rels": p.snapshots[0].sigma_rels,
                    "coefficients": p.coeffs[index].tolist()},
    }


def output_name(sigma_rel: float, at: int) -> str:
    """File name of a reconstructed profile: ema-sigma<sigma_rel>-<images, 12 digits>.pt."""
    return f"ema-sigma{sigma_rel:.4f}-{at:012d}.pt"


def write_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write one reconstructed checkpoint atomically (a full disk is one line, exit 74)."""
    with atomic_open(path, needed=state_bytes(state), what="reconstructed EMA checkpoint") as f:
        torch.save(state, f)
    return Path(path)


def groups(n: int, size: int) -> list[list[int]]:
    """Target indices in groups of ``size``: each group is one pass over the snapshots."""
    return [list(range(i, min(n, i + size))) for i in range(0, n, max(1, size))]
