"""posttrain_jax: post-training Gemma-2-like models with JAX (distillation, RLHF, DiLoCo)."""

import setuptools

# The dependency set measured to resolve and import together on Python 3.11
# (the reasons, one per pin below; docs/architecture.md has the module map):
# - sentencepiece < 0.2.3: newer wheels need protobuf 7, xmanager pins < 7;
# - tensorboard: TF 2.21 no longer pulls it in, clu's metric writers need it;
# - tensorflow (not tensorflow-cpu): tensorflow-text requires it;
# - importlib_resources: tfds needs it without declaring it;
# - safetensors (+ ml_dtypes for bfloat16): Hugging Face checkpoint import/export;
# - matplotlib: the experiments' PNG plots (tools/plot_*.py);
# - test extra: torch (CPU wheel) and transformers build the reference Gemma 2
#   models; trl / mergekit stay out (they pull protobuf 7, xmanager pins < 7);
# - elastic extra (also in test): torchft's Lighthouse, the quorum service of
#   elastic DiLoCo (posttrain_jax/diloco/elastic; 2.5 MB wheel + OpenTelemetry,
#   about 3 s to install on top of torch; runs on CPU-only torch).
# - tpu extra (also in test): libtpu at the version jax pins (jax 0.10.2 ->
#   libtpu 0.0.42.*; about 700 MB installed). On a TPU VM it is the runtime; on
#   any host it compiles for TPU topologies without a TPU (posttrain_jax/aot,
#   docs/scale.md), which the tests do. Hosts without a TPU do not probe for one
#   (posttrain_jax/core/platforms.py sets JAX_PLATFORMS when it is unset).
ELASTIC_REQUIRES = ["torchft==0.2.0"]
TPU_REQUIRES = ["jax[tpu]>=0.10.2"]
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.90",
    "gin-config>=0.5.0",
    "clu>=0.0.12",
    "seqio>=0.0.20",
    "tensorflow>=2.21",
    "tensorflow-text>=2.21",
    "tensorflow-datasets>=4.9.10",
    "sentencepiece<0.2.3",
    "tensorboard>=2.21",
    "xmanager>=0.8.5",
    "importlib_resources",
    "numpy",
    "ml_dtypes",
    "safetensors>=0.8.0",
    "matplotlib>=3.10",
]
TEST_REQUIRES = ["pytest>=8", "pytest-xdist>=3.8", "torch==2.13.0", "transformers>=5.24.0",
                 *ELASTIC_REQUIRES, *TPU_REQUIRES]

setuptools.setup(
    name="posttrain_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["posttrain_jax", "posttrain_jax.*"]),
    package_data={"posttrain_jax.data": ["corpus/*.txt", "corpus/*.jsonl", "vocab/*.model"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "elastic": ELASTIC_REQUIRES, "tpu": TPU_REQUIRES},
)
