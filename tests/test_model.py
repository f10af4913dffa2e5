"""The U-Net: shapes for every suggested channel_mult, labels, zero-initialised output, that a
tiny one can fit a fixed batch, and that NHWC gives the same numbers with NHWC gradients, compiled
or not."""

from __future__ import annotations

import copy

import pytest
import torch

from ddpm.plumbing.checkpointing import build_model
from model import ChannelsLastGradient, ResidualBlock, UNet, count_parameters, timestep_embedding


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
    assert (out[0] - out[1]).abs().mean() > 0.01 * out.abs().mean()
    # no labels means the null label
    torch.testing.assert_close(model(x[:1], t[:1]), out[1:])


@pytest.mark.parametrize("width", [8, 32, 64])
def test_every_residual_block_sees_the_embedding(width):
    """With scale_shift_norm the embedding (t and label) moves a block's output at every width, also
    where GroupNorm has one channel per group (widths up to 32); added before that norm, as in
    checkpoints written before scale_shift_norm, it is subtracted again there."""
    torch.manual_seed(0)
    x, embeddings = torch.randn(1, width, 7, 7).repeat(2, 1, 1, 1), torch.randn(2, 32)
    for scale_shift_norm in (True, False):
        block = ResidualBlock(width, width, 32, dropout=0.0, scale_shift_norm=scale_shift_norm)
        torch.nn.init.normal_(block.out_layers[-1].weight, std=0.1)  # undo the zero init
        out = block(x, embeddings)
        moved = (out[0] - out[1]).abs().mean() / out.abs().mean()
        if scale_shift_norm or width > 32:
            assert moved > 0.01
        else:
            assert moved < 1e-5


def test_checkpoints_without_scale_shift_norm_build_the_legacy_unet():
    config = {"model": {"model_channels": 8, "channel_mult": [1, 2], "attention_resolutions": []}}
    assert not build_model(config).middle_block_in.scale_shift_norm
    assert build_model(
        {"model": config["model"] | {"scale_shift_norm": True}}
    ).middle_block_in.scale_shift_norm


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


def test_conv_hands_back_an_nhwc_gradient_for_a_channel_slice():
    # torch.cat's backward gives each input a channel slice of the gradient: strided, neither NCHW
    # nor NHWC. ChannelsLastGradient, which model.Conv2d puts after an NHWC output, hands it on as
    # NHWC with the same values (what cuDNN would otherwise copy it into inside its backward).
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    gradient = torch.randn(2, 8, 5, 5)[:, 2:6]  # a channel slice, as torch.cat's backward makes
    assert not gradient.is_contiguous() and not gradient.is_contiguous(memory_format=torch.channels_last)
    ChannelsLastGradient.apply(x).backward(gradient)
    assert x.grad.is_contiguous(memory_format=torch.channels_last) and torch.equal(x.grad, gradient)


def test_channels_last_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = UNet(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,), dropout=0.0
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)  # no zero-initialised layer blocking the gradient
    nhwc_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])
    outputs = []
    for network, images in ((model, x), (nhwc_model, x.to(memory_format=torch.channels_last))):
        output = network(images, t)
        output.square().mean().backward()
        outputs.append(output)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    nhwc_parameters = dict(nhwc_model.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(nhwc_parameters[name].grad, parameter.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_channels_last_training_step_is_one_graph_with_eager_numbers():
    """torch.compile traces an NHWC bf16 training step of the U-Net, ChannelsLastGradient included,
    as one graph (fullgraph=True raises at any graph break), and the traced forward and backward give
    eager's outputs and gradients. backend="aot_eager" runs the traced graphs without generating code.
    Which layout each convolution_backward then receives shows only as speed on a GPU
    (docs/benchmarks.md); test_conv_hands_back_an_nhwc_gradient_for_a_channel_slice checks the
    layout ChannelsLastGradient hands on. Tolerance: bf16's (measured: identical)."""
    torch.manual_seed(0)
    model = UNet(
        model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,), dropout=0.0
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)  # no zero-initialised layer blocking the gradient
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 1, 28, 28).to(memory_format=torch.channels_last)
    t = torch.tensor([1, 900])
    outputs = []
    try:
        for network in (model, torch.compile(twin, backend="aot_eager", fullgraph=True)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = network(x, t)
            output.float().square().mean().backward()
            outputs.append(output)
    finally:
        torch.compiler.reset()  # leave no compiled UNet.forward behind for other tests
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-2, atol=1e-3)
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(twin_parameters[name].grad, parameter.grad, rtol=1e-2, atol=1e-4, msg=name)
