"""Run by Python at start-up when this folder is on ``PYTHONPATH``.

When ``GRADGUARD`` is set (``1``, or ``gradguard run`` options such as ``--clip zclip``)
and Python runs a script file (``python train.py``, as ``torchrun``, ``accelerate
launch`` and job launchers do), the script runs guarded, as under ``gradguard run``
(:func:`gradguard.integrations.auto.activate`). Then the next ``sitecustomize`` on
``sys.path``, if any, is loaded as usual.
"""

import os
import sys


def _gradguard_start() -> None:
    value = os.environ.get("GRADGUARD", "").strip().lower()
    script = sys.argv[0] if sys.argv else ""
    if value in ("", "0", "off", "false", "no") or not script.endswith(".py"):
        return  # not switched on, or not a script (python -c, a REPL, a launcher)
    try:
        from gradguard.integrations.auto import activate

        activate()
    except Exception as e:  # the training must still run; say why it is unguarded
        print(f"gradguard: GRADGUARD is set but guarding could not start: "
              f"{type(e).__name__}: {e}", file=sys.stderr)


def _next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":  # imported by site.py, not as gradguard.integrations._site...
    _gradguard_start()
    _next_sitecustomize()
