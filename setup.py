"""Builds vllm-kvcompress and its torch extension ``vllm_kvcompress._C`` with CMake.

The extension links against the torch that vLLM pins, so build without isolation:
``pip install --no-build-isolation -e .``. Set ``CUDA_HOME`` to the CUDA toolkit
(and optionally ``TORCH_CUDA_ARCH_LIST``); without one only the CPU kernels build.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the extension's output folder."""

    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        configure = [
            "cmake",
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        if os.environ.get("KVCOMPRESS_CUDA"):
            configure.append(f"-DKVCOMPRESS_CUDA={os.environ['KVCOMPRESS_CUDA']}")
        if _has_ninja():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure, cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)


def _has_ninja() -> bool:
    try:
        subprocess.check_call(["ninja", "--version"], stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


setup(
    ext_modules=[CMakeExtension("vllm_kvcompress._C")],
    cmdclass={"build_ext": CMakeBuild},
)
