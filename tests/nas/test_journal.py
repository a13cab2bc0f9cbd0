"""A journal cut by a killed worker is repaired on opening; storage failures name their source."""

import optuna
import pytest
from optuna.trial import TrialState

from slimformer.errors import StageError
from slimformer.nas.journal import storage_errors
from slimformer.nas.study import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study_with(path, n: int):
    study = optuna.create_study(storage=open_storage(str(path)), study_name="s",
                                directions=["maximize", "minimize"])
    for i in range(n):
        t = study.ask(fixed_distributions={})
        t.set_user_attr("sub", f"sub{i}")
        study.tell(t, [float(i), float(-i)])
    return study


def _complete(path, notes=None) -> list:
    study = optuna.create_study(storage=open_storage(str(path), notes), study_name="s",
                                load_if_exists=True, directions=["maximize", "minimize"])
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def test_cut_last_record_is_dropped_and_the_study_resumes(tmp_path):
    path = tmp_path / "s.journal"
    _study_with(path, 12)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":5,"worker_id":"x","trial_id":3,"par')  # killed mid-write
    notes = []
    study = optuna.load_study(study_name="s", storage=open_storage(str(path), notes))
    assert notes and "dropped 1 record" in notes[0] and "s.journal.bak" in notes[0]
    assert path.with_name("s.journal.bak").read_bytes().endswith(b'"par')
    assert path.read_bytes() == whole
    t = study.ask(fixed_distributions={})  # appends after the repair: nothing glued on
    study.tell(t, [1.0, 1.0])
    again = []
    assert len(_complete(path, again)) == 13 and again == []  # readable; nothing more to repair


def test_journal_damaged_by_an_older_version_is_salvaged(tmp_path):
    # what the regression left: the next record appended onto the cut line
    path = tmp_path / "s.journal"
    _study_with(path, 12)
    lines = path.read_bytes().split(b"\n")
    lines[-5] = b'{"op_code":5,"worker_id":"x","trial_id":3,"par' + lines[-5]  # cut + next
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError):  # Optuna alone cannot read it
        optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(path))))
    notes = []
    trials = _complete(path, notes)
    assert len(trials) == 12 and {t.user_attrs["sub"] for t in trials} == {
        f"sub{i}" for i in range(12)}
    assert "1 complete record(s) appended onto them kept" in notes[0]


def test_storage_failures_name_the_file_or_the_server(tmp_path):
    path = tmp_path / "s.journal"
    study = _study_with(path, 2)
    with open(path, "ab") as f:  # damaged while open (not by a cut write)
        f.write(b"not json\n" + b'{"op_code":0}\n')
    with pytest.raises(StageError, match=r"journal file .*s\.journal.*JSONDecodeError"), \
            storage_errors(str(path)):
        study.get_trials()
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    db.write_bytes(b"this is no database " * 400)  # the server's data is gone
    secret = url.replace("sqlite:///", "sqlite://user:hunter2@/")
    with pytest.raises(StageError, match=r"database 'sqlite://user:\*\*\*@/.*failed") as e, \
            storage_errors(secret):
        study.ask()
    assert "hunter2" not in str(e.value)
    with pytest.raises(ZeroDivisionError), storage_errors(url):  # not a storage failure
        _ = 1 / 0
