"""The benchmarks/ commands: each starts, measures what it is given, refuses what it cannot honour.

Also the one shared timing helper (interleaved arms, medians, ratios, CPU clocks, the JSON report).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import timing

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("trainer", "loader", "model", "convergence", "gpu_check")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_benchmark_answers_help(name: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"python -m benchmarks.{name}" in proc.stdout


def _mixed_size_shards(folder: Path, shards: int = 3, per_shard: int = 5) -> list[Path]:
    """Manifest-less shards as other tools write them: JPEG and PNG, RGB and grayscale, any size."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 30), (24, 24), (50, 70), (33, 61), (90, 45)]
    paths = []
    for s in range(shards):
        path = folder / f"part-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                w, h = sizes[(s + i) % len(sizes)]
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                if i == 1:
                    img = img.convert("L")
                buf = io.BytesIO()
                ext = "png" if i == 2 else "jpg"
                img.save(buf, format="PNG" if ext == "png" else "JPEG")
                sink.write({"__key__": f"s{s}/{i:04d}", ext: buf.getvalue()})
        paths.append(path)
    return paths


def test_loader_benchmark_measures_the_given_mixed_size_shards_at_the_given_size(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    from benchmarks import loader

    made = _mixed_size_shards(tmp_path)
    report = tmp_path / "report.json"
    rc = loader.main(["--shards", str(tmp_path / "part-{000000..000002}.tar"), "--size", "16", "--workers", "1",
                      "--batch", "4", "--seconds", "0.3", "--repeats", "1", "--gpus", "1",
                      "--arms", "ceiling,loader,webdataset,startup", "--json", str(report)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Traceback" not in printed.err
    r = json.loads(report.read_text())["results"]
    # the shards it read are ours, not generated ones: their names, their sample count
    assert r["shards"]["source"] == "given" and r["shards"]["count"] == len(made)
    assert r["shards"]["urls"] == [str(p) for p in made]
    assert r["startup"]["samples"] == 15 and r["ceiling"]["images"] == 15
    # every arm brought every image to --size, whatever its size or mode
    assert r["size"] == 16 and r["ceiling"]["already_at_size"] == 0
    for arm in ("loader", "webdataset"):
        assert r[arm]["batch_shape"] == [4, 3, 16, 16] and r[arm]["dtype"] == "uint8", arm
        assert r[arm]["images_per_s"] > 0 and r[arm]["images_per_cpu_s"] > 0
    assert "verdict" in r and r["verdict"]["images_per_worker_cpu_s"] > 0
    assert "(given)" in printed.out and "-> 16px" in printed.out


@pytest.mark.parametrize("module,argv,words", [
    ("loader", ["--shards", "SHARDS", "--varied"], "--varied"),
    ("loader", ["--shards", "SHARDS", "--arms", "ceiling", "--workers", "3"], "no arm starts workers"),
    ("loader", ["--shards", "/nonexistent/part-{0..3}.tar"], "matches no file"),
    ("trainer", ["--measure", "ema", "--shards", "SHARDS"], "step"),
    ("trainer", ["--measure", "steps"], "--measure"),
    ("trainer", ["--config", "no_such_preset"], "presets"),
    ("model", ["--count-only", "--batch", "4"], "--count-only"),
    ("convergence", ["--prepare-only", "--seeds", "3"], "--prepare-only"),
    ("convergence", ["--sampler", "ddpm", "--eta", "1"], "DDIM"),
    ("gpu_check", ["--cpu", "--sections", "nope"], "unknown sections"),
])
def test_a_combination_that_cannot_be_honoured_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, module: str, argv: list[str], words: str) -> None:
    import importlib

    _mixed_size_shards(tmp_path)
    argv = [a.replace("SHARDS", str(tmp_path)) for a in argv]
    if module == "gpu_check":
        argv += ["--out", str(tmp_path / "r.json")]
    main = importlib.import_module(f"benchmarks.{module}" + (".cli" if module == "gpu_check" else "")).main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert err.startswith(f"benchmarks.{module}: ")


def test_trainer_benchmark_measures_layout_handoff_and_ema(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import trainer

    report = tmp_path / "r.json"
    rc = trainer.main(["--measure", "layout,grad_handoff,ema", "--batch-per-gpu", "2", "--repeats", "2",
                       "--warmup", "0", "--threads", "1", "--json", str(report), "model.base_channels=32"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(report.read_text())["results"]
    assert r["layout"]["batch"] == 2 and r["layout"]["model_layout"] == "contiguous"  # the CPU model's layout
    assert set(r["layout"]["ms"]) == {"contiguous", "channels_last"} and len(r["layout"]["runs_s"]["contiguous"]) == 2
    assert r["grad_handoff"]["gradients"] > 0 and r["grad_handoff"]["kept_over_copy"] > 0
    assert r["ema"]["ms"]["fused"] > 0 and r["ema"]["loop_over_fused"] > 0


def test_convergence_prepare_only_makes_the_shards_a_config_trains_on(tmp_path: Path) -> None:
    from benchmarks import convergence
    from data_pipeline.shards import resolve_shards

    target = tmp_path / "digits16"
    assert convergence.main(["--prepare-only", f"data.shards={target}"]) == 0
    shards = resolve_shards(str(target))
    assert shards.image_size == 16 and shards.num_samples == 1797 and len(shards.classes) == 10
    assert convergence.main(["--prepare-only", f"data.shards={target}"]) == 0  # kept, not remade


# ----------------------------------------------------------------------------- the timing helper


def test_interleave_runs_arms_round_robin_and_drops_the_warmup() -> None:
    calls: list[str] = []

    def arm(name: str):
        def run() -> int:
            calls.append(name)
            return len(calls)
        return run

    out = timing.interleave({"a": arm("a"), "b": arm("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3
    assert out == {"a": [3, 5], "b": [4, 6]}


def test_summarize_gives_medians_and_ratios_to_the_first_arm() -> None:
    s = timing.summarize({"fast": [1.0, 3.0, 2.0], "slow": [4.0, 8.0, 6.0, float("nan")]})
    assert s["fast"]["median"] == 2.0 and s["slow"]["median"] == 6.0  # NaN runs are left out
    assert s["fast"]["ratio"] == 1.0 and s["slow"]["ratio"] == pytest.approx(3.0)
    assert timing.summarize({"a": [2.0], "b": [1.0]}, base="b")["a"]["ratio"] == 2.0
    assert timing.median([]) != timing.median([])  # NaN for no values


def test_rates_and_cpu_clocks() -> None:
    wall, cpu = timing.rate(lambda: sum(range(2000)) * 0 + 10, 0.05)
    assert wall > 0 and cpu > 0
    assert timing.cpu_seconds([os.getpid()]) > 0 and timing.cpu_seconds([2**22 + 12345]) == 0.0  # gone: 0
    import torch

    batches = itertools.repeat({"image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8)})  # endless, as a loader
    r = timing.stream_rate(batches, 0.02, warmup_batches=2)
    assert r["batch_shape"] == [4, 3, 8, 8] and r["dtype"] == "uint8" and r["processes"] == 1
    assert r["images"] % 4 == 0 and r["images_per_s"] > 0


def test_report_is_written_atomically_with_its_command(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(json=str(tmp_path / "sub" / "r.json"), repeats=3)
    timing.finish("benchmarks.x", ["--repeats", "3"], args, {"figure": 1.5, "nan": float("nan")})
    doc = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert doc["command"] == "python -m benchmarks.x --repeats 3" and doc["results"]["figure"] == 1.5
    assert doc["options"]["repeats"] == 3 and "torch" in doc["environment"]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_explicit_tells_given_options_from_defaults() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--a", type=int, default=1)
    p.add_argument("--b", action="store_true")
    assert timing.explicit(p, ["--a", "1"]) == {"a"}
    assert timing.explicit(p, []) == set() and p.parse_args([]).a == 1  # defaults restored
    with pytest.raises(timing.UsageError, match="--b has no effect with x"):
        timing.refuse_unused({"b"}, ["b"], "with x")
