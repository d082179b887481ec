"""Exchange formats for Streaming DiLoCo pseudo-gradients (pure functions).

Formats (`FORMATS`):

  "none"      float32 values, no scales.                       4 bytes / element
  "bf16"      bfloat16 values (round to nearest even).         2 bytes / element
  "int8"      symmetric int8 in [-127, 127] with one float32 scale per block.
  "fp4_e3m0"  4-bit sign + exponent codes (Streaming DiLoCo's FP4 E3M0), one
              float32 scale per block, two codes per byte.

Blocks. `block=None` gives one scale per tensor; `block=K` one scale per K
consecutive elements of the row-major flattened tensor (the last block may be
short; padding never counts as data). Which of the two the paper used for E3M0
is unspecified: per-tensor is the default here as a reconstruction [M].

FP4 E3M0 code table. A code is 4 bits `s e2 e1 e0`: s is the sign and the 3-bit
field f = e2 e1 e0 an exponent. With 16 codes there is no room for 8 exponents
*and* zero, so field 0 is zero:

  f = 0        ->  0                       (codes 0b0000; 0b1000 is never emitted)
  f = 1 .. 7   ->  (-1)^s * scale * 2^(f - 7)   i.e. scale * {1/64, ..., 1/2, 1}

scale = max |x| over the block, so the largest element is represented exactly
(f = 7) and the format spans 6 octaves below it (15 distinct values).

FP4 rounding: round to nearest *in the value domain* on r = |x| / scale (this
minimises the absolute error, which is what an average of pseudo-gradients
cares about; log-domain rounding would minimise relative error instead). Between
2^k and 2^(k+1) the threshold is 1.5 * 2^k; between 0 and 2^-6 it is 2^-7; ties
go to the larger magnitude. Hence |x - q(x)| <= max(|x| / 3, scale * 2^-7):
elements below scale * 2^-7 become zero (their sign is lost, never flipped).

int8: step = max|x| / 127, rounded *up* to a 16-bit mantissa so that 127 * step
and its division by 127 are exact in float32; this makes quantization exactly
idempotent. codes = round(x / step) (ties to even), |x - q(x)| <= step / 2.

Idempotence. For every format quantize(dequantize(quantize(x))) returns the same
codes and scales bit for bit: the largest dequantized element of a block equals
the scale (FP4) or 127 * step (int8), so re-quantizing recovers the same scale,
and every dequantized value sits exactly on a code.

Non-finite inputs are not supported (a NaN or inf makes its block's scale NaN
or inf).

`fake_quantize(x)` == `dequantize(*quantize(x), x.shape)` bit for bit but keeps
x's shape (no flatten, no packing), so it shards like x; the DiLoCo step uses it
to give the numerics of a real exchange of codes inside one jitted program.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("none", "bf16", "int8", "fp4_e3m0")
SCALE_BYTES = 4  # float32 scales

_FP4_MAX_FIELD = 7
_INT8_MAX = 127


def _check(format: str, block: int | None):
  if format not in FORMATS:
    raise ValueError(f"Unknown quantization format {format!r}; valid: {FORMATS}.")
  if block is not None and int(block) <= 0:
    raise ValueError(f"block must be a positive int or None, got {block}.")


def _has_scales(format: str) -> bool:
  return format in ("int8", "fp4_e3m0")


def num_blocks(size: int, block: int | None) -> int:
  if block is None:
    return 1
  return max(1, -(-size // int(block)))


def bytes_of(shape: Sequence[int], format: str, block: int | None = None) -> int:
  """Bytes one tensor of `shape` occupies on the wire in `format`.

  fp4_e3m0: ceil(n / 2) code bytes + 4 per scale; int8: n + 4 per scale;
  bf16: 2n; none: 4n.
  """
  _check(format, block)
  n = math.prod(shape)
  scales = SCALE_BYTES * num_blocks(n, block) if _has_scales(format) else 0
  return {"none": 4 * n, "bf16": 2 * n, "int8": n + scales,
          "fp4_e3m0": -(-n // 2) + scales}[format]


def bits_per_element(format: str) -> int:
  _check(format, None)
  return {"none": 32, "bf16": 16, "int8": 8, "fp4_e3m0": 4}[format]


# --------------------------------------------------------------- element math
# All take x and a scale broadcastable to x (both float32).

def _safe(scale):
  return jnp.where(scale > 0, scale, 1.0)


def _fp4_encode(x, scale):
  """-> uint8 codes (sign << 3 | field) of x given its block's scale."""
  r = jnp.abs(x) / _safe(scale)
  m, e = jnp.frexp(r)  # r = m * 2^e, m in [0.5, 1)
  k = e - 1 + (m >= 0.75).astype(e.dtype)  # nearest power of two, ties up
  field = jnp.where(r >= 2.0 ** -(_FP4_MAX_FIELD), jnp.clip(k + _FP4_MAX_FIELD, 1,
                                                            _FP4_MAX_FIELD), 0)
  sign = ((x < 0) & (field > 0)).astype(jnp.uint8)
  return (sign << 3) | field.astype(jnp.uint8)


def _fp4_decode(codes, scale):
  field = (codes & 7).astype(jnp.int32)
  mag = jnp.where(field > 0, jnp.ldexp(jnp.float32(1.0), field - _FP4_MAX_FIELD), 0.0)
  sign = jnp.where((codes >> 3) & 1, -1.0, 1.0).astype(jnp.float32)
  return sign * (mag * scale)


def _int8_step(absmax):
  """absmax / 127 rounded up to a 16-bit mantissa (see module docstring)."""
  step = absmax / _INT8_MAX
  bits = jax.lax.bitcast_convert_type(step, jnp.uint32)
  bits = (bits + jnp.uint32(0x7F)) & jnp.uint32(0xFFFFFF80)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _int8_encode(x, step):
  return jnp.clip(jnp.round(x / _safe(step)), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)


def _int8_decode(codes, step):
  return codes.astype(jnp.float32) * step


def scale_of(absmax: jax.Array, format: str) -> jax.Array:
  """A block's float32 scale from its max |x| (int8: the step; fp4: absmax)."""
  return _int8_step(absmax) if format == "int8" else absmax


def encode(x: jax.Array, scale: jax.Array, format: str) -> jax.Array:
  """Elementwise codes (int8, or unpacked uint8 for fp4_e3m0) of float32 x
  given its blocks' scales broadcast to x."""
  return _int8_encode(x, scale) if format == "int8" else _fp4_encode(x, scale)


def decode(codes: jax.Array, scale: jax.Array, format: str) -> jax.Array:
  """Inverse of `encode`: float32 values of the codes."""
  return _int8_decode(codes, scale) if format == "int8" else _fp4_decode(codes, scale)


# ----------------------------------------------------------- packed tensors

def _blocks(flat, block):
  n = flat.shape[0]
  k = n if block is None else int(block)
  nb = num_blocks(n, block)
  padded = jnp.pad(flat, (0, nb * k - n)) if nb * k != n else flat
  return padded.reshape(nb, k), n


@jax.jit
def pack_fp4(codes: jax.Array) -> jax.Array:
  """uint8 codes in [0, 16) of shape [n] -> [ceil(n/2)] bytes; element 2i in
  the low nibble, element 2i+1 in the high nibble."""
  n = codes.shape[0]
  if n % 2:
    codes = jnp.pad(codes, (0, 1))
  pairs = codes.reshape(-1, 2).astype(jnp.uint8)
  return pairs[:, 0] | (pairs[:, 1] << 4)


@functools.partial(jax.jit, static_argnames=("n",))
def unpack_fp4(packed: jax.Array, n: int) -> jax.Array:
  codes = jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)
  return codes[:n]


@functools.partial(jax.jit, static_argnames=("format", "block"))
def quantize(x: jax.Array, format: str = "fp4_e3m0", block: int | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """x (any shape, float) -> (codes, scales), both 1-D.

  codes: fp4_e3m0 uint8 [ceil(n/2)] (packed), int8 int8 [n], bf16 bfloat16 [n],
  none float32 [n]. scales: float32 [num_blocks] (empty for bf16 / none).
  """
  _check(format, block)
  flat = jnp.asarray(x, jnp.float32).reshape(-1)
  if format == "none":
    return flat, jnp.zeros((0,), jnp.float32)
  if format == "bf16":
    return flat.astype(jnp.bfloat16), jnp.zeros((0,), jnp.float32)
  blocks, n = _blocks(flat, block)
  scale = scale_of(jnp.max(jnp.abs(blocks), axis=1), format)
  codes = encode(blocks, scale[:, None], format).reshape(-1)[:n]
  return (codes if format == "int8" else pack_fp4(codes)), scale


@functools.partial(jax.jit, static_argnames=("shape", "format", "block"))
def dequantize(codes: jax.Array, scales: jax.Array, shape: Sequence[int],
               format: str = "fp4_e3m0", block: int | None = None) -> jax.Array:
  """Inverse of `quantize` (up to rounding): float32 array of `shape`."""
  _check(format, block)
  shape = tuple(shape)
  n = math.prod(shape)
  if format in ("none", "bf16"):
    return codes.astype(jnp.float32).reshape(shape)
  if format == "fp4_e3m0":
    codes = unpack_fp4(codes, n)
  k = n if block is None else int(block)
  nb = num_blocks(n, block)
  per_element = jnp.repeat(scales, k, total_repeat_length=nb * k)[:n]
  return decode(codes, per_element, format).reshape(shape)


@functools.partial(jax.jit, static_argnames=("format", "block"))
def fake_quantize(x: jax.Array, format: str = "fp4_e3m0", block: int | None = None
                  ) -> jax.Array:
  """dequantize(quantize(x)) as float32 of x's shape, without flattening when
  the blocks allow (per-tensor, or K dividing the last dimension)."""
  _check(format, block)
  x = jnp.asarray(x, jnp.float32)
  if format == "none":
    return x
  if format == "bf16":
    return x.astype(jnp.bfloat16).astype(jnp.float32)
  shape = x.shape
  if block is None:
    view = x[None]
    axes = tuple(range(1, view.ndim))
  elif x.ndim and shape[-1] % int(block) == 0:
    view = x.reshape(shape[:-1] + (shape[-1] // int(block), int(block)))
    axes = (view.ndim - 1,)
  else:
    codes, scales = quantize(x, format, block)
    return dequantize(codes, scales, shape, format, block)
  scale = scale_of(jnp.max(jnp.abs(view), axis=axes, keepdims=True), format)
  return decode(encode(view, scale, format), scale, format).reshape(shape)


def error_bound(x: np.ndarray, format: str, block: int | None = None) -> np.ndarray:
  """Elementwise bound on |x - fake_quantize(x)| (for tests and docs)."""
  _check(format, block)
  x = np.asarray(x, np.float32)
  if format == "none":
    return np.zeros_like(x)
  if format == "bf16":
    return np.abs(x) * 2.0 ** -8
  flat = np.abs(x).reshape(-1)
  n = flat.size
  k = n if block is None else int(block)
  nb = num_blocks(n, block)
  padded = np.pad(flat, (0, nb * k - n))
  absmax = np.repeat(padded.reshape(nb, k).max(axis=1), k)[:n].reshape(x.shape)
  if format == "int8":
    return absmax / _INT8_MAX * (1 + 2.0 ** -15) / 2
  return np.maximum(np.abs(x) / 3, absmax * 2.0 ** -7) * (1 + 1e-6)
