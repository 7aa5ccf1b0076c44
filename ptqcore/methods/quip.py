"""QuIP (rotation): Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language
Models With Guarantees", NeurIPS 2023; reference code Cornell-RelaxML/QuIP (and the `kron`
incoherence mode of its successor Cornell-RelaxML/quip-sharp, `lib/algo/quip.py`).

QuIP = incoherence processing around an adaptive-rounding quantizer. Per layer, on the proxy
problem `min_Q tr((W - Q) H (W - Q)^T)`, in float64:

1. Diagonal rescaling (the reference's `preproc_rescale` / `rescale_WH`):
   `d_j = (clamp(H_jj / max|H|, 1e-8) / clamp(||W_:j||^2, 1e-8))^(1/4)`, clamped at 1e-8;
   `W <- W D`, `H <- D^-1 H D^-1` (D = diag(d)). It balances column energy against input
   energy (afterwards `||W'_:j||^2` is proportional to `H'_jj`).
2. Random orthogonal incoherence transforms on both sides: `W <- U W V^T`, `H <- V H V^T`,
   where `U` (rows) and `V` (columns) are each `P_out (A (x) B) P_in`: a Kronecker product of two
   random orthogonal matrices of sizes `a x b = n` with `a` the divisor of `n` closest to
   sqrt(n) from below, between two random permutations: the paper's Kronecker construction, the
   reference's `--pre_proj_extra 1` (`rand_ortho_butterfly_noblock`) = quip-sharp's `kron`.
   Applied in its factored form: O(mn(a + b)) instead of dense products.
3. The quantizer that follows in the pipeline (GPTQ = LDLQ, or RTN) quantizes `(W', H')`;
   `inverse` maps its result back: `Q <- U^T Q V`, then `Q <- Q D^-1`.

Knobs (`QuIPConfig`): `seed` (0), `rescale` (True: step 1), `incoherence` ("kron": step 2;
"none": rescaling only, an ablation).

So the weights a QuIP run leaves in the model are fake-quantized weights **de-rotated into
the original basis**: the model runs unchanged code, but the quantization grid (scales, zeros,
groups of `group_size` consecutive columns) lives in the rotated basis, and an integer
checkpoint would have to store codes plus the seed and `d` to rebuild `U`, `V`, `D`.

Randomness: each block gets a seed derived from (config seed, block index), each layer one
derived from (block seed, layer name) with SHA-256, so runs are reproducible across processes
and machines; matrices are drawn on the CPU in float64 (QR of a Gaussian, with the sign fix
that makes it Haar-distributed).

`quip` alone is `quip+gptq`: QuIP proves LDLQ equivalent to OPTQ/GPTQ's update, so GPTQ on the
incoherent problem is QuIP's main method. `quip+rtn` is QuIP's "incoherence processing +
nearest rounding" baseline; RTN sees no Hessian, so for the rescaling the transform collects
each group's Hessian itself (once per block, from the block's unquantized inputs).

Reference settings followed: `--incoh_processing` (`pre_gptqH`, `pre_rescale`, `pre_proj`)
with `--quant ldlq` and no greedy passes. Faithful QuIP needs two GPTQ options that differ
from our GPTQ defaults: LDLQ rounds the columns in their natural order (re-ordering by
diag(H) is the separate QuIP-RG variant), so `act_order` off; and the reference damps twice
(`H * n / tr(H) + 0.01 I` before the rotation, then GPTQ's 1 % of the mean diagonal), i.e.
2.01 % of the mean diagonal in all. The pipeline therefore gives the GPTQ step after QuIP
`act_order=False, percdamp=0.0201` (`info.quantizer_defaults`) unless the user sets them, e.g.
`-o gptq.act_order=true` for the act-order variant.

Deviations, one bullet each:
- quantizer grid: our QuantSpec (asymmetric min-max per row or group, in the rotated basis), not
  the reference's `qfn="b"` per-tensor grid of +-2.4 RMS(W).
- column order: GPTQ goes first to last, the reference LDLQ last to first (after a random
  rotation the order carries no meaning).
- damping: only the quantizer's own (`percdamp`); `H'` is exactly `V D^-1 H D^-1 V^T`, so the
  proxy loss is invariant (see above for the reference's 2.01 %).
- H normalisation: `max|H|` enters only `d` (as in the reference); `H'` is not divided by it
  (GPTQ is invariant to a scalar factor on H).
- the QuIP repo's default `--pre_proj_extra 0` draws a separate p x p factor per slice (a blocked
  butterfly); we use the plain Kronecker product (its option 1, the paper's and quip-sharp's).
- Kronecker factors: the divisor pair closest to sqrt(n); the reference splits alternate prime
  factors (same for 64, 96, 576, 1536, 4096; 192 is 12 x 16 here, 8 x 24 there).
- random orthogonal factors: Haar on O(p) by QR (the reference: scipy's special_ortho_group,
  a random 2 x 2 rotation for p = 2).
- seeds per (seed, block, layer) by hashing (the reference draws from the global torch RNG).
- float64 throughout (the reference: float32; quip-sharp: float64 optional).
- Mixtures of experts: each expert's linears are transformed with the Hessian of their routed
  tokens (the quantizer's); an expert with too few routed tokens gets RTN from the quantizer
  and, for `quip+rtn`, no rescaling (only the random orthogonal transforms).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..calib import BasisTransform, BlockContext
from .base import Method, MethodConfig, MethodInfo
from .gptq import stage_hessians

INCOHERENCE_MODES = ("kron", "none")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings), stable across processes and machines."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def kron_factors(n: int) -> tuple[int, int]:
    """`(a, n // a)` with `a` the largest divisor of `n` not above sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def random_orthogonal(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix: QR of a Gaussian, columns' signs fixed by diag(R)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return Q * signs


@dataclass
class KronOrthogonal:
    """The orthogonal `M = P_out (A (x) B) P_in` of size n = a * b, kept factored.

    `P_in x = x[p_in]`, `P_out y = y[p_out]`; `(A (x) B) vec(X) = vec(A X B^T)` for X of shape
    (a, b) and row-major vec.
    """

    A: torch.Tensor
    B: torch.Tensor
    p_in: torch.Tensor
    p_out: torch.Tensor

    @classmethod
    def random(cls, n: int, generator: torch.Generator) -> KronOrthogonal:
        a, b = kron_factors(n)
        A = random_orthogonal(a, generator)
        B = random_orthogonal(b, generator)
        return cls(A, B, torch.randperm(n, generator=generator), torch.randperm(n, generator=generator))

    @property
    def n(self) -> int:
        return self.A.shape[0] * self.B.shape[0]

    def to(self, device) -> KronOrthogonal:
        return KronOrthogonal(self.A.to(device), self.B.to(device), self.p_in.to(device), self.p_out.to(device))

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """`M x` for every row x of X (i.e. `X M^T`), along the last dimension."""
        shape = X.shape
        x = X[..., self.p_in].reshape(*shape[:-1], self.A.shape[0], self.B.shape[0])
        y = (self.A @ x @ self.B.T).reshape(shape)
        return y[..., self.p_out]

    def apply_t(self, X: torch.Tensor) -> torch.Tensor:
        """`M^T x` for every row x of X (i.e. `X M`), along the last dimension."""
        shape = X.shape
        x = X[..., torch.argsort(self.p_out)].reshape(*shape[:-1], self.A.shape[0], self.B.shape[0])
        y = (self.A.T @ x @ self.B).reshape(shape)
        return y[..., torch.argsort(self.p_in)]

    def dense(self) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=self.A.dtype, device=self.A.device)).T


def rescale_factors(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """QuIP's diagonal rescaling `d_j = (H_jj / max|H| / ||W_:j||^2)^(1/4)` (reference clamps)."""
    diag_h = (torch.diagonal(H) / H.abs().max()).clamp(min=1e-8)
    diag_w2 = (W * W).sum(0).clamp(min=1e-8)
    return (diag_h / diag_w2).sqrt().sqrt().clamp(min=1e-8)


def incoherence(W: torch.Tensor) -> float:
    """The weight incoherence `mu = max|W_ij| sqrt(m n) / ||W||_F` (1 when all entries are equal)."""
    W = W.double()
    return (W.abs().max() * math.sqrt(W.numel()) / W.norm()).item()


@dataclass
class IncoherenceState:
    """What `inverse` needs: the column scales and the two orthogonal factors (or None)."""

    d: torch.Tensor | None
    U: KronOrthogonal | None
    V: KronOrthogonal | None


class _BlockHessians:
    """Each group's Hessian of one block, collected once on first request (for quantizers
    that pass no H, e.g. RTN): from the block's inputs before any of its layers is changed."""

    def __init__(self, ctx: BlockContext):
        self.ctx = ctx
        self.hessians: dict[str, torch.Tensor] | None = None

    def __call__(self, layer: str) -> torch.Tensor | None:
        if self.hessians is None:
            self.hessians = {}
            for stage in self.ctx.adapter.stages():  # one pass per stage (all experts' down at once)
                for group, stats in zip(stage, stage_hessians(self.ctx, stage)):
                    for names, (H, n) in zip(group.token_sets(), stats):
                        # an expert with too few routed tokens is not rescaled (no usable Hessian)
                        routed_few = self.ctx.adapter.is_routed(names[0]) and n < self.ctx.min_expert_tokens
                        self.hessians.update({name: None if routed_few else H for name in names})
        return self.hessians.get(layer)


@dataclass
class IncoherenceTransform(BasisTransform):
    """QuIP's incoherence processing of one block's layers (see the module docstring).

    `seed` is the block's seed; each layer's U, V derive from it and the layer's name.
    `scales` records each layer's `d` (float32) as layers are transformed (None: not rescaled).
    """

    seed: int
    rescale: bool = True
    mode: str = "kron"
    hessians: Callable[[str], torch.Tensor | None] | None = None  # layer -> H, when the quantizer passes none
    scales: dict = field(default_factory=dict)

    def factors(self, rows: int, columns: int, layer: str) -> tuple[KronOrthogonal, KronOrthogonal]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, layer))
        U = KronOrthogonal.random(rows, generator)
        V = KronOrthogonal.random(columns, generator)
        return U, V

    def forward(self, W, H, layer):
        device = W.device
        W = W.to(torch.float64)
        H = None if H is None else H.to(torch.float64)
        d = None
        if self.rescale:
            H_scale = H if H is not None else (self.hessians(layer) if self.hessians is not None else None)
            if H_scale is not None:
                d = rescale_factors(W, H_scale.to(device=device, dtype=torch.float64))
                W = W * d
                if H is not None:
                    H = H / d[:, None] / d[None, :]
        self.scales[layer] = None if d is None else d.float().cpu()
        U = V = None
        if self.mode == "kron":
            U, V = (f.to(device) for f in self.factors(*W.shape, layer))
            W = U.apply(V.apply(W).T).T  # U W V^T
            if H is not None:
                H = V.apply(V.apply(H).T).T  # V H V^T
        return W, H, IncoherenceState(d, U, V)

    def inverse(self, Q, state):
        Q = Q.to(torch.float64)
        if state.U is not None:
            Q = state.U.apply_t(state.V.apply_t(Q).T).T  # U^T Q V
        if state.d is not None:
            Q = Q / state.d
        return Q


@dataclass(frozen=True)
class QuIPConfig(MethodConfig):
    seed: int = 0
    rescale: bool = True
    incoherence: str = "kron"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"QuIP seed must be an integer, got {self.seed!r}")
        if not isinstance(self.rescale, bool):
            raise ValueError(f"QuIP rescale must be true or false, got {self.rescale!r}")
        if self.incoherence not in INCOHERENCE_MODES:
            raise ValueError(
                f"unknown QuIP incoherence {self.incoherence!r}; choices: {', '.join(INCOHERENCE_MODES)}"
            )


class QuIP(Method):
    info = MethodInfo(
        "quip", "rotation", "Chee et al., QuIP, NeurIPS 2023", "transform", needs_calibration=True,
        default_quantizer="gptq", quantizer_defaults=(("act_order", False), ("percdamp", 0.0201)),
        sets_basis=True,
    )
    Config = QuIPConfig

    def process_block(self, ctx: BlockContext) -> dict:
        """Register this block's incoherence transform for the quantizer step that follows.

        Returns `{"seed", "scales"}`: the block seed (U, V of every layer follow from it and the
        layer name) and the per-layer `d`, which the quantizer step fills in when it runs."""
        cfg = self.config
        seed = derive_seed("quip", cfg.seed, ctx.index)
        hessians = _BlockHessians(ctx) if cfg.rescale and ctx.inputs is not None else None
        transform = IncoherenceTransform(seed, cfg.rescale, cfg.incoherence, hessians)
        ctx.basis.append(transform)
        return {"seed": seed, "scales": transform.scales}
