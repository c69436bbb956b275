"""Put this folder on ``PYTHONPATH`` to switch ``gradguard run`` on from the environment
(see :mod:`gradguard.integrations.auto`); it holds only ``sitecustomize.py``."""
