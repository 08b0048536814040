"""Shared fixtures live in tests/fixtures/, one module per kind of real resource.

Every test that starts Ray or the SeaweedFS server is marked ``slow`` here, from the fixtures it
uses (``item.fixturenames`` is the closure: a fixture that depends on one of these counts too) and
from the ``s3`` and ``cluster`` marks; tests that start Ray without a fixture carry the mark themselves.
``pytest -m "not slow"`` is the quick loop; the full suite is the same set of tests either way.

The session runs ATen's AVX2 CPU kernels wherever the CPU has AVX2 (``ATEN_CPU_CAPABILITY``,
set before anything imports torch, inherited by Ray workers and subprocesses), unless the
variable is already set. The random weights the golden tests rebuild come from
``torch.randn`` (``pathray.encoders.random_weights``), whose vectorised kernel gives other bits
under AVX-512 (and under the plain C++ kernel: measured on an AMD EPYC, every bias and norm
tensor of ``gpfm`` moved by 1-4 ulp); the goldens in tests/data were made with AVX2 kernels,
so their ``weights_sha256`` holds on any x86-64 CPU with AVX2 (tests/reference/ says so too).
"""

import os

import pytest


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx2" in line for line in cpuinfo)
    except OSError:
        return False


if "ATEN_CPU_CAPABILITY" not in os.environ and _cpu_has_avx2():
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"

pytest_plugins = [
    "fixtures.slides",  # synthetic SVS files, the real CMU-1-Small-Region slide, bad inputs
    "fixtures.s3",  # a real SeaweedFS S3 server on 127.0.0.1, started for the session
    "fixtures.s3proxy",  # a byte-counting, optionally throttling HTTP proxy in front of it
    "fixtures.weights",  # random-initialised encoder weights in hub layout on local disk
    "fixtures.ray_cluster",  # a local Ray cluster (ray.init) shared by the pipeline tests
    "fixtures.multinode",  # real multi-node Ray clusters (ray start --head / --address), one per test
]

#: fixtures that start Ray (``ray.init``, ``ray start``) or the SeaweedFS server
SLOW_FIXTURES = frozenset({"ray_cluster", "multinode_cluster", "s3_server"})
#: marks whose tests need one of those resources
SLOW_MARKS = frozenset({"s3", "cluster"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the ``slow`` mark to every test that uses a :data:`SLOW_FIXTURES` fixture or has a :data:`SLOW_MARKS` mark."""
    for item in items:
        uses = SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        marked = SLOW_MARKS.intersection(mark.name for mark in item.iter_markers())
        if uses or marked:
            item.add_marker(pytest.mark.slow)
