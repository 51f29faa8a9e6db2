"""What a new user meets first (issue 16): every command, bad arguments and ordinary mistakes give one line and a
documented exit code, never a traceback or a silent wrong result."""

from __future__ import annotations

import pytest

from d2mtl import cli, store
from d2mtl.config import ConfigError, TrainConfig, load_experiment, updated


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``d2mtl ARGV`` run in this process."""
    try:
        code = cli.main(argv)
    finally:
        store.configure(store.StoreSettings())
    return code, capsys.readouterr().err.strip()


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


# ---- task lists ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks", ["ages", "age,ages", ","])
def test_teacher_tasks_are_validated_as_the_config_is(tasks, tiny_tables, tmp_path, capsys):
    code, err = run_cli(["teacher", "--set", "teacher.weights=none", "--faces", tiny_tables["faces"],
                         "--labels", tiny_tables["labels"], "--out", str(tmp_path / "t"), "--tasks", tasks], capsys)
    one_line_error(code, err, "d2mtl teacher: error: --tasks: ")
    assert ("unknown task(s) ages; known tasks: age, gender, race, expression" in err if "ages" in tasks
            else "empty task list" in err)
    assert not (tmp_path / "t").exists()


def test_pseudolabel_tasks_name_the_unknown_task(tiny_tables, tmp_path, capsys):
    code, err = run_cli(["pseudolabel", "--teacher", str(tmp_path / "teacher"), "--faces", tiny_tables["faces"],
                         "--labels", tiny_tables["labels"], "--out", str(tmp_path / "p"), "--tasks", "age,gendr"],
                        capsys)
    one_line_error(code, err, "unknown task(s) gendr")


def test_updated_config_sections_are_validated():
    assert updated(TrainConfig(), "--tasks", tasks=["race", "age"]).task_names == ("age", "race")
    with pytest.raises(ConfigError, match=r"^task: tasks: unknown task\(s\) ages"):
        updated(TrainConfig(), "task", tasks=["ages"])


# ---- --set and --config --------------------------------------------------------------------------------

def test_set_reaches_one_dataset_by_its_index():
    cfg = load_experiment("cpu", ["ingest.datasets.1.limit=5"])
    assert [spec.limit for spec in cfg.ingest.datasets] == [None, 5]
    with pytest.raises(ConfigError, match=r"--set ingest.datasets.7.limit: 7 is not an index of a list of 2"):
        load_experiment("cpu", ["ingest.datasets.7.limit=5"])


def test_an_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"cannot read config cpuu: .*packaged profile: cpu, gpu"):
        load_experiment("cpuu")
