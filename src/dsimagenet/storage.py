"""Optuna storages that sweeps and searches share across machines: an RDB URL (sqlite, postgresql, mysql) or
``journal:PATH`` for a journal file on a shared disk.

    check_storage_url("journal:/shared/study.log")     # ConfigError unless it reads as a storage
    storage = open_storage("sqlite:///runs/study.db")  # DSImageNetError naming the URL if it cannot be opened
"""

from __future__ import annotations

import warnings

from dsimagenet.errors import ConfigError, DSImageNetError


def check_storage_url(url) -> None:
    """ConfigError unless ``url`` reads as an Optuna storage: ``journal:PATH`` or an RDB URL whose database kind
    SQLAlchemy knows (no connection is made)."""
    usage = "an RDB URL (sqlite:///PATH, postgresql://HOST/DB, mysql://...) or journal:PATH"
    if not isinstance(url, str) or not url:
        raise ConfigError(f"--storage must be {usage}, not {url!r}")
    if url.startswith("journal:"):
        if not url[len("journal:"):]:
            raise ConfigError(f"--storage {url}: no journal file after journal:")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url).get_dialect()
    except ArgumentError as e:
        raise ConfigError(f"--storage {url}: not {usage} ({e})") from None


def open_storage(url: str):
    """An Optuna storage from a URL: any RDB URL, or ``journal:PATH`` for a journal file on a shared disk.
    A URL that does not parse, a database that cannot be opened or reached: DSImageNetError naming the URL."""
    import optuna

    check_storage_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    from sqlalchemy.exc import SQLAlchemyError

    # a trial whose worker was killed stops beating and is run again (Optuna calls heartbeats experimental)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)} \
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback") else \
            {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)}
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90, **retry)
        except (SQLAlchemyError, ImportError, RuntimeError) as e:  # RuntimeError: a schema of another Optuna
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise DSImageNetError(f"--storage {url}: cannot open it: {first}") from None
