"""The real-architecture zoo: models as their libraries build them, on small inputs.

``REAL_HEALTHY`` holds models with their libraries' default initialisation and a sane
optimizer; ``REAL_BROKEN`` the same kinds of models broken on purpose, each with the one
DESIGN.md cause the doctor's top finding must name. Models come from ``transformers``
configs (random init, nothing downloaded) and from ``torch.nn`` (architectures written the
way their reference implementations write them: torchvision's MobileNetV3 and VGG, timm's
ResNet and MLP-Mixer, LSTM/GRU language models). Every case builds in well under a second.
:mod:`.held_out` holds the cases added after the probes were settled.
"""

from __future__ import annotations

from .broken import DYNAMIC
from .broken_other import OTHER
from .healthy import REAL_HEALTHY as _HEALTHY
from .held_out import HELD_OUT, HELD_OUT_HEALTHY

REAL_HEALTHY = _HEALTHY + HELD_OUT_HEALTHY
REAL_BROKEN = DYNAMIC + OTHER + HELD_OUT

__all__ = ["REAL_BROKEN", "REAL_HEALTHY"]
