"""maml_tf: gradient-based meta-learning (MAML and friends) in TensorFlow 2 / Keras 3."""

from setuptools import setup

LINUX_X86 = "platform_system == 'Linux' and platform_machine == 'x86_64'"
OTHER = "platform_system != 'Linux' or platform_machine != 'x86_64'"

setup(
    name="maml_tf",
    version="0.1.0",
    description="Exact second-order MAML and meta-learners in TensorFlow 2 / Keras 3",
    # models/ and data/ stay top-level folders in the repository but install as
    # maml_tf.models and maml_tf.data: nothing generic lands in a user's site-packages.
    packages=["maml_tf", "maml_tf.config", "maml_tf.algorithms", "maml_tf.rl", "maml_tf.models", "maml_tf.data"],
    package_dir={"maml_tf": "maml_tf", "maml_tf.models": "models", "maml_tf.data": "data"},
    # The standard class splits (CIFAR-FS, FC100, CUB, tieredImageNet): --split_file=<name>.
    package_data={"maml_tf.data": ["splits/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.10",
        # TF 2.21 no longer installs TensorBoard, and tf.summary fails without it.
        "tensorboard>=2.21",
        "tensorflow-datasets>=4.9",
        # TFDS 4.9.10 cannot prepare a data set without it.
        "importlib_resources",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cpu": [f"tensorflow-cpu~=2.21.0; {LINUX_X86}", f"tensorflow~=2.21.0; {OTHER}"],
        "gpu": ["tensorflow[and-cuda]~=2.21.0"],
        "tpu": ["tensorflow-tpu~=2.21.0"],
        # .ci/run lints (ruff) and type-checks (mypy) before the tests: pyproject.toml.
        "test": ["pytest>=8", "ruff>=0.17,<0.18", "mypy>=2.4,<3"],
        # HalfCheetah goal velocity / direction (reinforcement learning); 2D navigation and
        # the tests need nothing more.
        "rl": ["gymnasium[mujoco]>=1.0"],
    },
)
