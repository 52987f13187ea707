"""Builds vaekernels' C++/CUDA extensions through torch.utils.cpp_extension (ninja).

- ``vaekernels._C``: the op schemas (csrc/ops.cpp), plus the CUDA kernels when a CUDA-enabled
  torch and a CUDA toolkit are present (``VAEKERNELS_CUDA=0/1`` overrides the detection).
- ``vaekernels._cpu_<capability>``: the CPU kernels (csrc/cpu), compiled once per CPU capability
  with that capability's flags, as ATen builds its own kernels; vaekernels._backend loads the one
  that matches ``torch.backends.cpu.get_cpu_capability()`` at run time. Never ``-march=native``.
- ``VAEKERNELS_CPP=0`` builds nothing: the package then runs on its pure-PyTorch reference.

Build against the torch already installed: ``pip install --no-build-isolation -e .``
"""

import glob
import os
import platform
import re
import subprocess

from setuptools import find_packages, setup

# The capability flags ATen uses for its own kernels (cmake/Codegen.cmake), x86-64 only.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mbmi2", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def env_flag(name):
    value = os.environ.get(name)
    return None if value is None or value == "" else value not in ("0", "false", "False", "OFF")


def cuda_toolkit_problem(torch, cuda_home):
    """Why the CUDA kernels cannot be built against this torch, or None when they can."""
    if torch.version.cuda is None:
        return "torch is a CPU build"
    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    if cuda_home is None or not os.path.exists(nvcc):
        return "no nvcc was found (set CUDA_HOME)"
    release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    # torch refuses to build with a toolkit of another major version than its own.
    if release is None or release.group(1) != torch.version.cuda.split(".")[0]:
        return f"{nvcc} is not CUDA {torch.version.cuda.split('.')[0]}.x, the CUDA of this torch"
    return None


def extensions():
    if env_flag("VAEKERNELS_CPP") is False:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class BuildTempPerExtension(BuildExtension):
        """Each extension's objects in a folder of its own: the capabilities compile the same sources
        with other flags, and in one shared folder each overwrote the last one's objects, so that a
        rebuild after any change compiled every source once per capability."""

        def build_extension(self, ext):
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

    # ATen's parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially.
    common = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    with_cuda = env_flag("VAEKERNELS_CUDA")
    if with_cuda is None:
        problem = cuda_toolkit_problem(torch, CUDA_HOME)
        with_cuda = problem is None
        if problem is not None:
            print(f"vaekernels: building without the CUDA kernels ({problem}); CUDA tensors use Triton")
    if with_cuda:
        schema_ext = CUDAExtension(
            "vaekernels._C",
            ["csrc/ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu")), *sorted(glob.glob("csrc/cuda/*_binding.cpp"))],
            define_macros=[("VAEKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": common, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        schema_ext = CppExtension("vaekernels._C", ["csrc/ops.cpp"], extra_compile_args={"cxx": common})

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    capabilities = CPU_CAPABILITY_FLAGS if x86 else {"DEFAULT": []}
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cpu_exts = [
        CppExtension(
            f"vaekernels._cpu_{name.lower()}",
            cpu_sources,
            define_macros=[("CPU_CAPABILITY", name), (f"CPU_CAPABILITY_{name}", None)],
            extra_compile_args={"cxx": common + flags},
            extra_link_args=["-fopenmp"],
        )
        for name, flags in capabilities.items()
    ]
    return [schema_ext, *cpu_exts], {"build_ext": BuildTempPerExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["vaekernels", "vaekernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
