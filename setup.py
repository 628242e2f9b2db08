"""medgen_jax: transformer-based medical image generation in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # CI and the tests run on jax 0.10.2 (CPU, Python 3.11), the floor: the
    # attention kernels call the Pallas ops' VJP rules, whose signatures are
    # not public API and are pinned by the interpret-mode tests on this
    # version. The suite also passes on jax 0.11.2 (CPU, Python 3.12).
    "jax>=0.10.2,<0.12",
    "flax>=0.10,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "chex>=0.1.88,<0.2",
    "tensorflow-datasets>=4.9.7,<5",
    "array-record>=0.5",
    "ml-collections>=1.0,<2",
    "grain>=0.2.10,<0.3",
    "numpy>=1.26",
    "scipy>=1.11",
    "nibabel>=5.2,<6",
    "pydicom>=2.4,<4",
    "dm-pix>=0.4.3,<0.5",
    "qwix>=0.1.5,<0.2",
    "tensorboardX>=2.6,<3",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "pillow>=10",
    "absl-py>=2.1",
    # tensorflow-datasets imports it to locate builders defined outside its
    # own package (ours) without declaring it; on Python 3.11 nibabel pulls it
    # in, on 3.12 nothing else does and building a dataset fails.
    "importlib-resources>=5.12",
]

setup(
    name="medgen_jax",
    version="0.1.0",
    description="Transformer-based medical image generation in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["medgen_jax", "medgen_jax.*", "experiments", "configs"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8"],
        # Accelerators: jax's own extras pull the matching jaxlib, CUDA 12 or 13
        # plugin (with pip-installed CUDA and cuDNN) or libtpu.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.12"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.12"],  # drivers >= 580
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
        # PyTorch + timm only for the peer comparison in the attention benchmark.
        "bench": ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0"],
    },
)
