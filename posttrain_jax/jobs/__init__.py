"""The binary's jobs (gin: `job.name`), each a plain function registered by main.

  train               LM training (optionally Streaming DiLoCo)
  distill             distillation of a student from a teacher (optionally DiLoCo)
  distillation_demo   oracle -> teacher -> student, the README's quickstart
  train_reward_model  Bradley-Terry reward model (WARM members)
  train_policy        KL-regularised REINFORCE (optionally DiLoCo)

Jobs wire the capabilities below them into runs: data, checkpoints, resume,
eval, progress. They sit above diloco/ because a job may run under it.
"""
