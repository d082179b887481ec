import pytest

from posttrain_jax.core import distributed


def test_no_environment_means_single_process():
  assert distributed.initialize_from_env({}) is False


def test_incomplete_environment_names_the_missing_variables():
  with pytest.raises(ValueError, match="POSTTRAIN_JAX_PROCESS_ID not set"):
    distributed.initialize_from_env({distributed.COORDINATOR: "127.0.0.1:1234",
                                     distributed.NUM_PROCESSES: "2"})
  with pytest.raises(ValueError, match=r"outside \[0, POSTTRAIN_JAX_NUM_PROCESSES=2\)"):
    distributed.initialize_from_env({distributed.COORDINATOR: "127.0.0.1:1234",
                                     distributed.NUM_PROCESSES: "2",
                                     distributed.PROCESS_ID: "2"})
  with pytest.raises(ValueError, match="must be integers"):
    distributed.initialize_from_env({distributed.COORDINATOR: "127.0.0.1:1234",
                                     distributed.NUM_PROCESSES: "two",
                                     distributed.PROCESS_ID: "0"})
