"""runner.common.stage_app: ``flwr run`` gets a copy of the app that builds the very same FAB."""

import shutil
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from runner.common import stage_app

ROOT = Path(__file__).resolve().parents[1]


def _user_app(tmp_path: Path) -> Path:
    """The quickstart-style app with what a user's checkout has beside it: a virtualenv, caches, outputs."""
    app = tmp_path / "quickstart_app"
    shutil.copytree(ROOT / "tests" / "quickstart_app", app)
    (app / ".gitignore").write_text(".venv/\n__pycache__/\noutputs/\n*.log\n")
    for junk in [".venv/lib/python3.11/site-packages/pkg/mod.py", ".venv/pyvenv.cfg",
                 "quickstart/__pycache__/task.cpython-311.pyc", "outputs/run/results.json", "train.log"]:
        (app / junk).parent.mkdir(parents=True, exist_ok=True)
        (app / junk).write_text("x = 1\n")
    (app / "notes.md").write_text("# kept: Flower ships .md files\n")
    return app


def test_the_staged_copy_builds_the_same_fab_without_the_ignored_folders(tmp_path):
    app = _user_app(tmp_path)
    staged = stage_app(app, tmp_path / "stage")
    assert staged != app and staged.name == app.name
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "notes.md" in copied and "quickstart/task.py" in copied
    assert not any(p.startswith((".venv/", "outputs/")) or "__pycache__" in p or p.endswith(".log") for p in copied)


def test_fab_exclude_patterns_resolve_and_a_reused_folder_drops_what_the_app_dropped(tmp_path):
    """Flower checks each fab-include/-exclude pattern against the files its publish rules keep, so the copy
    holds those, not only the FAB's; staging again into the same folder starts from empty."""
    app = _user_app(tmp_path)
    exclude = 'fab-exclude = ["fedavg_original/**", ".gitignore"]\n'
    text = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace("[tool.flwr.app]\n", "[tool.flwr.app]\n" + exclude, 1))
    assert "fab-exclude" in (app / "pyproject.toml").read_text()
    staged = stage_app(app, tmp_path / "stage")
    assert staged != app and build_fab_from_disk(staged) == build_fab_from_disk(app)
    (app / "notes.md").unlink()
    again = stage_app(app, tmp_path / "stage")
    assert again == staged and not (again / "notes.md").exists()
    assert build_fab_from_disk(again) == build_fab_from_disk(app)


def test_the_reference_app_stages_to_its_fab(tmp_path):
    """The checkout itself, ``.venv`` and benchmark results beside the app: the FAB is byte-identical."""
    staged = stage_app(ROOT, tmp_path)
    assert staged != ROOT.resolve()  # a fallback would walk the .venv again
    assert build_fab_from_disk(staged) == build_fab_from_disk(ROOT)


def test_reinclusion_patterns_or_an_app_flower_rejects_are_run_from_the_original_folder(tmp_path):
    app = _user_app(tmp_path)
    (app / ".gitignore").write_text(".venv/\n!.venv/pyvenv.cfg\n")
    assert stage_app(app, tmp_path / "a") == app.resolve()
    (app / ".gitignore").write_text(".venv/\n")
    (app / "pyproject.toml").write_text("[project]\nname = 'not a flower app'\n")
    assert stage_app(app, tmp_path / "b") == app.resolve()
    (app / ".gitignore").write_text("\n")
    assert stage_app(app, app.parent) == app.resolve() and (app / "pyproject.toml").is_file()  # into: the app
    assert stage_app(app, app / "work") == app.resolve()  # a copy inside the app would be walked next time
