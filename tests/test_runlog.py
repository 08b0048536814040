"""Where a command-line run's output goes (pathray.monitor.runlog): the person's terminal gets the
progress stream only; Python loggers (pathray's, Ray's) and native writes to fd 2 land in
the run's log, which an s3:// store gets uploaded at the end."""

from __future__ import annotations

import logging
import os

import pytest

from pathray.monitor.runlog import run_terminal


def test_everything_but_the_progress_goes_to_the_run_log(tmp_path, capfd):
    with run_terminal(str(tmp_path / "store"), "r1") as terminal:
        logging.getLogger("pathray").info("pathray line")
        logging.getLogger("ray.data").warning("ray's warning")
        os.write(2, b"[E core_worker.cc] native line\n")  # what Ray's C++ core worker does
        terminal.stream.write("progress line\n")
    shown = capfd.readouterr()
    assert shown.err == "progress line\n" and shown.out == ""
    log = (tmp_path / "store" / "_runs" / "r1" / "run.log").read_text()
    assert "pathray line" in log and "ray's warning" in log and "native line" in log
    assert "progress line" not in log
    logging.getLogger("pathray").info("after the run")  # logging and fd 2 are given back
    assert "after the run" not in (tmp_path / "store" / "_runs" / "r1" / "run.log").read_text()


def test_verbose_keeps_the_terminal_and_writes_the_log_too(tmp_path, capfd):
    with run_terminal(str(tmp_path / "store"), "r2", verbose=True):
        logging.getLogger("pathray").info("pathray line")
    assert "pathray line" in capfd.readouterr().err
    assert "pathray line" in (tmp_path / "store" / "_runs" / "r2" / "run.log").read_text()


def test_a_new_store_version_gets_its_log_moved(tmp_path):
    with run_terminal(str(tmp_path / "store"), "r3") as terminal:
        logging.getLogger("pathray").info("versioned")
    where = terminal.finish(str(tmp_path / "store" / "versions" / "abc"), "r3")
    assert where == str(tmp_path / "store" / "versions" / "abc" / "_runs" / "r3" / "run.log")
    assert "versioned" in open(where).read() and not (tmp_path / "store" / "_runs" / "r3" / "run.log").exists()


@pytest.mark.slow
def test_an_s3_store_gets_its_log_at_the_end(s3_server, s3_bucket):
    root = f"s3://{s3_bucket}/store"
    with run_terminal(root, "r4") as terminal:
        logging.getLogger("pathray").info("to s3")
        assert not terminal.log_path.startswith("s3:") and os.path.exists(terminal.log_path)
    where = terminal.finish(root, "r4", s3_server.storage_options)
    assert where == f"{root}/_runs/r4/run.log"
    assert b"to s3" in s3_server.fs.cat_file(f"{s3_bucket}/store/_runs/r4/run.log")


def test_a_logger_that_already_answered_for_info_still_reaches_the_log(tmp_path):
    """Loggers cache ``isEnabledFor`` per level: a pathray logger asked once while the root was at
    WARNING (any earlier use in the process) must still write INFO lines to the run's log."""
    logging.getLogger().setLevel(logging.WARNING)
    logger = logging.getLogger("pathray.cached")
    logger.info("before the run")  # caches "INFO disabled" on this logger
    with run_terminal(str(tmp_path / "store"), "r5"):
        logger.info("during the run")
    assert "during the run" in (tmp_path / "store" / "_runs" / "r5" / "run.log").read_text()
