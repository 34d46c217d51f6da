"""The one thing pyproject.toml cannot say: sign_optim's optional C kernel, built portably.

The kernel is plain C (no torch headers) called through ctypes: AddSign/PowerSign's one-pass CPU step.
Flags are chosen per compiler: GCC/Clang get -O3 and, where the compiler links it, OpenMP; MSVC gets /O2
/openmp. The build is optional: without a working C compiler the package installs anyway and
``import sign_optim`` warns once that CPU steps take the slower foreach path.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiles_with(compiler, flags) -> bool:
    """Whether ``compiler`` compiles and links a tiny OpenMP program with ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_check.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objects, "omp_check", output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:  # any compiler or linker failure: no OpenMP
            return False


class PortableBuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            args, link = ["/O2", "/openmp"], []
        else:
            args, link = ["-O3", "-fno-math-errno", "-std=gnu11"], []
            if _compiles_with(self.compiler, ["-fopenmp"]):
                args.append("-fopenmp")
                link.append("-fopenmp")
            else:  # e.g. Apple clang: the kernel runs single-threaded (the pragmas are ignored)
                print("sign_optim: the C compiler has no OpenMP; the fused CPU kernel is built single-threaded")
        for ext in self.extensions:
            ext.extra_compile_args = args
            ext.extra_link_args = link
        super().build_extensions()


setup(
    ext_modules=[Extension("sign_optim._fused_kernel", ["sign_optim/_fused_kernel.c"], optional=True)],
    cmdclass={"build_ext": PortableBuildExt},
)
