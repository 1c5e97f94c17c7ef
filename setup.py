"""Maps the top-level folders `pallas_kernels/`, `sharding/` and `server/` to `jengine.*` subpackages.

The design card keeps those folders at the repository's top level; installing must not drop generic
modules such as `server` into site-packages, so each installs under the `jengine` namespace.
"""
from setuptools import find_packages, setup

MAPPED = {"pallas_kernels": "jengine.pallas_kernels", "sharding": "jengine.sharding", "server": "jengine.server"}

packages = find_packages(include=["jengine", "jengine.*"])
package_dir = {"jengine": "jengine"}
for folder, name in MAPPED.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir, package_data={"jengine.server": ["*.proto"], "jengine.pallas_kernels": ["*.cc"]})
