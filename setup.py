"""ddpm-scale: train DDPM diffusion models across many GPUs and nodes."""

from setuptools import find_packages, setup

setup(
    name="ddpm-scale",
    version="0.1.0",
    description="Distributed DDPM training: torchrun/DDP, webdataset shards, bf16 + torch.compile, "
    "fused EMA, crash-safe resume, SLURM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["trainer*", "models*", "data_pipeline*", "launch*", "configs*", "benchmarks*"]),
    package_data={"configs": ["*.yaml"], "launch": ["*.sbatch"]},
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision>=0.26",
        "webdataset>=0.2.100",
        "tensorboard>=2.16",
        "pyyaml>=6.0",
        "einops>=0.8",
        "submitit>=1.5",
        "safetensors>=0.4",
        "pillow>=10.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "torch-fidelity>=0.4,<0.5",  # FID/IS/KID with the standard TF-Inception features
    ],
    extras_require={
        "lsun": ["lmdb>=1.4"],
        "ffcv": ["ffcv>=1.0.2"],
        "diffusers": ["diffusers>=0.30"],
        "parquet": ["pyarrow>=14"],  # ddpm-prepare from parquet files (dataset hubs)
        "test": ["pytest>=8.0", "ruff>=0.6", "diffusers>=0.30", "lmdb>=1.4", "pyarrow>=14",
                 "scikit-learn>=1.4"],  # the real digits of the convergence test (trainer.convergence)
    },
    entry_points={
        "console_scripts": [
            "ddpm-train=trainer.main:main",
            "ddpm-sample=trainer.sample:main",
            "ddpm-evaluate=trainer.evaluate:main",
            "ddpm-ema=trainer.posthoc_cli:main",
            "ddpm-export=trainer.export:main",
            "ddpm-prepare=data_pipeline.prepare:main",
            "ddpm-submit=launch.submit:main",
        ]
    },
)
