"""Weight-space merging: pure merges of parameter trees and their model-directory forms.

  interpolation  average (WARM), slerp / slerp_many / liti (WARP), normalized_weights
  model_dirs     load_models, write_model, merge_model_dirs, slerp_model_dirs,
                 liti_model_dirs

`from posttrain_jax import merging` gives both (merging.average,
merging.merge_model_dirs, ...).
"""

from posttrain_jax.merging.interpolation import (average, liti, normalized_weights, slerp,
                                                 slerp_many)
from posttrain_jax.merging.model_dirs import (LoadedModel, liti_model_dirs, load_models,
                                              merge_model_dirs, slerp_model_dirs,
                                              write_model)
