import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import pytest

from posttrain_jax.core import partitioning


def test_eight_devices_available():
  assert jax.device_count() == 8


@pytest.mark.parametrize("ici,dcn,expected", [
    ({"data": -1}, None, {"replica": 1, "data": 8, "fsdp": 1, "tensor": 1}),
    ({"fsdp": -1, "tensor": 2}, None, {"replica": 1, "data": 1, "fsdp": 4, "tensor": 2}),
    ({"fsdp": 2, "tensor": 2}, {"replica": 2},
     {"replica": 2, "data": 1, "fsdp": 2, "tensor": 2}),
])
def test_mesh_shapes(ici, dcn, expected):
  mesh = partitioning.create_mesh(ici, dcn)
  assert dict(mesh.shape) == expected
  assert mesh.axis_names == partitioning.MESH_AXES
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_bad_mesh_requests_are_rejected():
  with pytest.raises(ValueError, match="needs 3 devices but 8"):
    partitioning.create_mesh({"data": 3})
  with pytest.raises(ValueError, match="Unknown mesh axes.*'model'"):
    partitioning.create_mesh({"model": 2})
  with pytest.raises(ValueError, match="At most one axis"):
    partitioning.create_mesh({"data": -1, "fsdp": -1})


def test_logical_rules_map_parameters_and_activations():
  mesh = partitioning.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  # parameters: embed over fsdp, heads over tensor
  assert partitioning.mesh_axes(("embed", "heads", "kv"), (64, 4, 16), mesh) == P(
      "fsdp", "tensor", None)
  # activations: batch takes every data axis, so embed stays unsharded
  assert partitioning.mesh_axes(("batch", "length", "embed"), (8, 16, 64), mesh) == P(
      ("replica", "data", "fsdp"), None, None)
  assert partitioning.batch_sharding(mesh).spec == P(("replica", "data", "fsdp"), None)


def test_non_divisible_dimensions_are_replicated():
  mesh = partitioning.create_mesh({"data": 2, "tensor": 4})
  # one kv head cannot be split over 4 tensor devices
  assert partitioning.mesh_axes(("embed", "kv_heads", "kv"), (64, 1, 16), mesh)[1] is None
  assert partitioning.mesh_axes(("embed", "kv_heads", "kv"), (64, 8, 16), mesh)[1] == "tensor"
  assert partitioning.mesh_axes(("batch", "length"), (3, 16), mesh)[0] is None  # 3 % 2


def test_rules_cover_every_logical_axis_the_model_uses():
  from posttrain_jax.models import ModelConfig, Transformer
  import jax.numpy as jnp
  cfg = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=32, sliding_window_size=4,
                    scan_layers=True)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                         jnp.zeros((1, 4), jnp.int32))
  names = {a for spec in jax.tree.leaves(
      nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P)) for a in spec}
  ruled = {name for name, _ in partitioning.DEFAULT_RULES}
  assert names - {None} <= ruled
