"""One driver per store: the run lease on local disk and on a real S3 server, and two real
drivers started together on one store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from pathray.errors import StoreBusyError, describe
from pathray.lease import LeaseRecord, StoreLease
from pathray.store import FeatureStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return FeatureStore(str(tmp_path / "store"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return FeatureStore(f"s3://{bucket}/store", server.storage_options)


def test_second_driver_is_refused_naming_the_holder(store):
    with StoreLease(store, "run-a", settle_s=0.1) as first:
        with pytest.raises(StoreBusyError, match=r"run run-a \(pid \d+ on .*last heartbeat") as exc:
            StoreLease(store, "run-b", settle_s=0.1).acquire()
        assert describe(exc.value)[0] == "store_busy"
        assert store.fs.exists(store.lease_path())
        assert first.took_over is None
    assert not store.fs.exists(store.lease_path())  # released
    StoreLease(store, "run-c", settle_s=0.1).acquire().release()  # free again


def test_a_dead_holders_lease_is_taken_over_after_the_timeout(store):
    dead = StoreLease(store, "run-dead", settle_s=0.1)
    dead.acquire()
    dead._stop.set()  # the holder stops heart-beating, as a SIGKILLed driver would
    with pytest.raises(StoreBusyError):
        StoreLease(store, "run-b", timeout_s=60, settle_s=0.1).acquire()
    time.sleep(1.2)
    taker = StoreLease(store, "run-b", timeout_s=1.0, settle_s=0.1).acquire()
    assert taker.took_over is not None and taker.took_over.run_id == "run-dead"
    dead.release()  # the old holder no longer owns it: its release must not delete the new lease
    assert store.fs.exists(store.lease_path())
    taker.release()


def test_a_dead_local_holder_is_taken_over_at_once(store):
    """A driver on this host that was SIGKILLed: its pid is gone, so the re-run need not wait
    for the heartbeat timeout (the killed-driver re-run test relies on it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = StoreLease(store, "run-killed", settle_s=0.1)
    dead._write(LeaseRecord("t", "run-killed", socket.gethostname(), child.pid, time.time(), time.time()))
    taker = StoreLease(store, "rerun", settle_s=0.1).acquire()
    assert taker.took_over.run_id == "run-killed"
    taker.release()
    alive = StoreLease(store, "run-alive", settle_s=0.1).acquire()  # this process: alive, fresh heartbeat
    with pytest.raises(StoreBusyError):
        StoreLease(store, "other", settle_s=0.1).acquire()
    alive.release()


def test_heartbeat_keeps_a_long_run_alive(store):
    with StoreLease(store, "long", heartbeat_s=0.2, settle_s=0.1) as lease:
        first = lease.read().heartbeat_at
        time.sleep(1.0)
        assert lease.read().heartbeat_at > first
        with pytest.raises(StoreBusyError):
            StoreLease(store, "other", timeout_s=0.6, settle_s=0.1).acquire()


def test_writers_racing_for_a_free_lease_leave_exactly_one_holder(store):
    """Several drivers that all saw the lease free write within one settle window: each reads
    back the last token, so exactly one goes on."""
    import threading

    results: dict[str, object] = {}

    def contend(name: str) -> None:
        try:
            results[name] = StoreLease(store, name, settle_s=1.0).acquire()
        except StoreBusyError as exc:
            results[name] = exc

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v in results.values() if isinstance(v, StoreLease)]
    assert len(winners) == 1
    winners[0].release()


@pytest.mark.slow
def test_two_real_drivers_on_one_store(ray_cluster, synthetic_svs_05, random_weights, tmp_path):
    """Two `pathray embed` processes started together on one manifest and --out: one runs the
    job, the other exits 2 naming the holder; the store is complete and nothing is recorded
    as an error."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\na,{synthetic_svs_05}\nb,{synthetic_svs_05}\n")
    weights = random_weights("kaiko-vits16", depth=2)
    cmd = [sys.executable, "-m", "pathray.cli", "embed", "--manifest", str(manifest), "--models", "kaiko-vits16",
           "--weights", f"kaiko-vits16={weights}", "--out", str(tmp_path / "store"), "--no-progress",
           "--ray-address", ray_cluster]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "is being written by run" in loser[1]
    store = FeatureStore(str(tmp_path / "store"))
    assert store.committed("kaiko-vits16") == {"a", "b"}
    assert len(store.errors()) == 0
