"""Hadamard matrices and the fast Hadamard transform: pure functions on tensors.

A Hadamard matrix of order n has entries +-1 and `H H^T = n I`. Orders built here:
n = 2^k * m with `H_n = H_m (x) S_{2^k}` (Kronecker product), where `S` is Sylvester's
matrix (`S[i, j] = (-1)^popcount(i & j)`) and m is 1 or an order with a Paley construction:

- Paley I:  m = q + 1 for a prime power q = 3 (mod 4);
- Paley II: m = 2 (q + 1) for a prime power q = 1 (mod 4);

both over the finite field GF(q) (prime powers too: 28 = 27 + 1 for Llama-3's 14336 = 28 * 512,
344 = 343 + 1 = 7^3 + 1 for Llama-2's 11008 = 344 * 32). The smallest such m is used. QuaRot's
reference hardcodes a few matrices from Sloane's library instead (e.g. had172 for 11008);
orders neither construction reaches (92 = 4 * 23, 184, ...) raise an error naming n.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["hadamard_factors", "hadamard_matrix", "hadamard_transform", "random_hadamard", "random_signs"]


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley_q(m: int) -> tuple[int, int] | None:
    """(construction, q) of a Paley matrix of order m, or None."""
    if m % 4:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return 1, m - 1
    if _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2, m // 2 - 1
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k and m the smallest order built here (1 for powers of two)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    a, odd = 0, n
    while odd % 2 == 0:
        odd //= 2
        a += 1
    tried = []
    for b in range(a + 1):
        m = odd << b
        if m == 1 or _paley_q(m):
            return m, n // m
        tried.append(m)
    usable = [o for o in range(3, 100, 2) if any(_paley_q(o << c) for c in range(a + 1))]
    raise ValueError(
        f"no Hadamard matrix of order n={n} can be built here: n = 2^k * m needs m = 1 or a Paley order "
        f"(q+1 for a prime power q = 3 mod 4, 2(q+1) for q = 1 mod 4); n = 2^{a} * {odd} and none of "
        f"m = {', '.join(map(str, tried))} is one. Odd factors supported with 2^{a}: "
        f"{', '.join(map(str, usable)) or 'none'} (below 100)"
    )


def _gf_tables(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GF(q), q = p^k: elements 0..q-1 as base-p digit vectors (polynomial coefficients).

    Returns (digits [q, k], quadratic character chi [q] in {0, 1, -1}), the character from
    the discrete logarithm to a primitive element x of GF(p)[x] / f, f found by search.
    """
    p, k = _prime_power(q)
    powers = [p**t for t in range(k)]
    for code in range(p**k):  # f = x^k + c_{k-1} x^{k-1} + ... + c_0, c from `code`
        c = [(code // p**t) % p for t in range(k)]
        if c[0] == 0:
            continue
        log = {}
        e = [1] + [0] * (k - 1)  # x^0
        for i in range(q - 1):
            idx = sum(d * w for d, w in zip(e, powers))
            if idx in log:
                break
            log[idx] = i
            top = e[-1]  # multiply by x and reduce x^k = -(c_0 + ... + c_{k-1} x^{k-1})
            e = [(-top * c[0]) % p] + [(e[t - 1] - top * c[t]) % p for t in range(1, k)]
        if len(log) == q - 1:
            break
    else:  # pragma: no cover - a primitive polynomial always exists
        raise RuntimeError(f"no primitive polynomial found for GF({q})")
    chi = torch.zeros(q, dtype=torch.int64)
    for idx, i in log.items():
        chi[idx] = 1 if i % 2 == 0 else -1
    digits = torch.tensor([[(idx // w) % p for w in powers] for idx in range(q)], dtype=torch.int64)
    return digits, chi


def _jacobsthal(q: int) -> torch.Tensor:
    """`J[i, j] = chi(a_i - a_j)` over GF(q)."""
    p, _ = _prime_power(q)
    digits, chi = _gf_tables(q)
    weights = torch.tensor([p**t for t in range(digits.shape[1])])
    diff = ((digits[:, None, :] - digits[None, :, :]) % p * weights).sum(-1)
    return chi[diff]


@lru_cache(maxsize=None)
def _core(m: int) -> torch.Tensor:
    """The order-m factor (1 or Paley) as a float64 +-1 matrix; do not modify."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    construction, q = _paley_q(m)
    J = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 1:] = J
    if construction == 1:  # J skew-symmetric: H = I + S with S = [[0, 1^T], [-1, J]]
        S[1:, 0] = -1
        H = S + torch.eye(q + 1, dtype=torch.int64)
    else:  # J symmetric: S = [[0, 1^T], [1, J]], H = S (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]
        S[1:, 0] = 1
        H = torch.kron(S, torch.tensor([[1, -1], [-1, -1]])) + torch.kron(
            torch.eye(q + 1, dtype=torch.int64), torch.tensor([[1, 1], [1, -1]])
        )
    return H.to(torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    """`S_n = [[S, S], [S, -S]]` doubled up to n (a power of two): `S[i, j] = (-1)^popcount(i & j)`."""
    S = torch.ones(1, 1, dtype=torch.float64)
    while S.shape[0] < n:
        S = torch.cat((torch.cat((S, S), 1), torch.cat((S, -S), 1)), 0)
    return S


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An (unnormalised) Hadamard matrix of order n: `H_m (x) S_{2^k}`, entries +-1, H H^T = n I."""
    m, s = hadamard_factors(n)
    return torch.kron(_core(m), _sylvester(s)).to(dtype)


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """n random +-1 (float64) from a `torch.Generator` seeded with `seed`."""
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal `Q = H diag(s) / sqrt(n)`, s = `random_signs(n, seed)`.
    `x @ Q` is `hadamard_transform(x) * s` without forming Q."""
    return (hadamard_matrix(n) * random_signs(n, seed) / math.sqrt(n)).to(dtype)


@lru_cache(maxsize=32)
def _core_as(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _core(m).to(dtype=dtype, device=device)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform on the last dim (a power of two): `x @ S`."""
    n = x.shape[-1]
    shape = x.shape
    x = x.reshape(-1, n)
    if torch.is_grad_enabled() and x.requires_grad:  # differentiable (allocating) butterflies
        h = 1
        while h < n:
            a = x.reshape(-1, n // (2 * h), 2, h)
            x = torch.stack((a[:, :, 0] + a[:, :, 1], a[:, :, 0] - a[:, :, 1]), dim=2)
            h *= 2
        return x.reshape(shape)
    buffers = (torch.empty_like(x), torch.empty_like(x))  # ping-pong; the input is never written
    h, i = 1, 0
    while h < n:  # butterflies between features j and j + h inside blocks of 2h
        a = x.reshape(-1, n // (2 * h), 2, h)
        b = buffers[i].view(-1, n // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=b[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=b[:, :, 1])
        x, h, i = buffers[i], 2 * h, 1 - i
    return x.reshape(shape)


def hadamard_transform(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """`x @ (I (x) H_n) / sqrt(n)` on the last dim of x: the normalised n-point Hadamard applied
    to each consecutive chunk of n features (n = the whole last dim by default; a head size
    gives a per-head transform). Kronecker-structured: a fast Walsh-Hadamard transform on the
    2^k part and a dense m x m matmul on the Paley part, never an n x n matmul. Computes in
    x's dtype; orthogonal (norm-preserving).
    """
    d = x.shape[-1]
    n = d if n is None else n
    if d % n:
        raise ValueError(f"Hadamard size {n} does not divide the last dimension {d}")
    m, s = hadamard_factors(n)
    shape = x.shape
    y = x.reshape(-1, d // n, m, s)  # feature index within a chunk = i_m * s + i_s, as in H_m (x) S
    if s > 1:
        y = _fwht(y)
    if m > 1:  # y[..., j, :] = sum_i H_m[i, j] y[..., i, :]
        y = torch.matmul(_core_as(m, y.dtype, y.device).t(), y)
    return (y / math.sqrt(n)).reshape(shape)
