"""vivit-kernels: fused factorised attention and tubelet embedding for video transformers.

Installs two packages: `vivit_kernels` (the ops) and `vivit` (the ViViT models, from models/vivit).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["vivit_kernels", "vivit_kernels.*"])
packages += ["vivit"] + [f"vivit.{name}" for name in find_packages("models/vivit")]

setup(
    name="vivit-kernels",
    version="0.1.0",
    description="Fused factorised (spatial / temporal / split-head) attention and tubelet embedding for ViViT",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"vivit": "models/vivit"},
    package_data={"vivit_kernels": ["*.md", "triton/*.md"]},
    install_requires=["torch>=2.5", "einops>=0.8", "numpy"],
    extras_require={"triton": ["triton>=3.1"]},
)
