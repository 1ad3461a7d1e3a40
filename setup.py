from setuptools import find_packages, setup

setup(
    name="mta",
    version="0.1.0",
    description="Multi-Token Attention (arXiv 2504.00927) for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_mta", "configuration_mta", "conversion", "mta"]),
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "peft>=0.17",
        "tqdm",
    ],
    # Triton runs the fused kernels in its interpreter on CPU-only machines; its interpreter
    # needs numpy < 2.4 (loop bounds are converted with int(), which numpy 2.4 refuses for 1-element arrays).
    # `mta finetune` reads local text through `datasets` when it is installed (the "finetune" extra),
    # and through plain Python otherwise; the tests check that both give the same blocks.
    extras_require={"finetune": ["datasets>=3"], "test": ["pytest>=8", "pytest-xdist>=3", "triton>=3.6", "numpy<2.4", "datasets>=3"]},
    entry_points={"console_scripts": ["mta=mta.cli:main"]},
)
