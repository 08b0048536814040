"""One driver per store: the run lease on local disk and on a real S3 server, and two real
drivers started together on one store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from pathray.errors import LeaseLostError, StoreBusyError, describe
from pathray.store import FeatureStore
from pathray.store.lease import LeaseRecord, StoreLease


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])  # s3: starts SeaweedFS (slow)
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
    cmd = [
        sys.executable,
        "-m",
        "pathray.cli",
        "embed",
        "--manifest",
        str(manifest),
        "--models",
        "kaiko-vits16",
        "--weights",
        f"kaiko-vits16={weights}",
        "--out",
        str(tmp_path / "store"),
        "--no-progress",
        "--ray-address",
        ray_cluster,
    ]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "is being written by run" in loser[1]
    store = FeatureStore(str(tmp_path / "store"))
    assert store.committed("kaiko-vits16") == {"a", "b"}
    assert len(store.errors()) == 0


# --- outages, takeovers and conditional writes (real S3 behind the throttling proxy) ---------------
def _proxied_store(s3_server, s3_proxy, bucket: str) -> FeatureStore:
    """The store seen through the proxy, with a client that does not retry (each 503 reaches pathray)."""
    options = s3_proxy.storage_options(s3_server.storage_options)
    options["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"}}
    return FeatureStore(f"s3://{bucket}/store", options)


@pytest.mark.slow
def test_the_heartbeat_survives_injected_503s(s3_server, s3_bucket, s3_proxy):
    store = _proxied_store(s3_server, s3_proxy, s3_bucket)
    direct = FeatureStore(f"s3://{s3_bucket}/store", s3_server.storage_options)
    with StoreLease(store, "run-a", timeout_s=30.0, heartbeat_s=0.2) as lease:
        s3_proxy.fail_paths = "_lease.json"  # every lease request answered 503 SlowDown for a while
        time.sleep(1.0)
        s3_proxy.fail_paths = ""
        outage_over = time.time()
        assert s3_proxy.throttled > 0
        deadline = time.time() + 10
        while time.time() < deadline and lease.read().heartbeat_at <= outage_over:
            time.sleep(0.1)
        assert lease._thread.is_alive()
        assert lease.read().heartbeat_at > outage_over  # heart-beating again
        assert lease.lost is None
        lease.ensure_held()
        with pytest.raises(StoreBusyError):
            StoreLease(direct, "run-b", timeout_s=30.0).acquire()


@pytest.mark.slow
def test_a_lease_taken_over_during_an_outage_is_lost_and_left_alone(s3_server, s3_bucket, s3_proxy):
    store = _proxied_store(s3_server, s3_proxy, s3_bucket)
    direct = FeatureStore(f"s3://{s3_bucket}/store", s3_server.storage_options)
    first = StoreLease(store, "run-a", timeout_s=1.5, heartbeat_s=0.2).acquire()
    s3_proxy.fail_paths = "_lease.json"
    time.sleep(1.6)  # no renewal lands for longer than the timeout: another driver may take over
    second = StoreLease(direct, "run-b", timeout_s=1.5, heartbeat_s=0.2).acquire()
    assert second.took_over.run_id == "run-a"
    s3_proxy.fail_paths = ""
    time.sleep(0.6)
    with pytest.raises(LeaseLostError, match="run run-a lost the lease"):
        first.ensure_held()
    assert describe(LeaseLostError("x"))[0] == "lease_lost"
    first.release()  # must neither renew nor delete the new holder's lease
    assert second.read().token == second.token and second.lost is None
    second.ensure_held()
    second.release()
    assert second.read() is None


def test_conditional_create_lets_exactly_one_of_two_writers_in(store):
    """Both writers saw the lease absent; the store's conditional create (O_EXCL, If-None-Match)
    refuses the second, however late the first write landed."""
    from pathray.store.leaseio import lease_io

    io = lease_io(store.fs, store.lease_path(), settle_s=0.1)
    assert type(io).__name__ in ("LocalLeaseIO", "S3LeaseIO")  # SeaweedFS enforces If-None-Match
    assert io.read() == (None, None)
    version = io.create(b"first")
    assert version is not None and io.create(b"second") is None
    assert io.replace(b"stale writer", "not-the-version") is None
    assert io.read() == (b"first", version)
    io.delete(version)
    assert io.read() == (None, None)


@pytest.mark.slow
def test_a_driver_whose_lease_was_taken_over_commits_nothing(
    s3_server, s3_bucket, s3_proxy, synthetic_svs_05, monkeypatch, tmp_path
):
    """A real run (in-process runner) whose lease heartbeats meet 503s while its encoder works;
    a second driver takes the store over; the first then stops before its first commit, and a
    later run commits every slide once."""
    import threading

    import pathray.store.lease
    from pathray.encoders.custom import CustomEncoder
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.testing import SleepEncoder, sleep_encoder

    monkeypatch.setattr(pathray.store.lease, "TIMEOUT_S", 3.0)
    monkeypatch.setattr(pathray.store.lease, "HEARTBEAT_S", 0.3)
    uris = []
    for name in ("a", "b"):
        uris.append(f"s3://{s3_bucket}/slides/{name}.svs")
        s3_server.fs.put_file(os.fspath(synthetic_svs_05), uris[-1])
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"{n},{u}\n" for n, u in zip("ab", uris)))
    proxied = _proxied_store(s3_server, s3_proxy, s3_bucket)
    direct = FeatureStore(f"s3://{s3_bucket}/store", s3_server.storage_options)
    outage, taken, taker = threading.Event(), threading.Event(), {}

    class StallingEncoder(SleepEncoder):
        def __call__(self, tiles):
            if not outage.is_set():  # first call: the lease's storage fails until another driver took over
                s3_proxy.fail_paths = "_lease.json"
                outage.set()
                assert taken.wait(30)
                s3_proxy.fail_paths = ""
            return super().__call__(tiles)

    def take_over():
        outage.wait(60)
        deadline = time.time() + 20
        while time.time() < deadline and "lease" not in taker:
            try:
                taker["lease"] = StoreLease(direct, "driver-b", timeout_s=3.0, heartbeat_s=0.3).acquire()
            except StoreBusyError:
                time.sleep(0.2)
        taken.set()

    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    config = {
        "manifest": str(manifest),
        "models": ["sleep"],
        "tiling": {"tile_px": 224, "target_mpp": 0.5},
        "runner": "local",
        "slide_storage_options": s3_server.storage_options,
    }
    stalling = CustomEncoder(factory=lambda: StallingEncoder(1e4, 6), record=sleep_encoder(1e4, 6).record)
    with pytest.raises(LeaseLostError, match="lost the lease"):
        run_job(
            build_job_config(
                {**config, "out": proxied.root, "storage_options": proxied.storage_options, "run_id": "driver-a"}
            ),
            {"sleep": stalling},
            progress_bars=False,
        )
    thread.join()
    assert taker["lease"].took_over.run_id == "driver-a"
    assert direct.committed("sleep") == set()  # driver A committed nothing once its lease was gone
    taker["lease"].release()
    report = run_job(
        build_job_config(
            {**config, "out": direct.root, "storage_options": s3_server.storage_options, "run_id": "driver-c"}
        ),
        {"sleep": sleep_encoder(1e4, 6)},
        progress_bars=False,
    )
    assert report.per_model["sleep"]["ok"] == 2 and direct.committed("sleep") == {"a", "b"}
    assert {direct.commit_record("sleep", s).run_id for s in "ab"} == {"driver-c"}


def test_aggregate_takes_the_same_lease(tmp_path):
    """`pathray aggregate` writes the store too: refused while `pathray embed` (or another
    aggregate) holds it, before any work starts."""
    from fixtures.feature_stores import write_planted_store

    from pathray.slide_level.job import AggregateConfig, run_aggregate

    planted = write_planted_store(tmp_path / "store", n_patients=2, slides_per_patient=1)
    store = FeatureStore(str(planted.root))
    with StoreLease(store, "embed-run", settle_s=0.1):
        with pytest.raises(StoreBusyError, match="run embed-run"):
            run_aggregate(AggregateConfig(str(planted.root), planted.model, "mean"))
        assert store.aggregated(planted.model, "mean") == set()


@pytest.mark.slow
def test_the_settle_fallback_lets_one_racer_in_and_withdraws_a_slow_write(s3_server, s3_bucket, s3_proxy):
    """For a server that ignores conditional writes: write, settle, read back. Racers leave one
    holder; a write slower than half the settle window (botocore back-off, a slow link) may
    land after a rival's read-back, so it is withdrawn and the acquisition refused."""
    import threading

    from pathray.store.leaseio import SettledLeaseIO

    def settled(lease: StoreLease) -> StoreLease:
        lease._io = SettledLeaseIO(lease.store.fs, lease.store.lease_path(), lease.settle_s)
        return lease

    direct = FeatureStore(f"s3://{s3_bucket}/store", s3_server.storage_options)
    results: dict[str, object] = {}

    def contend(name: str) -> None:
        try:
            results[name] = settled(StoreLease(direct, name, settle_s=4.0)).acquire()  # SeaweedFS: ~1 s per racing PUT
        except StoreBusyError as exc:
            results[name] = exc

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v in results.values() if isinstance(v, StoreLease)]
    assert len(winners) == 1
    winners[0].release()
    assert winners[0].read() is None

    s3_proxy.latency_s = 0.4  # every request through the proxy takes 0.4 s: longer than half of 0.5 s
    slow = FeatureStore(f"s3://{s3_bucket}/store", s3_proxy.storage_options(s3_server.storage_options))
    with pytest.raises(StoreBusyError):
        settled(StoreLease(slow, "slow-writer", settle_s=0.5)).acquire()
    assert StoreLease(direct, "reader").read() is None  # the slow write was withdrawn
