"""telechat_ms: train, fine-tune, convert and run TeleChat2 on MindSpore."""
from setuptools import find_packages, setup

# Versions known to work together on CPU (see PLATFORM_NOTES): mindformers 1.9.0 pins mindspore~=2.9.0 and numpy<2.
INSTALL_REQUIRES = [
    "mindspore==2.9.0",
    "mindformers==1.9.0",
    "numpy>=1.26,<2",
    "sentencepiece>=0.2.0",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "matplotlib>=3.8,<3.11",  # loss curves; 3.10 still supports numpy 1.26
]

setup(
    name="telechat_ms",
    version="0.1.0",
    description="TeleChat2 on MindSpore: convert, prepare data, train, infer",
    python_requires=">=3.11",
    packages=find_packages(include=["telechat_ms", "telechat_ms.*"]),
    package_data={"telechat_ms": ["demo_data/*", "demo_data/**/*", "serve/static/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "torch": ["torch==2.13.0"],
        "dev": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["telechat-ms=telechat_ms.cli:main"]},
)
