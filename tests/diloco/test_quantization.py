"""Pseudo-gradient exchange formats: code table, rounding, packing, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.diloco import quantization as q

CASES = [(f, b) for f in q.FORMATS for b in (None, 16, 7)
         if b is None or f in ("int8", "fp4_e3m0")]


def sample(seed=0, shape=(5, 24)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * np.exp(rng.normal(size=shape) * 2)
  x.flat[::11] = 0.0  # exact zeros
  return x.astype(np.float32)


def roundtrip(x, fmt, block):
  codes, scales = q.quantize(jnp.asarray(x), fmt, block)
  return np.asarray(q.dequantize(codes, scales, x.shape, fmt, block))


@pytest.mark.parametrize("fmt,block", CASES)
def test_sign_zero_and_error_bound(fmt, block):
  x = sample()
  y = roundtrip(x, fmt, block)
  assert y.dtype == np.float32 and y.shape == x.shape
  assert np.all((np.sign(y) == np.sign(x)) | (y == 0))  # never flips a sign
  assert np.all(y[x == 0] == 0)
  assert np.all(np.abs(y - x) <= q.error_bound(x, fmt, block))
  if fmt == "none":
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fmt,block", CASES)
def test_idempotent_and_fake_quantize_matches(fmt, block):
  x = sample(1)
  codes, scales = q.quantize(jnp.asarray(x), fmt, block)
  y = q.dequantize(codes, scales, x.shape, fmt, block)
  codes2, scales2 = q.quantize(y, fmt, block)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(codes2))
  np.testing.assert_array_equal(np.asarray(scales), np.asarray(scales2))
  np.testing.assert_array_equal(np.asarray(q.fake_quantize(jnp.asarray(x), fmt, block)),
                                np.asarray(y))


def test_fp4_code_table_and_rounding():
  scale = 8.0
  r = np.array([1.0, 0.75, 0.7499, 0.5, 2.0**-6, 1.5 * 2.0**-6, 2.0**-7, 0.99 * 2.0**-7,
                0.0], np.float32)
  x = np.concatenate([[scale], r * scale, -r * scale]).astype(np.float32)
  codes, scales = q.quantize(jnp.asarray(x), "fp4_e3m0")
  assert float(scales[0]) == scale
  fields = np.asarray(q.unpack_fp4(codes, x.size))
  # value-domain nearest: 0.75 ties up to 1, 0.7499 -> 0.5, 1.5*2^-6 ties up to 2^-5,
  # 2^-7 (midpoint to zero) -> 2^-6, below it -> 0
  expect = np.array([7, 7, 6, 6, 1, 2, 1, 0, 0])
  np.testing.assert_array_equal(fields[1:10], expect)
  np.testing.assert_array_equal(fields[10:], np.where(expect > 0, expect | 8, 0))
  y = np.asarray(q.dequantize(codes, scales, x.shape, "fp4_e3m0"))
  mags = np.where(expect > 0, scale * 2.0 ** (expect - 7.0), 0.0)
  np.testing.assert_array_equal(y[1:10], mags)
  np.testing.assert_array_equal(y[10:], -mags)
  # all 15 representable values decode from their codes
  table = np.asarray(q._fp4_decode(jnp.arange(16, dtype=jnp.uint8), jnp.float32(1.0)))
  np.testing.assert_array_equal(table[:8], [0] + [2.0**k for k in range(-6, 1)])
  np.testing.assert_array_equal(table[8:], -table[:8])


def test_fp4_packing_round_trip():
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 64):
    codes = jnp.asarray(rng.integers(0, 16, n), jnp.uint8)
    packed = q.pack_fp4(codes)
    assert packed.shape == ((n + 1) // 2,) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q.unpack_fp4(packed, n)), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(q.pack_fp4(jnp.asarray([3, 12], jnp.uint8))),
                                [3 | 12 << 4])


@pytest.mark.parametrize("shape", [(5, 24), (7,), (3, 3, 3)])
@pytest.mark.parametrize("block", [None, 4, 16])
def test_bytes_match_packed_arrays(shape, block):
  x = jnp.asarray(sample(2, shape))
  n = int(np.prod(shape))
  for fmt in q.FORMATS:
    blk = block if fmt in ("int8", "fp4_e3m0") else None
    codes, scales = q.quantize(x, fmt, blk)
    assert q.bytes_of(shape, fmt, blk) == codes.nbytes + scales.nbytes
  nb = 1 if block is None else -(-n // block)
  assert q.bytes_of(shape, "fp4_e3m0", block) == -(-n // 2) + 4 * nb


def test_block_scales_are_local():
  x = np.ones(32, np.float32)
  x[:16] *= 1000.0  # one large block must not flush the other to zero
  y = roundtrip(x, "fp4_e3m0", 16)
  np.testing.assert_array_equal(y, x)
  assert np.all(roundtrip(x, "fp4_e3m0", None)[16:] == 0)  # per-tensor: 1 < 1000/128


def test_all_zero_and_jittable():
  z = jnp.zeros((4, 6))
  for fmt in q.FORMATS:
    np.testing.assert_array_equal(np.asarray(q.fake_quantize(z, fmt, 8)
                                             if fmt in ("int8", "fp4_e3m0")
                                             else q.fake_quantize(z, fmt)), 0)
  f = jax.jit(lambda v: q.fake_quantize(v, "fp4_e3m0", 8))
  x = jnp.asarray(sample(3, (4, 16)))
  np.testing.assert_array_equal(np.asarray(f(x)), roundtrip(np.asarray(x), "fp4_e3m0", 8))


def test_mean_of_dequantized_equals_mean_of_codes_exchange():
  """The averaged pseudo-gradient is the fp32 mean of each replica's dequantized codes."""
  xs = [sample(s) for s in range(3)]
  exchanged = [q.quantize(jnp.asarray(x), "fp4_e3m0", 16) for x in xs]
  mean = np.mean([np.asarray(q.dequantize(c, s, xs[0].shape, "fp4_e3m0", 16))
                  for c, s in exchanged], axis=0)
  fake = np.mean([np.asarray(q.fake_quantize(jnp.asarray(x), "fp4_e3m0", 16)) for x in xs],
                 axis=0)
  np.testing.assert_array_equal(mean, fake)


def test_bad_format():
  with pytest.raises(ValueError, match="Unknown quantization format"):
    q.bytes_of((3,), "fp8")
