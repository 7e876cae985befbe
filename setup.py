"""Package layout: `mscp/` is the one importable package (the kernels are `mscp/kernels/`).

The C++/CUDA extension in `csrc/` is compiled on first use with torch's extension tooling
(`torch.utils.cpp_extension.load`, ninja), so installing never needs torch inside an isolated
build environment and pip never fetches a second torch.
"""
from setuptools import setup

setup(
    packages=["mscp", "mscp.core", "mscp.core.data", "mscp.executors", "mscp.continual", "mscp.harness", "mscp.cli",
              "mscp.kernels", "mscp.kernels.csrc"],
    # csrc/ ships inside the package (as mscp/kernels/csrc/) so an installed wheel can build it
    package_dir={"mscp": "mscp", "mscp.kernels.csrc": "csrc"},
    package_data={"mscp": ["py.typed"], "mscp.core.data": ["*.txt"], "mscp.kernels.csrc": ["*.cpp", "*.cu", "*.h"]},
    include_package_data=True,
)
