"""gradguard where people already train.

* :mod:`gradguard.integrations.lightning` — ``GradGuardCallback`` for ``lightning`` 2.x
  (``pip install 'gradguard[lightning]'``);
* :mod:`gradguard.integrations.hf` — ``GradGuardCallback`` for ``transformers.Trainer``
  (``pip install 'gradguard[hf]'``);
* :mod:`gradguard.integrations.run` — ``gradguard run train.py``: every optimizer of an
  unmodified script guarded through global ``torch.optim`` step hooks.

Importing this package imports neither lightning nor transformers.
"""
