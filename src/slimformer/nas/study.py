"""Optuna storage and the measuring worker: resumable, shared by processes and machines.

The default storage is Optuna's journal file (one append-only file, safe for several processes
on one machine); any database URL Optuna accepts (``sqlite:///nas.db``,
``postgresql://user:pw@host/db``) lets workers on many machines share one study. Every measured
sub-network is one COMPLETE trial, so a killed search loses at most the trial it was measuring:
on restart, trials this host left RUNNING by a process that no longer exists are marked FAIL and
the remaining budget is measured.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from slimformer.errors import ConfigError

DIRECTIONS = {"accuracy": "maximize", "latency": "minimize", "size": "minimize",
              "macs": "minimize"}


def open_storage(storage: str):
    """An Optuna storage from a journal file path or a database URL.

    Raises:
        ConfigError: The file cannot be created or the database cannot be opened.
    """
    import optuna

    if "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
            raise ConfigError([f"storage: cannot open database {storage!r}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}; give a "
                               "journal file path or a reachable database URL (sqlite:///f.db, "
                               "postgresql://user@host/db with its driver installed)"],
                              "search config") from None
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(storage)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder")
        with open(path, "a", encoding="utf-8"):
            pass
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    except OSError as exc:
        raise ConfigError([f"storage: cannot open journal file {storage!r}: {exc}; give a "
                           "writable file path or a database URL"], "search config") from None
    return optuna.storages.JournalStorage(backend)


def open_study(storage, name: str, objectives: list[str], fingerprint: str):
    """Create or load study ``name``; a study made with other settings is an error."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                directions=[DIRECTIONS[o] for o in objectives])
    have = study.user_attrs.get("fingerprint")
    if have is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("objectives", list(objectives))
    elif have != fingerprint:
        raise ConfigError([f"study: {name!r} exists in this storage with other settings "
                           f"(objectives {study.user_attrs.get('objectives')}); use another "
                           "study name or storage to start afresh"], "search config")
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale(storage, study) -> int:
    """Mark FAIL the trials this host left RUNNING from processes that are gone; how many.

    ``storage`` is the study's storage (kept for callers); the public ``Study.tell`` by trial
    number does the update.
    """
    from optuna.trial import TrialState

    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid is not None and not _alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            n += 1
    return n


def count(study, phase: str, running: bool = False) -> int:
    """COMPLETE (and, with ``running``, RUNNING) trials of one phase."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.RUNNING) if running else (TrialState.COMPLETE,)
    return sum(t.user_attrs.get("phase") == phase for t in study.get_trials(
        deepcopy=False, states=states))


def measured(study, phase: str | None = None) -> list:
    """COMPLETE trials (of one phase, or all)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if phase is None or t.user_attrs.get("phase") == phase]


def run_trial(study, trial, phase: str, evaluate: Callable, objectives: list[str], sub,
              choices: dict) -> dict:
    """Measure ``sub`` in ``trial`` (a duplicate of a measured sub-network reuses its values)."""
    from optuna.trial import TrialState

    trial.set_user_attr("phase", phase)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("sub", sub.key())
    trial.set_user_attr("choices", choices)
    done = next((t for t in measured(study) if t.user_attrs.get("sub") == sub.key()
                 and t.user_attrs.get("phase") != "reference"), None)  # other weights
    try:
        if done is not None:
            values = {k: done.user_attrs[k] for k in ("accuracy", "size", "macs", "latency",
                                                        "params", "sliced", "seconds")}
            values["latency_form"] = done.user_attrs.get("latency_form")
            values["duplicate_of"] = done.number
        else:
            m = evaluate(sub)
            values = {"accuracy": m.accuracy, "size": m.size, "macs": m.macs,
                      "latency": m.latency, "params": m.params, "sliced": m.sliced,
                      "seconds": round(m.seconds, 2), "latency_form": m.latency_form}
            if m.notes:
                values["notes"] = m.notes
        for k, v in values.items():
            trial.set_user_attr(k, v)
        study.tell(trial, [float(values[o]) for o in objectives])
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    return values


def sample_worker(storage, study, space, evaluate: Callable, objectives: list[str], target: int,
                  seed: int, progress: Callable | None = None) -> int:
    """Measure sub-networks until the study holds ``target`` of them; returns how many.

    Enqueued trials (the anchors) are measured first, then draws of
    :meth:`~slimformer.nas.space.SearchSpace.draw`. Several processes may run this on one study
    at once; each draws with its own seed.
    """
    import numpy as np
    import optuna

    rng = np.random.default_rng([seed, len(study.trials), os.getpid()])
    local = optuna.load_study(study_name=study.study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=seed))
    mine = 0
    while count(local, "sample", running=True) < target:
        trial = local.ask()
        sub = space.suggest(trial) if trial.user_attrs.get("anchor") else space.draw(rng)
        run_trial(local, trial, "sample", evaluate, objectives, sub, space.to_params(sub))
        mine += 1
        if progress:
            progress("measure sub-networks", count(local, "sample"), target)
    return mine
