"""Knowledge distillation (teacher-hacking study: oracle -> teacher -> student).

  losses            token-level divergences: forward/reverse KL, JSD, TVD (temperature)
  sequence_kl       sequence-level KL estimators (exact per token, Monte Carlo)
  trainer           DistillationTrainer: the partitioned student step
  sources           offline data, online teacher samples, online student samples
  eval              proxy (teacher) and golden (oracle) metrics of the student
  hacking_detector  flags proxy improving while golden worsens

The jobs that run them (`distill`, `distillation_demo`) are in posttrain_jax.jobs.
"""
