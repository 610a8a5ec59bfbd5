"""Build script: the Python package, `kernels/` as `aerl_fast.kernels`, and the `aerl_fast._C` extension.

The extension is optional at run time (every op has a torch fallback), so a failed compile of it
warns and the install still succeeds.  Environment switches:

  AERL_FAST_BUILD_EXT=0   skip the C++ extension entirely
  AERL_FAST_CUDA=1|0      force / skip the CUDA sources (default: when nvcc and a CUDA torch exist)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default=None):
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _extensions():
    """The `aerl_fast._C` extension: C++ (OpenMP) always, CUDA sources when a toolkit is present."""
    if not _flag("AERL_FAST_BUILD_EXT", True):
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # torch guesses the toolkit root from `nvcc` on PATH; when that is a wrapper script outside
        # the toolkit (here /usr/local/bin/nvcc), point it at the real root instead.
        import shutil
        nvcc = shutil.which("nvcc")
        guessed = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
        if guessed and not os.path.exists(os.path.join(guessed, "include", "cuda_runtime_api.h")) \
                and os.path.exists("/usr/local/cuda/include/cuda_runtime_api.h"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pragma: no cover - build isolation without torch
        print("aerl_fast: torch not importable at build time; skipping aerl_fast._C", file=sys.stderr)
        return [], {}

    cu = sorted(glob.glob("csrc/*.cu"))
    want_cuda = _flag("AERL_FAST_CUDA", None)
    if want_cuda is None:
        # Default: CUDA sources only when they can be targeted: a CUDA torch, a toolkit, and either
        # a visible GPU or an explicit TORCH_CUDA_ARCH_LIST. Otherwise torch would compile for
        # every architecture it knows (many minutes) code that cannot run here; CI
        # compile-checks the .cu separately (.ci/ext_checks.sh). AERL_FAST_CUDA=1 forces it.
        want_cuda = (bool(cu) and torch.version.cuda is not None
                     and cpp_extension.CUDA_HOME is not None
                     and (bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.is_available()))
    # torch >= 2.10 headers require C++20 (they #error under C++17).
    extra = {"cxx": ["-O3", "-fopenmp", "-std=c++20"]}
    libs = ["gomp"]
    if want_cuda and cu and not os.path.exists(
            os.path.join(cpp_extension.CUDA_HOME or "", "include", "cuda_runtime_api.h")):
        print(f"aerl_fast: WARNING: no CUDA headers under CUDA_HOME={cpp_extension.CUDA_HOME}; "
              "building aerl_fast._C without its CUDA kernels (set CUDA_HOME to the toolkit root)",
              file=sys.stderr)
        want_cuda = False
    if want_cuda and cu:
        # No --use_fast_math: it flushes denormal gradients to zero, so norms would differ from
        # the CPU kernel; the kernels are memory-bound and gain nothing from it.
        extra["nvcc"] = ["-O3", "-DAERL_FAST_WITH_CUDA"]
        extra["cxx"].append("-DAERL_FAST_WITH_CUDA")
        ext = cpp_extension.CUDAExtension(
            "aerl_fast._C", cpp + cu, extra_compile_args=extra, libraries=libs,
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension(
            "aerl_fast._C", cpp, extra_compile_args={"cxx": extra["cxx"]}, libraries=libs,
            py_limited_api=False,
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the extension, but never fail the install over it: the torch fallback serves."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                print(f"aerl_fast: WARNING: building aerl_fast._C failed ({exc}); "
                      "the pure-torch fallback will be used", file=sys.stderr)

        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception as exc:  # noqa: BLE001
                print(f"aerl_fast: WARNING: building {ext_.name} failed ({exc}); "
                      "the pure-torch fallback will be used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["aerl_fast", "aerl_fast.*"]) + ["aerl_fast.kernels", "aerl_fast.configs"],
    package_dir={"aerl_fast.kernels": "kernels", "aerl_fast.configs": "configs"},
    package_data={"aerl_fast.configs": ["*.json", "matrix/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
