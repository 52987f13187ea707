"""Build checks that need no GPU: the CUDA sources are torch-free and compile with a bare nvcc."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
CUDA_HEADERS = sorted(CUDA_DIR.glob("*.cuh"))

# torch.utils.cpp_extension adds these to every nvcc call of the pip build; they remove the
# implicit __half / __nv_bfloat16 conversions, so code that compiles without them may not with them.
TORCH_NVCC_MACROS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
TORCH_HEADER = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)(/|\.h$)")


def test_cuda_sources_exist():
    assert CUDA_SOURCES, f"no .cu file under {CUDA_DIR}"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    obj = tmp_path / (source.stem + ".o")
    cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-O3", *TORCH_NVCC_MACROS, str(source), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\nexited {result.returncode}:\n{result.stderr}"
    assert obj.is_file() and obj.stat().st_size > 0, f"nvcc returned 0 but wrote no {obj.name}"


def torch_includes(path, seen=None):
    """(file, header) for every torch header that `path` includes, following local "..." includes."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    found = []
    for bracket, header in INCLUDE.findall(path.read_text()):
        if TORCH_HEADER.match(header):
            found.append((path.name, header))
        elif bracket == '"' and (path.parent / header).is_file():
            found += torch_includes((path.parent / header).resolve(), seen)
    return found


@pytest.mark.parametrize("source", CUDA_SOURCES + CUDA_HEADERS, ids=lambda path: path.name)
def test_cuda_sources_are_torch_free(source):
    assert torch_includes(source.resolve()) == []


def test_torch_header_detection():
    # The check above is only as good as its pattern: it must see these, and only these.
    text = (
        '#include <ATen/ATen.h>\n  # include "c10/util/Half.h"\n#include <torch/extension.h>\n#include <cuda_fp16.h>\n'
    )
    headers = [header for _, header in INCLUDE.findall(text)]
    assert [h for h in headers if TORCH_HEADER.match(h)] == ["ATen/ATen.h", "c10/util/Half.h", "torch/extension.h"]
