"""TriLoRA (Feng et al., arXiv 2405.11236): dW = U diag(Sigma) V^T, all three trained.

Initialisation follows the paper: U Gaussian, V^T zero, Sigma "SVD-initialised".

Why Sigma cannot start at zero: with V^T = 0 the update is 0 and the gradients are
    dL/dV^T = Sigma U^T G,   dL/dU = G V Sigma = 0,   dL/dSigma = diag(U^T G V) = 0
(G = dL/dW). Only V^T receives gradient at the first step, and only through Sigma:
if Sigma were 0 as well, every gradient would be 0 forever and nothing would train.

``sigma_init`` readings of "SVD-initialised" (the paper does not say which matrix):
  - ``svd_w0`` (default): the top-r singular values of the frozen W0, the most literal
    reading; ``sigma_normalize: true`` divides them by the largest, so Sigma is in (0, 1].
  - ``identity``: Sigma = 1.
  - ``svd_u``: the singular values of the random U.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorabench.adapters.base import AdapterLayer, AdapterOptions, register_adapter
from lorabench.errors import ConfigError, choice_error

SIGMA_INITS = ("svd_w0", "identity", "svd_u")


@dataclasses.dataclass
class TriLoRAOptions(AdapterOptions):
    """TriLoRA's options: the common ones and how Sigma starts."""
    sigma_init: str = "svd_w0"
    sigma_normalize: bool = False
    u_std: float | None = None  # None: 1/r, as LoRA's gaussian down

    def validate(self) -> None:
        super().validate()
        if self.sigma_init not in SIGMA_INITS:
            raise choice_error("adapter.sigma_init", self.sigma_init, SIGMA_INITS)
        if self.u_std is not None and self.u_std <= 0:
            raise ConfigError("adapter.u_std", f"must be positive, got {self.u_std!r}")


@register_adapter("trilora")
class TriLoRALayer(AdapterLayer):
    """``dW = U diag(Sigma) V^T * scale``; U Gaussian, V zero, Sigma non-zero; all three train."""
    Options = TriLoRAOptions

    def __init__(self, base, name, opts: TriLoRAOptions, context=None):
        super().__init__(base, name, opts, context)
        r = opts.rank
        self.tri_u = nn.Parameter(torch.randn(self.out_features, r) * (opts.u_std or 1.0 / r))
        self.tri_vt = nn.Parameter(torch.zeros(r, self.in_features))
        w0 = base.weight.detach().float().reshape(self.out_features, self.in_features)
        if opts.sigma_init == "svd_w0":
            sigma = torch.linalg.svdvals(w0)[:r]
            if opts.sigma_normalize:
                sigma = sigma / sigma[0].clamp_min(1e-12)
        elif opts.sigma_init == "identity":
            sigma = torch.ones(r)
        else:
            sigma = torch.linalg.svdvals(self.tri_u.detach())[:r]
        if not torch.all(sigma > 0):
            raise ConfigError("adapter.sigma_init",
                              f"{opts.sigma_init!r} gives a zero singular value on layer {name!r} "
                              "(W0 has rank < r); use sigma_init=identity")
        self.tri_sigma = nn.Parameter(sigma.clone())

    def factors(self):
        return self.tri_u, self.tri_sigma[:, None] * self.tri_vt

    def adapter_forward(self, x):
        """``scale * multiplier * U (Sigma * (V^T dropout(x)))``, three thin products."""
        # x V, then * Sigma, then U^T: never builds the (r, in) product.
        h = self._project(self.dropout(x.to(self.tri_vt.dtype)), self.tri_vt)
        sig = self.tri_sigma[:, None, None] if self.is_conv else self.tri_sigma
        return self._project(h * sig, self.tri_u) * (self.scale * self.multiplier)
