#!/usr/bin/env bash
# make dist-check: build the wheel from the tree (its tracked and untracked, not ignored, files) and
# check it the way a user gets it: a fresh venv with only torch and the wheel's declared
# dependencies, no C++ compiler or ninja on PATH, an empty kernel cache. The wheel is left in dist/.
#   BUILD_PYTHON: the interpreter that builds the wheel (torch, setuptools, wheel, ninja): .venv's.
#   The fresh venv gets that interpreter's Python and torch (linked, not copied), the ones the
#   library links.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
build_python=$(realpath -s "${BUILD_PYTHON:-.venv/bin/python}")  # -s: a venv's python is a link
torch_release=$("$build_python" -c "import importlib.metadata as m; print(m.version('torch'))")
work=$(mktemp -d "${TMPDIR:-/tmp}/vivit-dist-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { printf '\n== dist-check [%ss]: %s\n' "$SECONDS" "$*"; }

step "copy the tree to $work/src"
mkdir -p "$work/src"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/src"

step "build the wheel (pip wheel --no-build-isolation --no-deps, torch $torch_release)"
(cd "$work/src" && "$build_python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .)
wheel=$(echo "$work"/dist/*.whl)
echo "built $(basename "$wheel")"

step "the wheel holds every package file, the library of these sources and no build leftovers"
"$build_python" - "$wheel" "$work/src" <<'EOF'
import importlib.util, sys, zipfile
from pathlib import Path

wheel, src = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("extension", src / "vivit_kernels" / "_extension.py")
extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extension)  # stdlib only at import: names the library of these sources

names = set(zipfile.ZipFile(wheel).namelist())
expected = {str(p.relative_to(src)) for p in (src / "vivit_kernels").rglob("*") if p.is_file()}
expected |= {str(p.relative_to(src / "models")) for p in (src / "models" / "vivit").rglob("*") if p.is_file()}
expected = {name for name in expected if "__pycache__" not in name}
library = f"vivit_kernels/_csrc/{extension.library_name()}/{extension.library_name()}.so"
missing = sorted(expected - names) + ([library] if library not in names else [])
built = sorted(name for name in names if name.startswith("vivit_kernels/_csrc/"))
tag = wheel.name.removesuffix(".whl").split("-", 2)[2]
problems = [f"missing: {name}" for name in missing]
problems += [f"more than the library in _csrc: {built}"] if built and built != [library] else []
problems += [f"tagged {tag}: the library it carries is for one platform and Python"] if tag == "py3-none-any" else []
if problems:
    sys.exit("dist-check: the wheel fails its checks:\n  " + "\n  ".join(problems))
print(f"{len(expected)} package files, {library}, tag {tag}")
name, version = wheel.name.split("-")[:2]
metadata = zipfile.ZipFile(wheel).read(f"{name}-{version}.dist-info/METADATA").decode()
print("\n".join(line for line in metadata.splitlines() if line.startswith(("Requires-Python", "Requires-Dist"))))
EOF

# torch is linked from the build venv, not installed again: a CUDA build of torch with its nvidia
# packages is 5.5 GB, and a second copy does not fit every CI disk. pip sees the links' dist-info
# as an installed torch, so it checks the wheel's requirements against it and installs the rest.
step "a fresh venv: torch $torch_release (linked) and the wheel with its declared dependencies"
"$build_python" -m venv "$work/venv"
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$build_python" - "$site" <<'EOF'
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement

site = Path(sys.argv[1])
linked, todo, seen = [], [("torch", frozenset())], set()
while todo:  # torch and what it requires, extras included (cuda-toolkit[cublas, ...])
    name, extras = todo.pop()
    dist = metadata.distribution(name)
    key = (dist.metadata["Name"].lower(), extras)
    if key in seen:
        continue
    seen.add(key)
    for entry in {str(path).split("/")[0] for path in dist.files or () if not str(path).startswith("..")}:
        target = site / entry
        if entry != "__pycache__" and not entry.endswith(".pth") and not target.exists():
            target.symlink_to(Path(dist.locate_file(entry)).resolve())
            linked.append(entry)
    for text in dist.requires or ():
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in {"", *extras}):
            todo.append((requirement.name, frozenset(requirement.extras)))
print(f"linked {len(linked)} entries of {len({name for name, _ in seen})} distributions into {site}")
EOF
"$work/venv/bin/python" -m pip install -q --no-compile "$wheel"
"$work/venv/bin/python" -m pip check
"$work/venv/bin/python" -m pip list --format=freeze | grep -iE '^(torch|einops|numpy|vivit)' | tr '\n' ' '
echo

# Only the venv on PATH: no c++, g++, cc or ninja to build with. Run outside the tree, so that
# nothing is imported from it.
mkdir -p "$work/run" "$work/cache"
isolated=(env -u CXX -u CC PATH="$work/venv/bin" VIVIT_KERNELS_CACHE="$work/cache" PYTHONNOUSERSITE=1)
cd "$work/run"

step "import vivit_kernels; the cpu backend runs on the shipped library, no compiler, an empty cache"
"${isolated[@]}" python - <<'EOF'
import os, shutil, sys

tools = [tool for tool in ("c++", "g++", "gcc", "cc", "ninja") if shutil.which(tool)]
assert not tools, f"a build tool is on PATH: {tools}"
import torch

import vivit_kernels
from vivit_kernels import _extension, factorised_attention, reference, tubelet_embedding
from vivit_kernels.checks import MODES

package = os.path.dirname(vivit_kernels.__file__)
assert package.startswith(sys.prefix), f"vivit_kernels imported from {package}, not from the venv"
assert not _extension.have_sources(), "the wheel installed the C++ sources"
library = _extension.load()
assert library.startswith(package), library
g = torch.Generator().manual_seed(0)
for mode in MODES:
    q, k, v = torch.randn(3, 2, 4, 1 + 3 * 10, 8, dtype=torch.float64, generator=g).unbind(0)
    out = factorised_attention(q, k, v, 3, mode, num_prefix_tokens=1, backend="cpu")
    expected = reference.factorised_attention(q, k, v, 3, mode, num_prefix_tokens=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
video = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64, generator=g)
weight, bias = torch.randn(24, 3, 2, 8, 8, dtype=torch.float64, generator=g), torch.randn(24, dtype=torch.float64, generator=g)
out = tubelet_embedding(video, weight, bias, backend="cpu")
torch.testing.assert_close(out, reference.tubelet_embedding(video, weight, bias), rtol=1e-12, atol=1e-12)
assert not os.listdir(os.environ["VIVIT_KERNELS_CACHE"]), "something was compiled into the cache"
print(f"loaded {library}; attention ({', '.join(MODES)}) and tubelet match the reference")
EOF

step "the commands start: vivit-train, vivit-eval, vivit-predict --help"
for command in vivit-train vivit-eval vivit-predict; do
    "${isolated[@]}" "$command" --help >"$work/help.txt"
    grep -q '^usage:' "$work/help.txt" || { cat "$work/help.txt"; echo "dist-check: $command --help printed no usage" >&2; exit 1; }
    echo "$command: $(head -n 1 "$work/help.txt")"
done

step "convert without timm, transformers or vit-pytorch: a model of no family is a TypeError"
"${isolated[@]}" python - <<'EOF'
import importlib.util

from torch import nn

from vivit_kernels import convert

assert not any(importlib.util.find_spec(name) for name in ("timm", "transformers", "vit_pytorch"))
try:
    convert(nn.Linear(4, 4), mode="joint")
except TypeError as error:
    print(f"TypeError: {error}")
else:
    raise AssertionError("convert accepted an nn.Linear")
EOF

step "convert a small timm ViT (timm installed into the venv for this check only)"
"$work/venv/bin/python" -m pip install -q --no-compile timm
"${isolated[@]}" python - <<'EOF'
import copy

import timm
import torch

from vivit_kernels import FactorisedAttention, convert

torch.manual_seed(0)
model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                         num_heads=4, num_classes=5).eval()
converted = convert(copy.deepcopy(model), mode="joint", backend="cpu")
assert all(isinstance(block.attn, FactorisedAttention) for block in converted.blocks)
images = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    expected, out = model(images), converted(images)
error = ((out - expected).abs().max() / expected.abs().max()).item()
assert error < 1e-5, f"converted timm ViT: relative error {error:.1e}"
print(f"timm {timm.__version__} VisionTransformer: {len(converted.blocks)} blocks converted, relative error {error:.1e}")
EOF

mkdir -p "$repo/dist"
cp "$wheel" "$repo/dist/"
step "ok: dist/$(basename "$wheel")"
