"""Shared fixtures live in tests/fixtures/, one module per kind of real resource."""

pytest_plugins = [
    "fixtures.slides",  # synthetic SVS files, the real CMU-1-Small-Region slide, bad inputs
    "fixtures.s3",  # a real SeaweedFS S3 server on 127.0.0.1, started for the session
    "fixtures.s3proxy",  # a byte-counting, optionally throttling HTTP proxy in front of it
    "fixtures.weights",  # random-initialised encoder weights in hub layout on local disk
    "fixtures.ray_cluster",  # a local Ray cluster (ray.init) shared by the pipeline tests
    "fixtures.multinode",  # real multi-node Ray clusters (ray start --head / --address), one per test
]
