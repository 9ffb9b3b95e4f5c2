"""Interop with the diffusers UNet2DModel format: import, export, and equal outputs."""

import json

import pytest
import torch

from models.interop import (
    convert_state_dict_from_diffusers,
    convert_state_dict_to_diffusers,
    diffusers_config_from_unet,
    load_diffusers_unet,
    unet_config_from_diffusers,
)
from models.unet import UNet, UNetConfig, count_parameters
from trainer.export import export_unet as export_diffusers_unet

diffusers = pytest.importorskip("diffusers")


def paper_config(**kw) -> dict:
    """A UNet2DModel config with the block structure of google/ddpm-cifar10-32 (small by default)."""
    cfg = {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
    }
    cfg.update(kw)
    return cfg


def random_diffusers(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)  # non-trivial weights everywhere, norms included
    return model


def inputs(config: dict, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.tensor([0, 999, 17, 500][:batch])
    return x, t


def test_import_saved_unet2dmodel_matches_outputs(tmp_path):
    config = paper_config()
    theirs = random_diffusers(config)
    theirs.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    ours = load_diffusers_unet(tmp_path).eval()
    assert ours.cfg.attn_resolutions == (8,) and ours.cfg.num_heads == 1
    x, t = inputs(config)
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert got.abs().mean() > 1e-2  # the comparison is not trivially between zeros
    assert torch.allclose(got, expected, atol=1e-4)


def test_export_loads_in_diffusers_and_round_trips(tmp_path):
    config = paper_config()
    theirs = random_diffusers(config, seed=3)
    cfg = unet_config_from_diffusers(config)
    ours = UNet(cfg).eval()
    ours.load_state_dict(convert_state_dict_from_diffusers(theirs.state_dict(), cfg))
    export_diffusers_unet(ours, tmp_path / "export")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "export").eval()
    x, t = inputs(config)
    with torch.no_grad():
        assert torch.allclose(back(x, t).sample, ours(x, t), atol=1e-4)
    # exact state-dict round trip
    sd = convert_state_dict_to_diffusers(ours.state_dict(), cfg)
    ref = theirs.state_dict()
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    "extra",
    [
        dict(num_classes=4, scale_shift_norm=True),
        dict(num_head_channels=16, channel_mult=(1, 2, 2), image_size=16, attn_resolutions=(8, 4)),
    ],
    ids=["class-cond-scale-shift", "multi-head-3-levels"],
)
def test_opt_in_features_export_to_diffusers(tmp_path, extra):
    base = dict(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(8,), dropout=0.0)
    base.update(extra)
    cfg = UNetConfig(**base)
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    export_diffusers_unet(ours, tmp_path)
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    x, t = inputs({"sample_size": 16, "in_channels": 3}, batch=3)
    y = torch.tensor([0, 3, 4]) if cfg.num_classes else None  # 4 = the null label
    with torch.no_grad():
        assert torch.allclose(theirs(x, t, class_labels=y).sample, ours(x, t, y), atol=1e-4)
    assert load_diffusers_unet(tmp_path).cfg == cfg


def test_paper_cifar10_config_converts_exactly():
    # the published google/ddpm-cifar10-32 configuration, full size
    config = paper_config(
        sample_size=32,
        block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=2,
    )
    cfg = unet_config_from_diffusers(config)
    assert cfg == UNetConfig(dropout=0.0)  # the paper's CIFAR-10 UNet (dropout is a training knob)
    theirs = random_diffusers(config)
    assert count_parameters(theirs) == count_parameters(UNet(cfg))
    ours = UNet(cfg).eval()
    ours.load_state_dict(convert_state_dict_from_diffusers(theirs.state_dict(), cfg))
    x, t = inputs(config)
    with torch.no_grad():
        assert torch.allclose(ours(x, t), theirs(x, t).sample, atol=1e-4)


def test_paper_256_config_has_the_same_parameters():
    config = paper_config(
        sample_size=256,
        block_out_channels=[128, 128, 256, 256, 512, 512],
        down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
        layers_per_block=2,
    )
    cfg = unet_config_from_diffusers(config)
    assert cfg == UNetConfig(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel(**config)
        ours = UNet(cfg)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    converted = convert_state_dict_to_diffusers(ours.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes


def test_legacy_attention_names_and_bin_and_pipeline_folder(tmp_path):
    # the google/ddpm-* uploads name attention weights query/key/value/proj_attn
    config = paper_config()
    theirs = random_diffusers(config, seed=5)
    legacy = {}
    for k, v in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    unet_dir = tmp_path / "pipeline" / "unet"
    unet_dir.mkdir(parents=True)
    torch.save(legacy, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
    ours = load_diffusers_unet(tmp_path / "pipeline").eval()
    x, t = inputs(config)
    with torch.no_grad():
        assert torch.allclose(ours(x, t), theirs(x, t).sample, atol=1e-4)


def test_state_dict_of_another_architecture_names_keys():
    config = paper_config()
    theirs = random_diffusers(config)
    wrong = unet_config_from_diffusers(paper_config(layers_per_block=2))
    with pytest.raises(ValueError, match=r"missing keys: .*resnets\.1\."):
        convert_state_dict_from_diffusers(theirs.state_dict(), wrong)
    smaller = unet_config_from_diffusers(paper_config(down_block_types=["DownBlock2D", "DownBlock2D"],
                                                      up_block_types=["UpBlock2D", "UpBlock2D"]))
    with pytest.raises(ValueError, match=r"keys this UNet config does not use.*attentions\.0\.to_k"):
        convert_state_dict_from_diffusers(theirs.state_dict(), smaller)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(flip_sin_to_cos=True), "flip_sin_to_cos"),
        (dict(freq_shift=0), "freq_shift"),
        (dict(downsample_padding=1), "downsample_padding"),
        (dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]), "down_block_types"),
        (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "up_block_types"),
        (dict(block_out_channels=[32, 48]), "block_out_channels"),
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(resnet_time_scale_shift="scale_shift"), "attn_norm_num_groups"),
    ],
)
def test_unsupported_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers(paper_config(**change))


def test_config_round_trip_and_unrepresentable():
    cfg = UNetConfig(num_classes=10, num_head_channels=64, scale_shift_norm=True)
    assert unet_config_from_diffusers(diffusers_config_from_unet(cfg)) == UNetConfig(
        num_classes=10, num_head_channels=64, scale_shift_norm=True, dropout=0.1
    )
    with pytest.raises(ValueError, match="model.num_heads"):
        diffusers_config_from_unet(UNetConfig(num_heads=2))
    with pytest.raises(ValueError, match="model.resample_with_conv"):
        diffusers_config_from_unet(UNetConfig(resample_with_conv=False))


def test_missing_folder_contents(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(paper_config()))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_diffusers_unet(tmp_path)


# --------------------------------------------------------------------------- the schedule and ddpm-export


@pytest.mark.parametrize("diff, schedule, prediction", [
    (dict(), "linear", "epsilon"),
    (dict(timesteps=100, beta_start=2e-4, beta_end=0.03, target="v"), "linear", "v_prediction"),
    (dict(schedule="cosine", timesteps=50, target="x0"), "squaredcos_cap_v2", "sample"),
    (dict(schedule="cosine", timesteps=50, cosine_s=0.02), "linear", "epsilon"),  # as trained_betas
])
def test_scheduler_config_loads_with_the_run_schedule(tmp_path, diff, schedule, prediction):
    from models.diffusion import DiffusionConfig, make_betas
    from models.interop import diffusers_scheduler_config

    cfg = DiffusionConfig(**diff)
    config = diffusers_scheduler_config(cfg)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert sched.config.num_train_timesteps == cfg.timesteps
    assert sched.config.prediction_type == prediction and sched.config.clip_sample
    assert sched.config.beta_schedule == schedule and (sched.config.trained_betas is not None) == ("cosine_s" in diff)
    torch.testing.assert_close(sched.betas.double(), make_betas(cfg), rtol=1e-6, atol=1e-7)


def _trained_like_run(run_dir, **overrides):
    """A run directory with one checkpoint, as the trainer writes it, of a tiny UNet with random weights."""
    from pathlib import Path

    from trainer.checkpoint import CheckpointManager
    from trainer.config import fingerprint, load_config, to_dict

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "tests" / "configs" / "tiny.yaml",
                      [f"run.dir={run_dir}"] + [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    model = UNet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised output layers would hide a wrong mapping
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    d = to_dict(cfg)
    state = {"model": model.state_dict(), "ema": {"decays": [0.999], "shadows": [ema]}, "optimizer": {},
             "train_state": {"nimg": 8}, "config": d, "fingerprint": fingerprint(d)}
    CheckpointManager(run_dir / "checkpoints", async_write=False).save(state, 8)
    return cfg, model, ema


@pytest.mark.slow
def test_ddpm_export_gives_a_pipeline_with_the_run_schedule(tmp_path, capsys):
    from trainer.export import main as export_main

    cfg, model, ema = _trained_like_run(tmp_path / "run")  # tiny.yaml: T = 100, not diffusers' 1000
    out = tmp_path / "exported"
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.num_train_timesteps == 100
    torch.testing.assert_close(scheduler.betas, torch.linspace(1e-4, 0.02, 100), rtol=0, atol=1e-9)
    # The EMA weights by default: diffusers' UNet computes what ours does with them.
    ours = UNet(cfg.model).eval()
    ours.load_state_dict(ema)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 97])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, ours(x, t), atol=1e-4, rtol=1e-4)
    images = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)(
        batch_size=1, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and 0.0 <= images.min() <= images.max() <= 1.0
    pipe = diffusers.DDPMPipeline.from_pretrained(out)  # the folder as a whole
    assert pipe.scheduler.config.num_train_timesteps == 100
    # --weights model exports the raw weights instead.
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "raw"), "--weights", "model"]) == 0
    raw = diffusers.UNet2DModel.from_pretrained(tmp_path / "raw" / "unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(raw(x, t).sample, model.eval()(x, t), atol=1e-4, rtol=1e-4)
    # A model diffusers cannot represent, or no checkpoint: one line, exit code 2.
    _trained_like_run(tmp_path / "avgpool", **{"model.resample_with_conv": "false"})
    capsys.readouterr()
    assert export_main(["--run-dir", str(tmp_path / "avgpool"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be exported to diffusers: model.resample_with_conv" in err[0], err
    assert export_main(["--run-dir", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-export: error: ") and "does not exist" in err[0], err
