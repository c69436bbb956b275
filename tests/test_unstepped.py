"""Parameters that get gradients no optimizer steps (gradguard._unstepped): an unfrozen
backbone the optimizer never held is said, once; a parameter another optimizer steps
(plain, fused, by ``p.data``) is not."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
import gradguard._unstepped as unstepped
from gradguard.errors import GradGuardWarning


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :4] > 0).long().argmax(1)


def _train(model, guards, steps, *, unfreeze_at=None, add_at=None, after=None):
    """A loop with its guards; ``unfreeze_at``: requires_grad_(True) on the whole model;
    ``add_at``: the optimizer of the first guard is given the unfrozen layers too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            if i == unfreeze_at:
                model.requires_grad_(True)
            if i == add_at:
                guards[0].optimizer.add_param_group(
                    {"params": [*model[0].parameters(), *model[2].parameters()]})
            x, y = _batch(i)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            for g in guards:
                g.step(loss)
            if after is not None:
                after()
            model.zero_grad()
        for g in guards:
            g.close()
    return [w for w in caught if issubclass(w.category, GradGuardWarning)]


def _unstepped_events(guard):
    return [e for e in guard.events if e.kind == "unstepped_params"]


def test_a_backbone_unfrozen_but_never_added_to_the_optimizer_is_said_once():
    model = _mlp()
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    frozen = [p.detach().clone() for p in (*model[0].parameters(), *model[2].parameters())]
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    caught = _train(model, [guard], 300, unfreeze_at=100)
    # the loop's gradients reached them and nothing changed them: they did not train
    assert all(torch.equal(a, b) for a, b in zip(frozen, (*model[0].parameters(), *model[2].parameters())))
    events = _unstepped_events(guard)
    assert len(events) == 1
    ev = events[0]
    assert ev.severity == "warning"
    assert ev.data["layers"] == ["0", "2"]
    assert ev.data["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # first seen at the first flush after the unfreeze, said SPAN steps later
    assert ev.data["since"] == 150 and ev.step == 250
    assert "add_param_group" in ev.remedy
    [w] = [w for w in caught if "no optimizer steps them" in str(w.message)]
    assert w.filename == __file__  # the user's line (the loop's guard.step)


def test_the_unfrozen_backbone_added_with_add_param_group_is_not_said():
    model = _mlp()
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery())
    before = model[0].weight.detach().clone()
    caught = _train(model, [guard], 300, unfreeze_at=100, add_at=100)
    assert not torch.equal(before, model[0].weight)
    assert _unstepped_events(guard) == [] and caught == []


def test_layers_added_with_add_param_group_are_not_said_at_the_flush_that_adds_them():
    """The flush of the old layout that ``add_param_group`` brings (at the next guard.step)
    judged the layers just added as unstepped, naming add_param_group as the remedy."""
    model = _mlp()  # the backbone gets gradients from step 0, the optimizer holds the head
    opt = torch.optim.AdamW(model[4].parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, every=60)
    caught = _train(model, [guard], 200, add_at=170)  # first seen at 60: due at 170
    assert _unstepped_events(guard) == [] and caught == []


def test_an_optimizer_over_the_head_alone_leaves_the_backbone_untrained_and_says_so():
    model = _mlp()  # a "linear probe" whose backbone was never frozen
    guard = gg.Guard(model, torch.optim.AdamW(model[4].parameters(), lr=1e-3))
    _train(model, [guard], 200)
    [ev] = _unstepped_events(guard)
    assert ev.data["layers"] == ["0", "2"] and ev.step == 150
    assert "requires_grad_(False)" in ev.remedy


@pytest.mark.parametrize("other", ["guarded", "fused", "p.data"])
def test_parameters_another_optimizer_steps_are_not_said(other):
    """Matrices on SGD, the rest on a second optimizer (Muon and AdamW, say), each guard
    given the whole model. A fused optimizer's step and ``p.data`` updates leave the
    version counter still: the values are compared then (one device read)."""
    model = _mlp()
    mats = [p for p in model.parameters() if p.dim() == 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    guards = [gg.Guard(model, torch.optim.SGD(mats, lr=0.05, momentum=0.9))]
    after = None
    if other == "guarded":
        guards.append(gg.Guard(model, torch.optim.AdamW(vecs, lr=1e-3)))
    elif other == "fused":
        fused = torch.optim.AdamW(vecs, lr=1e-3, fused=True)
        after = fused.step
    else:
        def after():
            for p in vecs:
                p.data.add_(p.grad, alpha=-0.05)
    caught = _train(model, guards, 300, after=after)
    assert all(_unstepped_events(g) == [] for g in guards)
    assert caught == []
    if other != "guarded":  # the fused step and p.data kept the counter; the values moved
        assert guards[0]._unstepped.watch == []


def _zero_grad(p: torch.Tensor) -> None:
    p.grad.zero_()


def test_an_unfrozen_layer_whose_gradient_is_zero_is_not_said():
    """A zero gradient would not move the parameter on any optimizer: nothing is lost."""
    said = []
    for zeroed in (False, True):
        model = _mlp()
        head = model[4].weight
        head.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        guard = gg.Guard(model, opt)
        head.requires_grad_(True)
        hook = head.register_post_accumulate_grad_hook(_zero_grad) if zeroed else None
        _train(model, [guard], 300)
        if hook is not None:
            hook.remove()
        said.append([e.data["params"] for e in _unstepped_events(guard)])
    assert said == [[["4.weight"]], []]


def test_an_hf_trainer_callback_that_unfreezes_a_layer_the_optimizer_never_held(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from gradguard.integrations.hf import GradGuardCallback
    from helpers import Tokens

    monkeypatch.setattr(unstepped, "SPAN", 8)

    class Unfreeze(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                model.transformer.h[0].requires_grad_(True)

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32))
    model.transformer.h[0].requires_grad_(False)  # the Trainer builds its optimizer without it
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=24, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], logging_steps=100, save_strategy="no",
        disable_tqdm=True, use_cpu=True)
    cb = GradGuardCallback(every=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(256), callbacks=[Unfreeze(), cb])
    with pytest.warns(GradGuardWarning, match="no optimizer steps them"):
        trainer.train()
    [ev] = [e for e in cb.guard.events if e.kind == "unstepped_params"]
    assert ev.data["layers"][0].startswith("transformer.h.0")


def test_gradguard_run_says_it_at_the_scripts_own_step(tmp_path):
    """Under ``gradguard run`` the script steps its own optimizer: the warning names the
    script's ``optimizer.step()`` line, not torch's ``Optimizer.step`` wrapper that runs the
    guard's hook."""
    from gradguard.cli import main
    from gradguard.events import read_jsonl

    script = tmp_path / "probe.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))\n"
        "model[0].requires_grad_(False)\n"
        "opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)\n"
        "for i in range(200):\n"
        "    if i == 20:\n"
        "        model[0].requires_grad_(True)\n"
        "    x = torch.randn(32, 16)\n"
        "    loss = torch.nn.functional.cross_entropy(model(x), (x[:, :4] > 0).long().argmax(1))\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step()\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", "--out", str(tmp_path / "out"), "--no-report", str(script)]) == 0
    [w] = [w for w in caught if "no optimizer steps them" in str(w.message)]
    assert (w.filename, w.lineno) == (str(script), 13)
    [run_dir] = [p for p in (tmp_path / "out").iterdir() if p.name != "latest"]
    kinds = [e["kind"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert kinds.count("unstepped_params") == 1
    from gradguard.report._data import load_run
    from gradguard.report._summary import summary_sentence

    text = summary_sentence(load_run(run_dir), {})
    assert "The parameters of `0` got gradients that no optimizer stepped" in text
