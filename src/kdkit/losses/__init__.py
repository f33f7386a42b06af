"""Distillation losses: pure tensor functions (no modules, no config objects).

* :func:`divergence` / :func:`kd_loss`: token-level divergences between softened teacher
  and student distributions (Hinton et al. 2015; GKD, Agarwal et al. 2024; DistiLLM,
  Ko et al. 2024).
* :func:`cross_entropy`: masked hard-label cross-entropy.
* :func:`dkd_loss`: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).
"""

from kdkit.losses.divergence import DIVERGENCE_KINDS, cross_entropy, divergence, kd_loss
from kdkit.losses.dkd import dkd_loss

__all__ = ["DIVERGENCE_KINDS", "cross_entropy", "divergence", "dkd_loss", "kd_loss"]
