"""torch's CPU ``randn`` reproduced in numpy, so a seed gives diffusers' latents.

``TorchCPUGenerator(seed).randn(shape)`` returns what
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` returns,
and consecutive calls continue the same stream (as Euler ancestral's per-step noise
does in diffusers). What torch does (aten/src/ATen/core/MT19937RNGEngine.h,
CPUGeneratorImpl.cpp, native/cpu/DistributionTemplates.h, DistributionsHelper.h):

- ``manual_seed(s)``: mt19937 with Matsumoto-Nishimura ``init_genrand`` of the low
  32 bits of ``s``; the cached normal sample is cleared.
- float uniform: ``(next_u32 & 0xFFFFFF) * 2**-24``; double uniform: 53 bits of
  ``(u32_a << 32) | u32_b``.
- float32 tensors with >= 16 elements (``normal_fill_AVX2``): one uniform per
  element, then Box-Muller in place over blocks of 16 (pairs j, j+8) with the
  Cephes polynomials of ``avx_mathfun.h`` (fused multiply-adds as the wheel is
  compiled); when size % 16 != 0 the last 16 values are redrawn and recomputed.
- fewer than 16 elements: element by element ``normal_distribution<double>``,
  which draws two double uniforms per pair and caches the sine half in the
  generator for the next draw (across calls too).

x86 builds with AVX2 (and AVX512 machines, which torch routes to the AVX2 kernel for
``normal``) take the avx_mathfun path reproduced here; a build without AVX2 (e.g. an
ARM host) uses libm ``logf``/``cosf`` instead, which this matches only to ~1 ulp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["TorchCPUGenerator"]

_F32 = np.float32
_F64 = np.float64
_TWO_PI = _F32(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>)


def _init_genrand(seed32: int) -> np.ndarray:
    """mt19937 key from a 32-bit seed (MT19937RNGEngine.h init_with_uint32)."""
    key = [seed32]
    for j in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


def _fma(a: np.ndarray, b, c) -> np.ndarray:
    """float32 fused multiply-add: the product is exact in float64, one rounding after."""
    return (a.astype(_F64) * _F64(b) + c).astype(_F32)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h log256_ps (Cephes logf) for x in (0, 1], float32 with FMA."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 0x7E).astype(_F32)  # exponent + 1
    m = ((bits & 0x807FFFFF) | 0x3F000000).view(_F32)  # mantissa in [0.5, 1)
    small = m < _F32(0.707106781186547524)
    e -= small  # e - 1 where m < sqrt(1/2)
    m = (m - _F32(1.0)) + np.where(small, m, _F32(0.0))
    z = m * m
    y = np.full_like(m, _F32(7.0376836292e-2))
    for p in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
              -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma(y, m, _F32(p))  # Horner step (Cephes logf polynomial)
    y = y * m
    y = _fma(y, z, e * _F32(-2.12194440e-4))
    y = _fma(z, _F32(-0.5), y)
    return _fma(e, _F32(0.693359375), m + y)


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun.h sincos256_ps (Cephes sinf/cosf) for x >= 0, float32 with FMA."""
    j = (x * _F32(1.27323954473516)).astype(np.int32)  # cvttps: truncate x * 4/pi
    j = (j + 1) & ~1
    y = j.astype(_F32)
    sin_flip = (j & 4) != 0
    cos_flip = (~(j - 2) & 4) != 0
    use_sin_poly = (j & 2) == 0
    x = _fma(y, _F32(-0.78515625), x)  # extended-precision x - y * pi/4
    x = _fma(y, _F32(-2.4187564849853515625e-4), x)
    x = _fma(y, _F32(-3.77489497744594108e-8), x)
    z = x * x
    yc = _fma(_fma(z, _F32(2.443315711809948e-5), _F32(-1.388731625493765e-3)), z,
              _F32(4.166664568298827e-2)) * z
    yc = _fma(yc, z, -(z * _F32(0.5))) + _F32(1.0)
    ys = _fma(_fma(z, _F32(-1.9515295891e-4), _F32(8.3321608736e-3)), z,
              _F32(-1.6666654611e-1)) * z
    ys = _fma(ys, x, x)
    sin = np.where(use_sin_poly, ys, yc)
    cos = np.where(use_sin_poly, yc, ys)
    np.negative(sin, out=sin, where=sin_flip)
    np.negative(cos, out=cos, where=cos_flip)
    return sin, cos


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """normal_fill_16_AVX2 over rows of 16 uniforms: [n, 16] float32 -> [n, 16]."""
    radius = np.sqrt(_F32(-2.0) * _log_ps(_F32(1.0) - u[:, :8]))  # [n, 8]
    sin, cos = _sincos_ps(_TWO_PI * u[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1)


class TorchCPUGenerator:
    """numpy stand-in for ``torch.Generator("cpu").manual_seed(seed)``'s ``randn``."""

    def __init__(self, seed: int):
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64 - 1]")
        self.seed = seed % 2**64
        self._mt = np.random.MT19937()
        self._mt.state = {"bit_generator": "MT19937",
                          "state": {"key": _init_genrand(self.seed & 0xFFFFFFFF), "pos": 624}}
        self._cached_normal: float | None = None  # normal_distribution<double>'s spare

    def _u32(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return (self._u32(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _normal_f64(self) -> float:
        """DistributionsHelper.h normal_distribution<double>, one sample."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        a, b, c, d = (int(v) for v in self._u32(4))
        u1 = (((a << 32) | b) & (2**53 - 1)) * 2.0**-53
        u2 = (((c << 32) | d) & (2**53 - 1)) * 2.0**-53
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array of ``shape``, continuing this generator's stream."""
        shape = tuple(int(s) for s in shape)
        size = math.prod(shape)
        if size < 16:
            return np.array([self._normal_f64() for _ in range(size)], _F32).reshape(shape)
        u = self._uniform_f32(size)
        full = size - size % 16
        out = np.empty(size, _F32)
        out[:full] = _box_muller_16(u[:full].reshape(-1, 16)).reshape(-1)
        if full != size:  # torch redraws the last 16 and recomputes them
            out[size - 16:] = _box_muller_16(self._uniform_f32(16).reshape(1, 16))[0]
        return out.reshape(shape)


class PerImageGenerators:
    """One TorchCPUGenerator per image of a batch (`seeds=[...]`): image k's numbers come
    from its own seed, so image k of a batched call equals the same request alone with
    `seed=seeds[k]`, whatever else is in the batch (serving batches strangers).

    `randn(shape)` takes the batch on axis -4 ([B, 4, h, w], or [draws, B, 4, h, w] for
    Euler ancestral's draw-ahead) and draws each image's slice from its own generator in
    one call: the numbers image k would get alone, in the order it would get them."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = tuple(int(s) for s in seeds)
        self._gens = [TorchCPUGenerator(s) for s in self.seeds]

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 4 or shape[-4] != len(self._gens):
            raise ValueError(f"per-image draws need the batch ({len(self._gens)}) on axis -4, "
                             f"got shape {list(shape)}")
        one = shape[:-4] + (1,) + shape[-3:]
        return np.concatenate([g.randn(one) for g in self._gens], axis=-4)
