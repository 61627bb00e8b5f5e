"""vivit-kernels: fused factorised attention and tubelet embedding for video transformers.

Installs two packages: `vivit_kernels` (the ops) and `vivit` (the ViViT models, from models/vivit).
"""

import warnings

from setuptools import find_packages, setup
from setuptools.command.develop import develop

packages = find_packages(include=["vivit_kernels", "vivit_kernels.*"])
packages += ["vivit"] + [f"vivit.{name}" for name in find_packages("models/vivit")]


def cpu_extension() -> dict:
    """The C++ CPU kernels (csrc/), compiled with ninja at install time when torch is importable.

    Without torch here, or when the compile fails, the install goes on and the kernels are built
    on first use instead (vivit_kernels/_extension.py, same sources and flags).
    """
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # no compiler, no OpenMP, ...: build on first use instead
                warnings.warn(f"vivit_kernels: C++ CPU kernels not built ({error}); they will be built on first use")

    sources = [f"csrc/{name}" for name in ("attention.cpp", "block_math.cpp", "tubelet.cpp", "ops.cpp")]
    # -fopenmp at compile and link time, or at::parallel_for runs on one thread; no -march=native.
    extension = CppExtension(
        "vivit_kernels._csrc",
        sources,
        depends=["csrc/kernels.h"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )

    class DevelopInPlace(develop):
        # `pip install -e .` of a project without pyproject.toml runs `setup.py develop`, which now
        # re-runs pip in an isolated environment where torch (so the extension) is absent; build the
        # library in place first, here, where torch is importable.
        def run(self):
            self.reinitialize_command("build_ext", inplace=1)
            self.run_command("build_ext")
            super().run()

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": OptionalBuildExtension, "develop": DevelopInPlace},
    }


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
    entry_points={"console_scripts": ["vivit-train=vivit.train:main", "vivit-eval=vivit.evaluate:main",
                                      "vivit-predict=vivit.predict:main"]},
    **cpu_extension(),
)
