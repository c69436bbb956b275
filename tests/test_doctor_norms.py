"""The doctor on a normalisation layer that amplifies the gradient far beyond its input's
scale: groups of its input that are constant, divided by sqrt(eps) (gradguard.doctor.norms).
Found as a stranger: a transformers ConvNeXt on digits whose black background gives
patches of zeros."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.doctor.norms import EXCESS, GAIN


def _digits16(standardise: bool):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    img = nn.functional.interpolate(x, size=16)  # zeros where the digit is not
    if standardise:
        img = (img - img.mean()) / img.std()
    return img, torch.tensor(d.target)


class _Logits(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=x).logits


def _convnext(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.ConvNextConfig(num_channels=1, hidden_sizes=[16, 32], depths=[1, 1],
                                      num_labels=10, patch_size=2, num_stages=2)
    return transformers.ConvNextForImageClassification(cfg)


def test_a_convnext_on_blank_patches_is_told_to_standardise_its_inputs_not_to_reinit():
    img, y = _digits16(standardise=False)
    model = _Logits(_convnext())
    diag = gg.doctor(model, (img[:64], y[:64]), nn.CrossEntropyLoss())
    assert diag.top is not None and diag.top.cause == "unscaled_input"
    f = diag.top
    assert f.where == "m.convnext.embeddings.layernorm"
    assert f.evidence["backward_gain"] >= GAIN and f.evidence["excess"] >= EXCESS
    assert f.evidence["fed_by"] == "m.convnext.embeddings.patch_embeddings"
    assert "Standardise the inputs" in f.remedy
    # the library's own init is not "too large" (it was: "0.196x too large")
    assert not [g for g in diag.findings if g.cause.startswith("init_")]


def test_the_same_convnext_on_standardised_inputs_is_healthy():
    img, y = _digits16(standardise=True)
    diag = gg.doctor(_Logits(_convnext()), (img[:64], y[:64]), nn.CrossEntropyLoss())
    assert diag.healthy, [(f.cause, f.where) for f in diag.findings]


def _train(standardise: bool, lr: float, steps: int = 200, seed: int = 0) -> float:
    """AdamW with warm-up and cosine decay (transformers' schedule); held-out loss."""
    from transformers import get_cosine_schedule_with_warmup

    img, y = _digits16(standardise)
    perm = torch.randperm(len(img), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    model = _Logits(_convnext(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = get_cosine_schedule_with_warmup(opt, steps // 10, steps)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (32,), generator=gen)]
        nn.functional.cross_entropy(model(img[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(img[te]), y[te]).item()


def test_the_remedy_is_true_the_standardised_convnext_trains_where_the_raw_one_collapses():
    # at 3e-2 the raw run's first updates leave it at chance (ln 10 = 2.30) for good
    raw, standardised = _train(False, 3e-2), _train(True, 3e-2)
    assert raw > 2.2 and standardised < 0.5, (raw, standardised)


def test_a_layernorm_after_a_bias_free_layer_on_zero_rows_is_found_in_plain_torch():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    nn.init.zeros_(lin.bias)
    # (a ReLU right after it would pass no gradient at the blank rows' output, 0)
    model = nn.Sequential(lin, nn.LayerNorm(32), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    x = torch.rand(64, 16)
    x[::2] = 0.0  # half the rows blank: their LayerNorm input is constant (the zero bias)
    y = torch.randint(0, 10, (64,))
    diag = gg.doctor(model, (x, y), nn.CrossEntropyLoss())
    found = [f for f in diag.findings if f.where == "1"]
    assert found and found[0].cause == "unscaled_input", diag.findings
    assert found[0].evidence["eps"] == pytest.approx(1e-5)
    # no blank rows: the LayerNorm's backward gain is its forward one, nothing to say
    diag = gg.doctor(model, (torch.rand(64, 16), y), nn.CrossEntropyLoss())
    assert not [f for f in diag.findings if f.where == "1"], diag.findings


class _Squash(nn.Module):
    """A mean-dominated signal: each channel at 0.5 with a spread of 0.005 (sigmoid outputs
    mixed by a 1x1 conv, as in a timm ResNet whose activations were swapped for sigmoids);
    ``constant``: half the channels at their own scale, half flat (groups a BatchNorm
    divides by sqrt(eps))."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.constant = constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant:
            return torch.cat([x[:, :4], torch.full_like(x[:, 4:], 0.5)], dim=1)
        return 0.5 + 0.005 * x


@pytest.mark.parametrize("constant", [False, True])
def test_a_mean_dominated_input_is_no_constant_group(constant):
    """Found as a stranger: a timm ResNet-18 with sigmoid activations, fed N(0, 1) noise, got
    `unscaled_input` ("groups of its input are constant ... standardise the inputs") at its
    downsample BatchNorms: no channel was constant; their input sat at 0.45 +- 0.005, and
    the forward gain was read from the rms, mean and all. It is read from the groups'
    spread, the scale the layer divides by; truly constant groups are still found."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Squash(constant), nn.Conv2d(8, 8, 1),
                          nn.BatchNorm2d(8), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    with torch.no_grad():  # the 1x1 conv passes each channel on as it is
        model[2].weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        model[2].bias.zero_()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    found = [f for f in gg.doctor(model, (x, y), nn.CrossEntropyLoss()).findings
             if f.cause == "unscaled_input"]
    assert bool(found) is constant, found
