"""The commit path: a small pool of committer actors running :func:`pathray.store.finalize_slide`.

Every embedding byte passes through a commit twice (read the staged chunks, write the
merged features file), so one actor caps the whole cluster's output at what one process
moves. The pool is sized from the cluster (:func:`committer_count`; ``resources.committers``
pins it), its actors are spread over the nodes, and each (slide, model) goes to one
committer chosen by a stable hash of its key (:func:`route`), so a pair is never merged by
two actors at once, and with the same pool size it lands on the same actor in every run.

The store's protocol is unchanged: deterministic names, commit record written last, staged
chunks deleted after it. A committer lost with its node is restarted elsewhere (up to
:data:`ACTOR_RESTARTS` times) and Ray retries its in-flight commits there; a retried commit
rewrites identical bytes at the same names, so a (slide, model) is still committed exactly
once.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from pathray.store import CommitRecord, CommitRequest, FeatureStore, finalize_slide

#: One committer per this many cluster CPUs (a committer moves ~the output of 16 readers).
CPUS_PER_COMMITTER = 16
MAX_COMMITTERS = 32
ACTOR_RESTARTS = 3
#: A commit sent to a committer whose node just died is retried until the actor is back (or
#: has used its restarts): a few bounded retries ran out while Ray was still noticing the loss.
TASK_RETRIES = -1


class Committer:
    """One long-lived commit actor; its threads (``max_concurrency``) overlap the I/O of
    several commits with no worker start-up per commit."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def finalize(self, request: CommitRequest) -> CommitRecord:
        """:func:`finalize_slide`; a retry of a commit that had already written its record
        (its actor died while deleting the staged chunks) finds chunks gone and returns that
        record instead of failing."""
        try:
            return finalize_slide(self.store, request)
        except FileNotFoundError:
            record = self.store.commit_record(request.model, request.slide_id)
            if record is None:
                raise
            return record


def committer_count(pinned: int | None, cluster: dict[str, float]) -> int:
    """``pinned`` if set, else one committer per :data:`CPUS_PER_COMMITTER` cluster CPUs
    (at least 1, at most :data:`MAX_COMMITTERS`)."""
    if pinned:
        return int(pinned)
    return max(1, min(MAX_COMMITTERS, int(float(cluster.get("CPU", 0)) // CPUS_PER_COMMITTER)))


def route(slide_id: str, model: str, n: int) -> int:
    """Index of the committer for (slide_id, model) among ``n``: the same in every process
    and run (``hash()`` is salted per process, so a digest is used)."""
    digest = hashlib.blake2b(f"{slide_id}\x00{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


class CommitPool:
    """``n`` committer actors (0 CPUs each, spread over the nodes); :meth:`submit` routes a
    commit to its actor and returns the Ray object ref of its :class:`CommitRecord`."""

    def __init__(self, ray, store: FeatureStore, n: int, max_concurrency: int):
        remote = ray.remote(
            num_cpus=0,
            max_concurrency=max_concurrency,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=TASK_RETRIES,
            scheduling_strategy="SPREAD",
        )(Committer)
        self.ray = ray
        self.actors = [remote.remote(store) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, request: CommitRequest) -> Any:
        """``finalize_slide(store, request)`` on the pair's committer; the Ray object ref."""
        return self.actors[route(request.slide_id, request.model, len(self.actors))].finalize.remote(request)

    def wait_one(self, handles: list[Any]) -> Any:
        """The first of ``handles`` (refs from :meth:`submit`) to finish."""
        return self.ray.wait(handles, num_returns=1)[0][0]

    def result(self, handle: Any) -> CommitRecord:
        """The commit's record; raises what the commit raised."""
        return self.ray.get(handle)


class LocalCommitPool:
    """The in-process runner's committer: one thread running :meth:`Committer.finalize`, so a
    commit's I/O overlaps the next chunk's encoding. Same interface as :class:`CommitPool`,
    with futures for object refs."""

    def __init__(self, store: FeatureStore):
        self.committer = Committer(store)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pathray-commit")

    def __len__(self) -> int:
        return 1

    def submit(self, request: CommitRequest) -> Future:
        return self.executor.submit(self.committer.finalize, request)

    def wait_one(self, handles: list[Future]) -> Future:
        return next(iter(wait(handles, return_when=FIRST_COMPLETED).done))

    def result(self, handle: Future) -> CommitRecord:
        return handle.result()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
