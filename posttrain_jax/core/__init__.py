"""Training infrastructure every job shares; imports nothing else of posttrain_jax.

  trainer          TrainState, the partitioned LM step (`optimizer_step`, microbatches)
  losses           token cross-entropy (chunked), z-loss
  optimizer        OptimizerConfig -> optax chain and schedule
  partitioning     device mesh, logical-axis rules, batch/param shardings
  checkpointing    atomic orbax checkpoints of train state + data position, checksummed;
                   damaged steps are skipped and kept
  operative_config the run's config.gin, written once a start has succeeded
  quiet_stderr     TensorFlow/CUDA start-up lines off the console
  step_loop        the host loop: checkpoint cadence, preemption, resume
  progress         console progress and TensorBoard scalars
  nonfinite_guard  skip or halt on non-finite losses
  preemption       SIGTERM -> save and stop
  profiling        jax.profiler traces of chosen steps
  distributed      jax.distributed from the launcher's environment
  host_allocator   XLA:CPU malloc settings for the binaries
  platforms        no TPU probe on hosts without a TPU (JAX_PLATFORMS when libtpu is installed)
"""
