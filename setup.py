"""Installs the training-stability toolbox: admin_torch, reinmax, sign_optim and fairseq_plugins."""

from pathlib import Path

from setuptools import Extension, find_packages, setup

here = Path(__file__).parent

setup(
    name="stability-toolbox",
    version="0.1.0",
    description=(
        "Training-stability toolbox for deep transformers: Admin residual scaling, the ReinMax "
        "estimator, AddSign/PowerSign optimizers, and fairseq plugins for all of them."
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["admin_torch*", "reinmax*", "sign_optim*", "fairseq_plugins*", "stability_toolbox*"]),
    # AddSign/PowerSign's one-pass CPU kernel: plain C + OpenMP (no torch headers: ~2 s with gcc),
    # called through ctypes. optional: without a C compiler the optimizers use their foreach path.
    ext_modules=[Extension(
        "sign_optim._fused_kernel", ["sign_optim/_fused_kernel.c"],
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-std=gnu11"],
        extra_link_args=["-fopenmp"], optional=True)],
    # Only torch: fairseq and the recipe tools are extras, and importing the three
    # libraries never imports fairseq.
    install_requires=["torch>=1.13"],
    extras_require={
        "fairseq": ["fairseq-fixed==0.12.3.1", "hydra-core==1.3.2", "omegaconf==2.3.0"],
        "recipes": ["sentencepiece", "sacrebleu>=2", "matplotlib"],
        "dev": ["pytest", "pytest-xdist", "hypothesis", "transformers", "matplotlib", "sentencepiece", "sacrebleu>=2"],
    },
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
