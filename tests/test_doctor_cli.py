"""`gradguard doctor spec.py`: exit 1 on findings, 0 healthy, 2 usage errors; --json."""

from __future__ import annotations

import json
import textwrap

from gradguard.cli import main
from gradguard.doctor import Diagnosis

BROKEN = """
import torch
from torch import nn

def setup():
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, std=0.01)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    return model, (x, y), nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.01)
"""

HEALTHY = """
import torch
from torch import nn

def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    return model, (torch.randn(32, 8), torch.randn(32, 1)), nn.MSELoss()
"""


def _spec(tmp_path, body, name="spec.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def test_broken_spec_exits_1_and_prints_cause_and_remedy(tmp_path, capsys):
    assert main(["doctor", _spec(tmp_path, BROKEN)]) == 1
    out = capsys.readouterr().out
    assert "init_too_small" in out and "remedy" in out and "He (kaiming_normal_" in out


def test_healthy_spec_exits_0(tmp_path, capsys):
    assert main(["doctor", _spec(tmp_path, HEALTHY)]) == 0
    assert "healthy" in capsys.readouterr().out


def test_json_output_and_save(tmp_path, capsys):
    save = tmp_path / "run" / "diagnosis.json"
    assert main(["doctor", _spec(tmp_path, BROKEN), "--json", "--save", str(save)]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["type"] == "diagnosis" and d["healthy"] is False
    assert d["findings"][0]["cause"] == "init_too_small"
    assert Diagnosis.load(save).top.cause == "init_too_small"


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["doctor", _spec(tmp_path, "x = 1\n")]) == 2
    assert "defines no setup()" in capsys.readouterr().err
    assert main(["doctor", _spec(tmp_path, "def setup():\n    return 1, 2\n")]) == 2
    assert "must return (model, batch, loss_fn[, optimizer])" in capsys.readouterr().err
    bad_batch = HEALTHY.replace("torch.randn(32, 8)", "torch.randn(32, 5)")
    assert main(["doctor", _spec(tmp_path, bad_batch)]) == 2
    assert "do not fit Sequential" in capsys.readouterr().err
    # found by a stranger: "spec '...': doctor budget_s=-1.0: must be ..."
    assert main(["doctor", _spec(tmp_path, HEALTHY), "--budget", "-1"]) == 2
    assert "--budget -1: must be a number of seconds > 0" in capsys.readouterr().err


def test_a_spec_whose_own_code_fails_exits_2_naming_its_line_not_1(tmp_path, capsys):
    """Found as a stranger: a spec with a syntax error, a setup() that raises and a --save
    path that cannot be written exited 1, the code of a finding about the model, with a
    raw traceback: a CI check could not tell a broken spec from a broken model."""
    assert main(["doctor", _spec(tmp_path, "def setup(:\n    pass\n")]) == 2
    err = capsys.readouterr().err
    assert "running it raised SyntaxError" in err and "spec.py:1: def setup(:" in err
    raising = "def setup():\n    x = 1\n    raise RuntimeError('no data here')\n"
    assert main(["doctor", _spec(tmp_path, raising)]) == 2
    err = capsys.readouterr().err
    assert "setup() raised RuntimeError: no data here" in err and "spec.py:3:" in err
    assert main(["doctor", _spec(tmp_path, "setup = 3\n")]) == 2
    assert "setup is not a function (it is of type int)" in capsys.readouterr().err
    assert main(["doctor", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["doctor", _spec(tmp_path, BROKEN), "--save", str(blocked / "d.json")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_targets_that_do_not_fit_the_loss_or_a_loss_fn_that_raises_exit_2(tmp_path, capsys):
    """Found by a stranger: labels 1..10 for a 10-class head (an off-by-one), or a loss_fn
    that raises, exited 1, the code of a finding, with a raw traceback."""
    labels = """
    import torch
    from torch import nn

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
        return model, (torch.randn(32, 8), torch.arange(32) % 10 + 1), nn.CrossEntropyLoss()
    """
    assert main(["doctor", _spec(tmp_path, labels)]) == 2
    err = capsys.readouterr().err
    assert "loss_fn: cannot compare the model output (32, 10) float32 with targets" in err
    assert "Target 10 is out of bounds" in err and "Traceback" not in err
    raising = HEALTHY.replace("nn.MSELoss()", "_bad").replace(
        "def setup():", "def _bad(out, y):\n    raise KeyError('no such column')\n\ndef setup():")
    assert main(["doctor", _spec(tmp_path, raising)]) == 2
    err = capsys.readouterr().err
    assert "loss_fn: raised KeyError on the model output (32, 1) float32" in err
    assert "no such column" in err and "Traceback" not in err


def test_rich_table_on_a_terminal(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert main(["doctor", _spec(tmp_path, BROKEN)]) == 1
    out = capsys.readouterr().out
    assert "severity" in out and "init_too_small" in out and "top cause" in out
