"""Distillation losses: pure tensor functions (no modules, no config objects).

* :func:`divergence` / :func:`kd_loss`: token-level divergences between softened teacher
  and student distributions (Hinton et al. 2015; GKD, Agarwal et al. 2024; DistiLLM,
  Ko et al. 2024).
* :func:`cross_entropy`: masked hard-label cross-entropy.
* :func:`dkd_loss`: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).
* :func:`fused_divergence` / :func:`fused_cross_entropy`: the same losses from hidden states and the output head,
  a chunk of positions at a time (never the logits of all positions at once).
"""

from kdkit.losses.divergence import DIVERGENCE_KINDS, cross_entropy, divergence, kd_loss
from kdkit.losses.dkd import dkd_loss
from kdkit.losses.fused import fused_cross_entropy, fused_divergence

__all__ = ["DIVERGENCE_KINDS", "cross_entropy", "divergence", "dkd_loss", "fused_cross_entropy", "fused_divergence",
           "kd_loss"]
