"""What TensorBoard shows of a run, read back with TensorBoard's own readers: the resolved config as
text and the HPARAMS entry at every (re)start, in the run's own event files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def train(run: Path, shards: Path, *overrides: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(TINY), f"run.dir={run}",
           f"data.shards={shards}", "log.sample_every_images=0", "checkpoint.every_images=32", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def raw_events(tb: Path) -> list:
    """Every event of every event file in ``tb``, in file order (what TensorBoard loads)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return [e for f in sorted(tb.glob("events.out.tfevents.*")) for e in LegacyEventFileLoader(str(f)).Load()]


def hparams_backend(run: Path):
    """The HPARAMS plugin's own backend over the run's folder, as `tensorboard --logdir run` serves it."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(run))
    mux.Reload()
    tb = base_plugin.TBContext(logdir=str(run), multiplexer=mux,
                               data_provider=data_provider.MultiplexerDataProvider(mux, str(run)))
    return context.RequestContext(), backend_context.Context(tb)


@pytest.mark.slow
def test_config_text_and_hparams_at_every_start(tmp_path: Path) -> None:
    from google.protobuf import json_format
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, get_experiment, list_session_groups, metadata

    from trainer.monitor import HPARAM_METRICS

    run, shards = tmp_path / "run", tmp_path / "shards"
    train(run, shards, "train.total_images=32")  # 4 steps of 8

    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    # The resolved config, as markdown text (tag `config`), at the first step.
    texts = acc.Tensors("config/text_summary")
    assert [t.step for t in texts] == [0]
    yaml_text = texts[0].tensor_proto.string_val[0].decode()
    assert yaml_text.startswith("```yaml\nrun:") and "image_size: 16" in yaml_text and "total_images: 32" in yaml_text
    assert f"dir: {run}" in yaml_text
    # The hparams session: written before the first scalar, at step 0, readable by the plugin's parsers.
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(content) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert {"train.lr", "train.batch_size", "model.image_size", "diffusion.timesteps", "run.seed"} <= set(start.hparams)
    assert start.hparams["model.image_size"].number_value == 16 and start.hparams["train.total_images"].number_value == 32
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    events = raw_events(run / "tb")
    first_scalar = next(i for i, e in enumerate(events) if any(v.tag == "train/loss" for v in e.summary.value))
    hp = [(i, e.step) for i, e in enumerate(events) if any(v.tag == metadata.SESSION_START_INFO_TAG
                                                           for v in e.summary.value)]
    assert len(hp) == 1 and hp[0][1] == 0 and hp[0][0] < first_scalar

    # The HPARAMS tab: the plugin's backend lists the run with its hparams and fills the
    # train/loss column from the run's own scalars.
    rctx, backend = hparams_backend(run)
    exp = get_experiment.Handler(rctx, backend, "", api_pb2.GetExperimentRequest()).run()
    assert "train.lr" in {h.name for h in exp.hparam_infos}
    assert {m.name.tag for m in exp.metric_infos} == set(HPARAM_METRICS)
    request = json_format.Parse('{"startIndex": 0, "sliceSize": 10, "colParams": [{"metric": {"tag": "train/loss"}}],'
                                '"allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"]}',
                                api_pb2.ListSessionGroupsRequest())
    groups = list_session_groups.Handler(rctx, backend, "", request).run().session_groups
    assert len(groups) == 1 and [s.name for s in groups[0].sessions] == ["tb"]
    loss = {m.name.tag: m for m in groups[0].metric_values}["train/loss"]
    assert loss.training_step == 4 and loss.value == pytest.approx(acc.Scalars("train/loss")[-1].value)

    # A restart (here: training longer) writes its own resolved config and session at its first step.
    train(run, shards, "train.total_images=48")
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {t.step: t.tensor_proto.string_val[0].decode() for t in acc.Tensors("config/text_summary")}
    assert sorted(texts) == [0, 4] and "total_images: 48" in texts[4] and "total_images: 32" in texts[0]
    starts = [e.step for e in raw_events(run / "tb") if any(v.tag == metadata.SESSION_START_INFO_TAG
                                                              for v in e.summary.value)]
    assert starts == [0, 4]
    # TensorBoard keeps the first metadata of a tag per run, so the HPARAMS tab goes on showing the
    # first start's values (README, 3. Watch, says so); every start's own config is the text above.
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["train.total_images"].number_value == 32
