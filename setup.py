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
    # telechat-ms serve (versions the package index has, checked together)
    "fastapi==0.163.2",
    "uvicorn==0.54.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
    "prometheus-client==0.26.0",
]

setup(
    name="telechat_ms",
    version="0.1.0",
    description="TeleChat2 on MindSpore: convert, prepare data, train, infer, serve",
    python_requires=">=3.11",
    packages=find_packages(include=["telechat_ms", "telechat_ms.*"]),
    package_data={"telechat_ms": ["demo_data/*", "demo_data/**/*", "serve/static/*", "eval/tasks/subjects.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "torch": ["torch==2.13.0"],
        # tests: the official OpenAI client and httpx against the server; selenium drives Debian's chromium
        # (selenium 4.52 needs a certifi the index does not have)
        "dev": ["pytest>=8", "openai==3.51.0", "httpx==0.28.1", "selenium==4.51.0",
                # the eval tests: lm-eval's tasks and CLI, its HF model (accelerate) and IFEval's checkers
                "lm-eval==0.4.13", "accelerate==1.16.0", "langdetect==1.0.9", "immutabledict==4.3.1", "nltk==3.9.1"],
        # telechat-ms harness (lm-eval's CLI) and IFEval scoring (lm-eval's instruction checkers)
        "eval": ["lm-eval==0.4.13", "langdetect==1.0.9", "immutabledict==4.3.1", "nltk==3.9.1"],
    },
    entry_points={"console_scripts": ["telechat-ms=telechat_ms.cli:main"]},
)
