"""SANet (Res2Net + shallow attention) and torchvision ResNet-50: shapes, training, local weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedfair_med.models import NETWORKS, build_network
from fedfair_med.models.sanet import Bottle2neck, Res2Net, probability_correction

torch.set_num_threads(1)
TINY_SANET = {"layers": (1, 1, 1, 1), "base_planes": 8, "channels": 8}


def test_networks_are_registered() -> None:
    assert {"sanet", "resnet50", "unet", "basicunet", "resnet18"} <= set(NETWORKS)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_sanet_outputs_one_logit_per_input_pixel(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_network("sanet", in_channels=3, out_channels=1, **TINY_SANET)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


def test_res2net_feature_strides_and_channels() -> None:
    backbone = Res2Net(3, layers=(1, 1, 1, 1), base_planes=8)
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256] == list(backbone.out_channels)


def test_res2net_block_is_hierarchical() -> None:
    """Changing the first channel group changes later groups' outputs (y_i sees y_{i-1})."""
    torch.manual_seed(0)
    block = Bottle2neck(64, 16, base_width=26, scale=4).eval()  # width 6, four groups
    x = torch.randn(1, 64, 8, 8)
    captured = {}
    block.convs[2].register_forward_hook(lambda m, i, o: captured.__setitem__("g3", i[0].clone()))
    block(x)
    before = captured["g3"]
    with torch.no_grad():
        block.convs[0].weight.add_(1.0)
    block(x)
    assert not torch.allclose(before, captured["g3"])


def test_default_sanet_is_res2net50_sized() -> None:
    model = build_network("sanet", in_channels=3, out_channels=1)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    # Res2Net-50 26w×4s has ~25.7M parameters with its 2048×1000 ImageNet head (~2.05M).
    assert 23.0e6 < backbone < 24.5e6
    assert [len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_sanet_learns_a_mask() -> None:
    torch.manual_seed(0)
    model = build_network("sanet", in_channels=3, out_channels=1, **TINY_SANET)
    y = torch.zeros(4, 1, 32, 32)
    for i, (r, c) in enumerate([(2, 4), (10, 12), (16, 3), (6, 18)]):
        y[i, :, r:r + 12, c:c + 10] = 1.0  # one bright 'polyp' per image
    x = 0.2 * torch.rand(4, 3, 32, 32) + 0.6 * y
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_probability_correction_keeps_signs_and_boosts_the_minority_side() -> None:
    logits = torch.full((1, 1, 10, 10), -2.0)
    logits[..., :1, :1] = 0.5  # one positive pixel out of 100
    corrected = probability_correction(logits)
    assert torch.equal(corrected > 0, logits > 0)
    assert corrected[0, 0, 0, 0] == pytest.approx(0.5 / 0.01)
    assert corrected[0, 0, 5, 5] == pytest.approx(-2.0 / 0.99)
    model = build_network("sanet", in_channels=3, out_channels=1, probability_correction=True,
                          **TINY_SANET)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        on = model(x)
        model.probability_correction = False
        off = model(x)
    torch.testing.assert_close(on, probability_correction(off))


def test_resnet50_classifier_shapes() -> None:
    model = build_network("resnet50", in_channels=3, out_channels=2)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    grey = build_network("resnet50", in_channels=1, out_channels=3)
    assert grey(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="2D"):
        build_network("resnet50", in_channels=3, out_channels=2, spatial_dims=3)


def test_resnet50_loads_a_local_imagenet_style_checkpoint(tmp_path: Path) -> None:
    """A 1000-class checkpoint: every backbone tensor loads, the replaced head is skipped."""
    from torchvision.models import resnet50

    torch.manual_seed(1)
    source = resnet50(weights=None)
    path = tmp_path / "resnet50-local.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = build_network("resnet50", in_channels=3, out_channels=2, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert model.fc.weight.shape == (2, 2048)


def test_sanet_weights_round_trip_and_backbone_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    trained = build_network("sanet", in_channels=3, out_channels=1, **TINY_SANET)
    full, backbone = tmp_path / "sanet.pt", tmp_path / "res2net.pt"
    torch.save(trained.state_dict(), full)
    torch.save(trained.backbone.state_dict(), backbone)
    torch.manual_seed(4)
    loaded = build_network("sanet", in_channels=3, out_channels=1, weights=str(full), **TINY_SANET)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    torch.manual_seed(5)
    partial = build_network("sanet", in_channels=3, out_channels=1, backbone_weights=str(backbone),
                            **TINY_SANET)
    torch.testing.assert_close(partial.backbone.layer2[0].convs[1].weight,
                               trained.backbone.layer2[0].convs[1].weight)
    assert not torch.allclose(partial.predict.weight, trained.predict.weight)


def test_a_weights_file_with_no_matching_tensor_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.block.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match=r"other.pt: no tensor matches network 'resnet50'"):
        build_network("resnet50", in_channels=3, out_channels=2, weights=str(path))
    with pytest.raises(ValueError, match=r"other.pt: no tensor matches the Res2Net backbone"):
        build_network("sanet", in_channels=3, out_channels=1, backbone_weights=str(path), **TINY_SANET)
    with pytest.raises(ValueError, match="unknown network"):
        build_network("sanet-xl", in_channels=3, out_channels=1)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_resnet18_without_batch_norm_keeps_no_batch_statistics(norm: str) -> None:
    torch.manual_seed(0)
    model = build_network("resnet18", in_channels=3, out_channels=2, norm=norm).train()
    assert not any("running_mean" in key or "num_batches" in key for key in model.state_dict())
    # What a site's batch holds (e.g. its label mix) cannot shift another image's output.
    images = torch.randn(4, 3, 32, 32)
    alone = model(images[:1])
    in_batch = model(torch.cat([images[:1], 5 * images[1:] + 3]))[:1]
    torch.testing.assert_close(alone, in_batch, rtol=1e-4, atol=1e-5)
    batch_norm = build_network("resnet18", in_channels=3, out_channels=2).train()
    assert not torch.allclose(batch_norm(images[:2])[:1], batch_norm(torch.cat([images[:1], 5 * images[1:2] + 3]))[:1])


def test_an_unknown_norm_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="norm must be one of batch, group, instance"):
        build_network("resnet18", in_channels=3, out_channels=2, norm="layer")


def test_resnet18_stem_stride_two_quarters_the_first_stage() -> None:
    maps = {}
    for stride in (1, 2):
        model = build_network("resnet18", in_channels=3, out_channels=2, stem_stride=stride)
        model.layer1.register_forward_hook(lambda _m, _i, out, s=stride: maps.__setitem__(s, out.shape[-2:]))
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert tuple(maps[1]) == (32, 32) and tuple(maps[2]) == (16, 16)
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        build_network("resnet18", in_channels=3, out_channels=2, stem_stride=4)
