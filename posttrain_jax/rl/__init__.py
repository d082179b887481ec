"""RLHF: reward models and policy optimisation.

  bradley_terry    Bradley-Terry loss, accuracy and margin of preference pairs
  reward_model     RewardModel (backbone + linear head), save/load, reward functions
  reward_training  RewardTrainer: linear probing then fine-tuning (WARM recipe)
  gold_reward      the programmatic gold reward of the CPU experiments
  rewards          named reward functions for the policy trainer
  policy_gradient  pure REINFORCE pieces: log-probs, KL-shaped reward, baselines, EMA
  policy_training  PolicyTrainer: the partitioned KL-regularised REINFORCE step

The jobs that run them (`train_reward_model`, `train_policy`) are in
posttrain_jax.jobs.
"""
