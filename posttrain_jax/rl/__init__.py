"""RLHF: reward models and policy optimisation.

  bradley_terry    Bradley-Terry loss, accuracy and margin of preference pairs
  reward_model     RewardModel (backbone + linear head), save/load, reward functions
  reward_training  RewardTrainer: linear probing then fine-tuning (WARM recipe)
  gold_reward      the programmatic gold reward of the CPU experiments
  rewards          named reward functions for the policy trainer
  policy_gradient  pure REINFORCE pieces: log-probs, KL-shaped reward, baselines, EMA
  policy_optimization  the core every on-policy algorithm shares: rollout
                   log-probs, advantages, several clipped updates, EMA anchor
  reinforce        KL-regularised REINFORCE (WARP stage 1) on that core
  rloo             RLOO: leave-one-out baseline, KL in the reward
  grpo             GRPO (+ Dr. GRPO, DAPO options): group-normalised advantages,
                   clipped token ratios, k3 KL
  policy_training  PolicyTrainer: the partitioned, jitted step of any of them
  dpo              DPO / cDPO / IPO losses on preference pairs (pure, as sums)
  dpo_training     DPOTrainer: the partitioned DPO step, reference on the fly or precomputed

The jobs that run them (`train_reward_model`, `train_policy`, `train_dpo`) are in
posttrain_jax.jobs.
"""
