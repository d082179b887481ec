"""Generation from the project's models.

  sampling  Sampler: batched prefill + KV-cached decode, temperature/top-k/top-p,
            log-probs of the sampled tokens under the policy (and a reference)
"""
