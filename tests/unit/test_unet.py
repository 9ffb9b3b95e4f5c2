"""UNet: shapes, the paper's parameter counts, the attention math, validation, compile and bf16."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.unet import (
    UNet,
    UNetConfig,
    check_state_dict,
    count_parameters,
    load_unet_state_dict,
    timestep_embedding,
)


def tiny(**kw) -> UNetConfig:
    base = dict(
        image_size=16,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
    )
    base.update(kw)
    return UNetConfig(**base)


def randomized(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised output layers are randomised, so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def test_output_shape_and_dtype():
    model = randomized(tiny(out_channels=6))
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.tensor([0, 10, 999]))
    assert out.shape == (3, 6, 16, 16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # other resolutions divisible by the downsampling factor work too (attention placement is fixed)
    assert model(torch.randn(1, 3, 24, 8), torch.tensor([5])).shape == (1, 6, 24, 8)


def test_output_depends_on_timestep_and_input():
    model = randomized(tiny())
    x = torch.randn(2, 3, 16, 16)
    a = model(x, torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, torch.tensor([500, 500])))
    # samples in a batch are processed independently
    assert torch.allclose(a[1:], model(x[1:], torch.tensor([1])), atol=1e-5)
    # a scalar timestep broadcasts; float timesteps are accepted
    assert torch.allclose(a, model(x, torch.tensor(1)), atol=1e-6)
    assert torch.allclose(a, model(x, torch.tensor([1.0, 1.0])), atol=1e-6)


@pytest.mark.parametrize(
    "cfg, paper",
    [
        (UNetConfig(), 35.7e6),  # CIFAR-10
        (UNetConfig(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0), 114e6),  # LSUN / CelebA-HQ
    ],
    ids=["cifar10_32", "paper_256"],
)
def test_paper_parameter_counts(cfg, paper):
    with torch.device("meta"):
        model = UNet(cfg)
    n = count_parameters(model)
    assert abs(n - paper) / paper < 0.005, n


def test_timestep_embedding_is_the_papers():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 128)
    assert emb.shape == (3, 128)
    # [sin, cos] halves; frequencies from 1 down to exactly 1/10000 (freq_shift = 1)
    assert torch.allclose(emb[:, 0], torch.sin(t.float()))
    assert torch.allclose(emb[:, 64], torch.cos(t.float()))
    assert torch.allclose(emb[:, 63], torch.sin(t.float() / 10000), atol=1e-6)
    k = 17
    freq = math.exp(-math.log(10000) * k / 63)
    assert torch.allclose(emb[:, k], torch.sin(t.float() * freq), atol=1e-5)


def test_single_head_attention_matches_the_paper_formula():
    model = randomized(tiny())
    attn = model.down_blocks[1].attentions[0]  # at resolution 8
    assert attn.heads == 1
    x = torch.randn(2, 64, 8, 8)
    h = attn.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = attn.qkv(h).chunk(3, dim=-1)
    w = torch.softmax(q @ k.transpose(1, 2) * 64**-0.5, dim=-1)  # paper: C ** -0.5
    expected = x + attn.proj_out(w @ v).transpose(1, 2).reshape(2, 64, 8, 8)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_multi_head_attention():
    model = randomized(tiny(num_head_channels=16))
    attn = model.down_blocks[1].attentions[0]
    assert attn.heads == 64 // 16
    x = torch.randn(1, 64, 8, 8)
    h = attn.norm(x).flatten(2).transpose(1, 2)
    q, k, v = (z.reshape(1, 64, 4, 16).transpose(1, 2) for z in attn.qkv(h).chunk(3, dim=-1))
    o = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v  # (1, 4, 64, 16)
    expected = x + attn.proj_out(o.transpose(1, 2).reshape(1, 64, 64)).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(attn(x), expected, atol=1e-5)
    assert randomized(tiny(num_heads=2)).mid_block.attention.heads == 2


def test_downsampling_pads_like_tf_same():
    model = randomized(tiny())
    down = model.down_blocks[0].downsample
    x = torch.randn(1, 32, 16, 16)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.allclose(down(x), expected)
    pooled = randomized(tiny(resample_with_conv=False)).down_blocks[0].downsample(x)
    assert torch.allclose(pooled, F.avg_pool2d(x, 2))


def test_class_conditioning_and_null_label():
    model = randomized(tiny(num_classes=10))
    assert model.class_embed.num_embeddings == 11  # one extra learned null label
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    a = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, t, torch.tensor([2, 2])))
    null = model(x, t, torch.tensor([10, 10]))
    assert torch.allclose(null, model(x, t, torch.tensor([-1, -1])))  # negative = null
    assert torch.allclose(null, model(x, t))  # no labels = null
    with pytest.raises(ValueError, match="y: this model is unconditional"):
        randomized(tiny())(x, t, torch.tensor([1, 1]))


def test_scale_shift_norm_changes_the_block():
    model = randomized(tiny(scale_shift_norm=True))
    assert model.mid_block.resnets[0].time_emb_proj.out_features == 2 * 64
    out = model(torch.randn(1, 3, 16, 16), torch.tensor([7]))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_paper_init_starts_near_zero_output():
    torch.manual_seed(0)
    out = UNet(tiny()).eval()(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out.abs().max() < 1e-3  # conv_out is initialised at scale 1e-10 as in the paper


def test_dropout_only_in_training():
    model = randomized(tiny(dropout=0.5))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([4])
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(image_size=17), "model.image_size"),
        (dict(channel_mult=(1, 2, 2, 2), image_size=20), "model.image_size"),
        (dict(attn_resolutions=(5,)), "model.attn_resolutions"),
        (dict(base_channels=24), "model.base_channels"),
        (dict(num_heads=3), "model.num_heads"),
        (dict(num_head_channels=24), "model.num_head_channels"),
        (dict(dropout=1.5), "model.dropout"),
        (dict(channel_mult=()), "model.channel_mult"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        UNet(tiny(**kw))


def test_bad_input_names_the_problem():
    model = randomized(tiny())
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 15, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


def test_state_dict_mismatch_names_keys():
    model = UNet(tiny())
    other = UNet(tiny(num_res_blocks=2)).state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys: .*down_blocks\.0\.resnets\.1\."):
        model.load_state_dict(other)
    wide = UNet(tiny(base_channels=64)).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches: .*conv_in\.weight: checkpoint \(64, 3, 3, 3\)"):
        check_state_dict(model, wide)
    sd = dict(model.state_dict())
    sd.pop("conv_out.bias")
    with pytest.raises(ValueError, match="missing keys: conv_out.bias"):
        model.load_state_dict(sd)


def test_state_dict_names_are_stable_and_prefixes_are_stripped():
    src = randomized(tiny(), seed=1)
    names = list(src.state_dict())
    assert all(not n.startswith(("module.", "_orig_mod.")) for n in names)
    assert "down_blocks.1.attentions.0.qkv.weight" in names
    prefixed = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    dst = UNet(tiny())
    load_unet_state_dict(dst, prefixed)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([9])
    assert torch.equal(dst.eval()(x, t), src(x, t))


def test_channels_last_matches():
    model = randomized(tiny())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = model(x, t)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bf16_autocast_forward_backward():
    model = randomized(tiny()).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model.eval()(x, t)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = randomized(tiny(num_classes=4, dropout=0.0))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, -1])
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-4, rtol=1e-4)
    # the state dict of the compiled wrapper maps back without _orig_mod. through load_unet_state_dict
    dst = UNet(model.cfg).eval()
    load_unet_state_dict(dst, compiled.state_dict())
    assert torch.equal(dst(x, t, y), model(x, t, y))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_compiled():
    model = randomized(tiny()).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    t = torch.tensor([0, 1, 500, 999], device="cuda")
    with torch.no_grad():
        ref = model(x, t)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x, t)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
