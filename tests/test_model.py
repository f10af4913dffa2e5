"""The U-Net: shapes for every suggested channel_mult, labels, zero-initialised output, and that a
tiny one can fit a fixed batch."""

from __future__ import annotations

import pytest
import torch

from model import UNet, count_parameters, timestep_embedding


@pytest.mark.parametrize("channel_mult", [(1, 2), (1, 2, 2), (1, 2, 2, 2)])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_output_has_the_input_shape(channel_mult, num_classes):
    model = UNet(
        model_channels=16,
        channel_mult=channel_mult,
        num_res_blocks=1,
        attention_resolutions=(14, 7),
        num_classes=num_classes,
    )
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])
    labels = None if num_classes is None else torch.tensor([0, 9, 10])  # 10 is the null label
    assert model(x, t, labels).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("model_channels", [8, 24, 50])
def test_attention_works_for_channel_counts_that_heads_do_not_divide(model_channels):
    model = UNet(
        model_channels=model_channels, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,)
    )
    assert model(torch.randn(2, 1, 28, 28), torch.tensor([3, 4])).shape == (2, 1, 28, 28)


def test_default_model_is_light_and_starts_at_zero():
    model = UNet()
    assert 2_000_000 < count_parameters(model) < 10_000_000
    # the last conv is zero-initialised, so the untrained network predicts exactly 0
    assert model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).abs().max().item() == 0.0


def test_labels_change_the_output_of_a_conditional_model():
    torch.manual_seed(0)
    model = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_classes=10).eval()
    for parameter in model.parameters():  # undo the zero-initialised layers, which hide the labels
        torch.nn.init.normal_(parameter, std=0.1)
    x, t = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1), torch.tensor([10, 10])
    out = model(x, t, torch.tensor([3, 10]))
    assert not torch.allclose(out[0], out[1])
    # no labels means the null label
    torch.testing.assert_close(model(x[:1], t[:1]), out[1:])


def test_timestep_embedding_is_sinusoidal():
    embedding = timestep_embedding(torch.tensor([0, 5]), 8)
    assert embedding.shape == (2, 8)
    torch.testing.assert_close(embedding[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(embedding[1, :4], torch.cos(5 * frequencies))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = UNet(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0
    )
    x, t = torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,))
    target = torch.randn(8, 1, 28, 28).clamp(-1, 1) * 0.5 + x * 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
