"""vivit-kernels: fused factorised attention and tubelet embedding for video transformers.

Installs two packages: `vivit_kernels` (the ops) and `vivit` (the ViViT models, from models/vivit).
"""

import importlib.util
import shutil
import warnings
from pathlib import Path

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = Path(__file__).resolve().parent
packages = find_packages(include=["vivit_kernels", "vivit_kernels.*"])
packages += ["vivit"] + [f"vivit.{name}" for name in find_packages("models/vivit")]


def build_cpu_kernels(package: Path) -> None:
    """Compile csrc/ into `package`/_csrc with the loader's own build (vivit_kernels/_extension.py:
    same sources, flags and hash-named directory), when torch is importable here.

    Without torch, or when the compile fails, the install goes on and the kernels are built on
    first use instead.
    """
    if importlib.util.find_spec("torch") is None:
        return
    spec = importlib.util.spec_from_file_location("_vivit_kernels_extension", HERE / "vivit_kernels" / "_extension.py")
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    try:
        library = extension.build(package / "_csrc")
    except Exception as error:  # no compiler, no OpenMP, ...: build on first use instead
        warnings.warn(
            f"vivit_kernels: C++ CPU kernels not built ({error}); they will be built on first use", stacklevel=2
        )
        return
    for path in library.parent.iterdir():  # keep the library, not the objects and ninja files
        if path != library and path.is_file() and package != HERE / "vivit_kernels":
            path.unlink()
    # Builds of earlier sources for this torch and Python; another environment's build stays.
    for stale in library.parent.parent.glob(f"{extension.PREFIX}*_{extension.build_tag()}"):
        if stale != library.parent:
            shutil.rmtree(stale, ignore_errors=True)


class BuildPy(build_py):
    """A wheel carries the library built from the sources it was made of; an editable install
    (`pip install -e .`, PEP 660) builds it in place, where the package is imported from."""

    def run(self):
        super().run()
        if self.editable_mode:
            build_cpu_kernels(HERE / "vivit_kernels")
        else:
            build_cpu_kernels(Path(self.build_lib) / "vivit_kernels")


class BinaryDistribution(Distribution):
    """The library links this torch and this Python (libtorch_python), so a wheel that carries it is
    tagged for one platform and Python (here cp311-cp311-linux_x86_64), not py3-none-any."""

    def has_ext_modules(self):
        return importlib.util.find_spec("torch") is not None


class Develop(develop):
    """`python setup.py develop`, the legacy editable install: the library is built in place too."""

    def run(self):
        build_cpu_kernels(HERE / "vivit_kernels")
        super().run()


setup(
    name="vivit-kernels",
    # Read from the package's file, not imported: importing vivit_kernels imports torch.
    version=next(
        line.split('"')[1]
        for line in (HERE / "vivit_kernels" / "__init__.py").read_text().splitlines()
        if line.startswith("__version__ = ")
    ),
    description="Fused factorised (spatial / temporal / split-head) attention and tubelet embedding for ViViT",
    # The tested versions, both ends: `make test` (torch 2.14.1), `make test-compat` (torch 2.13.0),
    # on Python 3.11.
    python_requires=">=3.11,<3.12",
    packages=packages,
    package_dir={"vivit": "models/vivit"},
    package_data={"vivit_kernels": ["*.md", "triton/*.md"]},
    cmdclass={"build_py": BuildPy, "develop": Develop},
    distclass=BinaryDistribution,
    install_requires=["torch>=2.13,<2.15", "einops>=0.8", "numpy"],
    extras_require={"triton": ["triton>=3.1"]},
    entry_points={
        "console_scripts": [
            "vivit-train=vivit.cli.train:main",
            "vivit-eval=vivit.cli.evaluate:main",
            "vivit-predict=vivit.cli.predict:main",
        ]
    },
)
