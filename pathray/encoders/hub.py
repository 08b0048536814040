"""Weights from the Hugging Face hub: reachability probed with a short timeout, downloads
(or the local HF cache when offline) with errors that say what to do, and the commit a
revision points to. A hub load's fingerprint is ``hf:<repo>@<commit>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from pathray.errors import WeightsUnavailableError

from .checkpoint import LoadedWeights, file_sha256, read_state_dict
from .offline import WEIGHTS_DIR_ENV
from .spec import EncoderSpec

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
#: seconds allowed to reach the hub before failing over to the local cache / a clear error
DEFAULT_HUB_TIMEOUT_S = 5.0


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("PATHRAY_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT_S))
    except ValueError:
        return DEFAULT_HUB_TIMEOUT_S


def hub_reachable(repo_id: str = "", revision: str | None = None, timeout: float | None = None) -> bool:
    """One HTTP ``HEAD`` of the repo's ``config.json`` on the HF endpoint, no retries.

    ``huggingface_hub`` retries connection errors and 5xx answers with back-off (~25 s in
    all); this probe decides up front, within ``timeout`` seconds (``PATHRAY_HUB_TIMEOUT``,
    default 5), whether to go online or straight to the local cache. Any HTTP answer other
    than 5xx/429 counts as reachable (401/403/404 are then reported by huggingface_hub).
    The probe runs in a daemon thread because DNS resolution has no timeout of its own.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    timeout = _hub_timeout() if timeout is None else timeout
    if getattr(constants, "HF_HUB_OFFLINE", False) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
    ):
        return False
    url = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}/resolve/{revision or 'main'}/config.json"
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except Exception:  # noqa: BLE001 - any transport failure means "not reachable"
            result.append(False)
            return
        result.append(not (status >= 500 or status == 429))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def load_from_hub(spec: EncoderSpec, repo: str) -> LoadedWeights:
    """Download (or find in the local HF cache) config.json + weights of ``repo[@revision]``."""
    from huggingface_hub import errors as hf_errors

    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    online = hub_reachable(repo_id, revision)
    with _hub_errors(spec.name, repo_id, spec.gated, online):
        try:
            cfg_file = _hub_get(repo_id, revision, "config.json", online)
            cfg = json.loads(Path(cfg_file).read_text())
        except hf_errors.EntryNotFoundError:
            cfg = {}
        wfile = None
        last_exc: Exception | None = None
        for name in hub_weight_filenames(spec):
            try:
                wfile = _hub_get(repo_id, revision, name, online)
                break
            except hf_errors.EntryNotFoundError as exc:
                # LocalEntryNotFoundError is an EntryNotFoundError: offline and not cached
                if isinstance(exc, hf_errors.LocalEntryNotFoundError):
                    raise
                last_exc = exc
        if wfile is None:
            raise WeightsUnavailableError(
                f"{spec.name}: hub repo {repo_id} has no {' or '.join(hub_weight_filenames(spec))} ({last_exc})"
            )
    return LoadedWeights(
        read_state_dict(wfile), cfg if isinstance(cfg, dict) else {}, f"hf-hub:{repo}", _hub_fingerprint(repo_id, wfile)
    )


def hub_weight_filenames(spec: EncoderSpec) -> tuple[str, ...]:
    """The files of a hub repo that hold the spec's weights, in order of preference: the spec's
    ``extra["hub_weights_file"]`` where the card names one (e.g. GenBio-PathFM's ``model.pth``,
    next to a ``model.safetensors`` in another layout), else ``model.safetensors``, ``pytorch_model.bin``."""
    named = spec.extra.get("hub_weights_file")
    return (named,) if named else ("model.safetensors", "pytorch_model.bin")


def download_hub_file(what: str, repo: str, filename: str, *, gated: bool) -> tuple[str, str]:
    """``(local path, fingerprint)`` of one file of hub repo ``repo[@revision]``, downloaded or
    from the local HF cache, with the same reachability probe and errors as :func:`load_from_hub`
    (:class:`WeightsUnavailableError` naming ``what``)."""
    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    online = hub_reachable(repo_id, revision)
    with _hub_errors(what, repo_id, gated, online):
        path = _hub_get(repo_id, revision, filename, online)
    return path, _hub_fingerprint(repo_id, path)


def _hub_get(repo_id: str, revision: str | None, filename: str, online: bool) -> str:
    from huggingface_hub import constants, hf_hub_download

    return hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        local_files_only=not online,
        etag_timeout=_hub_timeout(),
        endpoint=constants.ENDPOINT,
    )


def _hub_fingerprint(repo_id: str, path: str) -> str:
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", path)
    return f"hf:{repo_id}@{m.group(1)}" if m else "sha256:" + file_sha256(path)


@contextlib.contextmanager
def _hub_errors(what: str, repo_id: str, gated: bool, online: bool) -> Iterator[None]:
    """Map huggingface_hub failures to :class:`WeightsUnavailableError` with what to do about them."""
    from huggingface_hub import errors as hf_errors

    how_to = (
        f"{repo_id} is gated: request access at https://huggingface.co/{repo_id}, then `hf auth login` or set HF_TOKEN"
        if gated
        else f"check the repo id https://huggingface.co/{repo_id}"
    )
    offline_hint = (
        f"or run offline: download it where the hub is reachable (huggingface_hub.snapshot_download('{repo_id}', "
        f"local_dir=DIR/<model>)) and set {WEIGHTS_DIR_ENV}=DIR, or name the folder (local or s3://) in the job "
        "YAML's `weights: {<model>: SOURCE}` / `--weights <model>=SOURCE`"
    )
    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise WeightsUnavailableError(f"{what}: {repo_id} is gated and this account has no access: {how_to}") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise WeightsUnavailableError(
            f"{what}: {repo_id} not found or not accessible without a token ({how_to})"
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        state = "the HF hub is unreachable (no network, or HF_HUB_OFFLINE=1)" if not online else "download failed"
        raise WeightsUnavailableError(
            f"{what}: {state} and {repo_id} is not in the local HF cache; {how_to}, {offline_hint}"
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise WeightsUnavailableError(f"{what}: HF hub error for {repo_id}: {exc}; {how_to}") from exc
    except OSError as exc:
        raise WeightsUnavailableError(f"{what}: cannot fetch {repo_id}: {exc}; {offline_hint}") from exc


def hub_commit(repo_id: str, revision: str) -> str:
    """The commit ``revision`` of ``repo_id`` points to in the local HF cache, if known."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or revision
    except OSError:
        return revision
