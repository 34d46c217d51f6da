"""The one thing pyproject.toml cannot say: sign_optim's native operators, a torch C++ extension.

``sign_optim/csrc/fused_sign.cpp`` registers ``sign_optim::fused_sign_`` (AddSign/PowerSign's one-pass CPU step,
which checks every tensor natively, as torch's fused optimizers do) with ``torch.library``. It compiles against
the torch it is built beside, so torch must be importable at build time: ``make install`` builds with
``--no-build-isolation``; ``pip install --no-build-isolation .`` does the same by hand. The build is optional:
without torch at build time or a working C++ compiler the package installs anyway and ``import sign_optim`` warns
once that CPU steps take the slower foreach path.
"""

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # an isolated build environment without torch: no native operators
    print("sign_optim: torch is not importable at build time, so the fused CPU kernel is not built "
          "(build with pip install --no-build-isolation . beside torch)")
    ext_modules, cmdclass = [], {}
else:
    ext_modules = [CppExtension(
        "sign_optim._C", ["sign_optim/csrc/fused_sign.cpp"], optional=True,
        # -fno-math-errno: std::fabs/sqrt need no errno, so the loops vectorize; no -ffast-math (the order of the
        # additions is the single-tensor path's). -fopenmp, compiled and linked: torch's at::parallel_for is
        # header-inline OpenMP, serial in a translation unit built without it (the operator would ignore
        # torch.set_num_threads); linked, the library uses the libgomp.so.1 torch has already loaded.
        extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp"], extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
