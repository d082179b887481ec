"""Streaming DiLoCo: M replicas training apart, synchronising fragments over a slow network.

  streaming_diloco  DiLoCoConfig, DiLoCoState, the outer step (Nesterov), fragment schedule
  fragments         which parameters each fragment holds (strided, sequential, split)
  quantization      FP4/FP8/INT formats with per-tensor, per-row or per-block scales
  exchange          the quantized pseudo-gradient exchange (reference and sharded)
  traffic           bytes on the wire per exchange and per run
  trainer           DiLoCoTrainer: inner steps of all replicas + exchanges, partitioned
  loop              DiLoCoLoop: the Trainer interface the jobs use; distillation wrapper
  policy            KL-regularised REINFORCE under Streaming DiLoCo (the RL wrapper)
  elastic/          elastic Streaming DiLoCo: one JAX job per slice, torchft quorums, healing

diloco may import core, models, distillation and rl; nothing below imports it.
"""
