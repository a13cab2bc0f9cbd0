"""Optuna storage and the measuring worker: resumable, shared by processes and machines.

The default storage is Optuna's journal file (one append-only file, safe for several processes
on one machine); any database URL Optuna accepts (``sqlite:///nas.db``,
``postgresql://user:pw@host/db``) lets workers on many machines share one study. Every measured
sub-network is one COMPLETE trial, so a killed worker loses at most the trial it was measuring.
That trial is marked FAIL and its sub-network queued again for whoever asks next: on a database,
by Optuna's heartbeat (a worker records one every ``SLIMFORMER_HEARTBEAT`` seconds, default 30;
a RUNNING trial silent for 3 times that is stale, on any machine); on a journal file (one
machine), when its process no longer exists. A worker claims each sub-network before measuring
it (RUNNING, COMPLETE and queued ones are not drawn again), so none is measured twice.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from slimformer.errors import ConfigError, StageError
from slimformer.nas.journal import redact, repair_journal, storage_errors

DIRECTIONS = {"accuracy": "maximize", "latency": "minimize", "size": "minimize",
              "macs": "minimize"}
HEARTBEAT_ENV = "SLIMFORMER_HEARTBEAT"
CLAIM_TRIES = 200  # draws tried for an unclaimed sub-network before measuring a duplicate
ORPHAN_SECONDS = 120  # a journal trial RUNNING this long without an owner (pid) was orphaned


def ask(study, **kwargs):
    """``study.ask(**kwargs)``, without Optuna's warning that heartbeats need Study.optimize().

    We record heartbeats around ask() / tell() ourselves (:func:`beating`); the filter holds
    for this call only (the process's warning filters are unchanged).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask(**kwargs)


def heartbeat_seconds() -> int:
    """Seconds between a database worker's heartbeats (``SLIMFORMER_HEARTBEAT``, default 30).

    Raises:
        ConfigError: The variable is not a whole number of seconds in 1..3600.
    """
    raw = os.environ.get(HEARTBEAT_ENV, "30")
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 3600:
        raise ConfigError([f"{HEARTBEAT_ENV}={raw[:40]!r}: give whole seconds from 1 to 3600"],
                          "environment")
    return int(raw)


def open_storage(storage: str, notes: list[str] | None = None):
    """An Optuna storage from a journal file path or a database URL.

    A journal file whose last record a stopped worker cut off is repaired first (see
    :func:`~slimformer.nas.journal.repair_journal`); what was done is appended to ``notes``.

    Raises:
        ConfigError: The file cannot be created or the database cannot be opened.
    """
    import optuna

    if "://" in storage:
        beat = heartbeat_seconds()
        try:
            with warnings.catch_warnings():  # the heartbeat arguments are "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    storage, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=beat,
                    grace_period=3 * beat,
                    heartbeat_stale_trial_callback=lambda study, t: requeue(study, t, "heartbeat"))
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
            raise ConfigError([f"storage: cannot open database {redact(storage)!r}: "
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
        lock = JournalFileOpenLock(str(path))
        note = repair_journal(path, lock)
        backend = JournalFileBackend(str(path), lock_obj=lock)
    except OSError as exc:
        raise ConfigError([f"storage: cannot open journal file {storage!r}: {exc}; give a "
                           "writable file path or a database URL"], "search config") from None
    if note and notes is not None:
        notes.append(note)
    with storage_errors(storage):
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


def _beats(storage) -> bool:
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)
    return interval() is not None


def requeue(study, t, how: str) -> None:
    """Queue again the sub-network of sample trial ``t`` that died unmeasured (``how``: why)."""
    choices = t.user_attrs.get("choices")
    if t.user_attrs.get("phase") != "sample" or not choices:
        return  # killed before it chose a sub-network: nothing to measure again
    study.enqueue_trial(choices, user_attrs={"choices": choices, "sub": t.user_attrs.get("sub"),
                                             "retry_of": t.number, "failed_by": how,
                                             "anchor": bool(t.user_attrs.get("anchor"))})


def fail_stale(storage, study) -> int:
    """Mark FAIL the trials of dead workers and queue their sub-networks again; how many.

    A database storage uses Optuna's heartbeat (stale trials of any machine); a journal file the
    process ids of this host.
    """
    import optuna
    from optuna.trial import TrialState

    if _beats(storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # runs requeue() for each one it failed
        return len(before & {t.number for t in study.get_trials(
            deepcopy=False, states=(TrialState.FAIL,))})
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if pid is None and _age(t) > ORPHAN_SECONDS:  # killed between ask() and owning it
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            requeue(study, t, "orphan")
            n += 1
        elif t.user_attrs.get("host") == host and pid is not None and not _alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            requeue(study, t, "pid")
            n += 1
    return n


@contextlib.contextmanager
def beating(storage, study, trial):
    """Record heartbeats of ``trial`` while the block runs (database storages; else nothing)."""
    if not _beats(storage):
        yield
        return
    tid = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial.number)
    stop = threading.Event()
    storage.record_heartbeat(tid)

    def loop():
        while not stop.wait(storage.get_heartbeat_interval()):
            try:
                storage.record_heartbeat(tid)
            except Exception:  # noqa: BLE001 - retried next beat; if it lasts, the trial goes
                pass  # stale, another worker fails it and measures its sub-network again

    thread = threading.Thread(target=loop, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=storage.get_heartbeat_interval())


def _age(t) -> float:
    import datetime as dt

    start = t.datetime_start
    return 0.0 if start is None else (dt.datetime.now() - start).total_seconds()


def count(study, phase: str, running: bool = False) -> int:
    """COMPLETE (and, with ``running``, owned RUNNING) trials of one phase.

    A RUNNING trial counts only once its worker owns it (its ``pid`` is set): one killed between
    ``ask()`` and that moment holds no sub-network and would otherwise take a place in the budget.
    """
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.RUNNING) if running else (TrialState.COMPLETE,)
    return sum(t.user_attrs.get("phase") == phase and (
        t.state == TrialState.COMPLETE or t.user_attrs.get("pid") is not None)
        for t in study.get_trials(deepcopy=False, states=states))


def measured(study, phase: str | None = None) -> list:
    """COMPLETE trials (of one phase, or all)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if phase is None or t.user_attrs.get("phase") == phase]


def run_trial(study, trial, phase: str, evaluate: Callable, objectives: list[str], sub,
              choices: dict, storage=None) -> dict:
    """Measure ``sub`` in ``trial`` (a duplicate of a measured sub-network reuses its values).

    With ``storage`` (the study's), a database storage records the trial's heartbeats meanwhile.
    """
    with beating(storage, study, trial) if storage is not None else contextlib.nullcontext():
        return _run_trial(study, trial, phase, evaluate, objectives, sub, choices)


def _run_trial(study, trial, phase, evaluate, objectives, sub, choices) -> dict:
    from optuna.exceptions import UpdateFinishedTrialError
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
    except UpdateFinishedTrialError:
        # another worker found no heartbeat and failed this trial (a sample is queued again)
        if phase == "sample":
            return values
        raise StageError(f"{phase} trial {trial.number} was marked failed by another worker "
                         f"(no heartbeat for {3 * heartbeat_seconds()} s: this machine stalled);"
                         " run the search again") from None
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    return values


def _claimed(study, states, but: int) -> set[str]:
    return {t.user_attrs.get("sub") for t in study.get_trials(deepcopy=False, states=states)
            if t.number != but and t.user_attrs.get("phase") != "reference"}


def claim(study, trial, sub, draw: Callable, queued: bool):
    """Reserve a sub-network no other trial holds for ``trial``; returns it.

    ``sub`` is tried first; while a RUNNING or COMPLETE trial (or, for a fresh draw, a queued
    one) holds the same sub-network, ``draw()`` gives another. The key is written before the
    check, so of two workers that claim one sub-network at once at least one sees the other
    and draws again: none is measured twice.
    """
    from optuna.trial import TrialState

    busy = (TrialState.COMPLETE, TrialState.RUNNING)
    first = sub.key()
    for _ in range(CLAIM_TRIES):
        trial.set_user_attr("sub", sub.key())
        held = _claimed(study, busy if queued else (*busy, TrialState.WAITING), trial.number)
        if sub.key() not in held:
            break
        queued = False
        for _ in range(CLAIM_TRIES):
            sub = draw()
            if sub.key() not in held:
                break
    if sub.key() != first and (trial.user_attrs.get("anchor") or
                               trial.user_attrs.get("retry_of") is not None):
        trial.set_user_attr("anchor", False)  # its queued sub-network was measured elsewhere
        trial.set_user_attr("retry_of", None)
    return sub


def _retries(study) -> int:
    """WAITING trials that hold the sub-network of a sample trial that died unmeasured."""
    from optuna.trial import TrialState

    return sum(t.user_attrs.get("retry_of") is not None
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _waiting_on(storage, study) -> bool:
    """Whether a RUNNING sample trial of another worker may still finish or be failed."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("phase") != "sample" or pid is None:
            continue
        if _beats(storage) or (t.user_attrs.get("host") == host and _alive(int(pid))):
            return True  # a database's heartbeat fails it if it dies; here: its pid
    return False


def sample_worker(storage, study, space, evaluate: Callable, objectives: list[str], target: int,
                  seed: int, progress: Callable | None = None) -> int:
    """Measure sub-networks until the study holds ``target`` of them; returns how many.

    Queued trials (the anchors, sub-networks of dead workers) are measured first, then draws of
    :meth:`~slimformer.nas.space.SearchSpace.draw`. Several processes (on several machines with
    a database) may run this on one study at once; each draws with its own seed. While the rest
    of the budget is RUNNING elsewhere it waits, so a trial of a worker that dies is measured;
    it ends only when no sample trial of another worker is RUNNING (each has finished, or died,
    been failed and measured again), so a full budget never leaves a dead trial behind.
    """
    import numpy as np
    import optuna

    rng = np.random.default_rng([seed, len(study.trials), os.getpid()])
    local = optuna.load_study(study_name=study.study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=seed))
    poll = min(2.0, heartbeat_seconds()) if _beats(storage) else 1.0
    mine = 0
    while True:
        fail_stale(storage, local)
        retries = _retries(local)  # sub-networks of dead workers, queued again: always measured
        # budget taken (measured or RUNNING; also when full): wait while another worker's trial
        # runs, since it may die and be queued again (two live workers may both have taken the
        # last place while it ran), and end only when none does
        if not retries and count(local, "sample", running=True) >= target:
            if not _waiting_on(storage, local):
                break
            time.sleep(poll)
            continue
        trial = ask(local)
        with beating(storage, local, trial):
            try:
                for k, v in (("phase", "sample"), ("host", socket.gethostname()),
                             ("pid", os.getpid())):  # pid last: with it the trial is owned
                    trial.set_user_attr(k, v)  # counted in the budget and owned from now on
                queued = trial.user_attrs.get("choices")
                if queued:
                    sub = space.from_params(queued)
                elif trial.user_attrs.get("anchor"):  # queued by an older version
                    sub = space.suggest(trial)
                else:
                    sub = space.draw(rng)
                sub = claim(local, trial, sub, lambda: space.draw(rng), bool(queued) or
                            bool(trial.user_attrs.get("anchor")))
            except BaseException:
                local.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                raise
            _run_trial(local, trial, "sample", evaluate, objectives, sub, space.to_params(sub))
        mine += 1
        if progress:
            progress("measure sub-networks", count(local, "sample"), target)
    return mine
