"""Builds card_megatron and its C++ data indexer (pybind11 extension ``card_megatron._indexer``)."""

import glob
import shutil
import sys

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:
    sys.exit(
        "error: pybind11 is required to build the C++ indexer (csrc/). "
        "Install it first: pip install pybind11==3.1.0  (or run `make setup`)."
    )

if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
    sys.exit("error: no C++ compiler found (g++, c++ or clang++); install one, e.g. apt-get install g++.")

ext = Pybind11Extension(
    "card_megatron._indexer",
    sources=sorted(glob.glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="card_megatron",
    version="0.1.0",
    description="Pretraining for CARD (causal autoregressive diffusion) and its ARM/MDLM/BD3LM baselines "
    "on Megatron-core and DeepSpeed",
    # the library, and the applications built on it (apps/study: the study); the library never imports apps
    packages=find_packages(include=["card_megatron", "card_megatron.*", "apps", "apps.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    # python tools/X.py and python -m card_megatron.tools.X run the same main()
    entry_points={
        "console_scripts": [
            "card-train=card_megatron.train:main",
            "card-preprocess=card_megatron.tools.preprocess_data:main",
            "card-build-index=card_megatron.tools.build_index:main",
            "card-generate=card_megatron.tools.generate:main",
            "card-evaluate=card_megatron.tools.evaluate:main",
            "card-export-hf=card_megatron.tools.export_hf:main",
            "card-import-hf=card_megatron.tools.import_hf:main",
            "card-lm-eval=card_megatron.tools.run_lm_eval:main",
            "card-study=apps.study.main:main",
        ]
    },
    python_requires=">=3.11",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "sentencepiece",
        "numpy",
        "wandb",
        "pybind11",
        "PyYAML",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest"],
        # Parquet and .zst inputs, Hugging Face tokenizer.json (pip install -e .[data])
        "data": ["pyarrow", "zstandard", "tokenizers"],
        # tools/export_hf.py, tools/import_hf.py (gguf, accelerate: GGUF input), tools/evaluate.py and the
        # lm-eval-harness adapter (pip install -e .[eval])
        "eval": ["tokenizers", "transformers", "safetensors", "lm_eval", "gguf", "accelerate"],
    },
)
