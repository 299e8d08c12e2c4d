"""Issue item 1: `haet report` on a shared folder never writes through a symlink, and no string from
a record reaches a line start of report.md or a formula cell of results.csv."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from .conftest import run, write_record


def test_pth_injection_through_a_dangling_report_link_never_runs(tmp_path, sentinel, capsys):
    """The demonstrated attack: report.md is a dangling link into site-packages/x.pth and a record's
    task carries a line of Python; the next interpreter start would have run it."""
    shared = tmp_path / "shared"
    pth = sentinel.root / "site-packages" / "x.pth"
    payload = f"digits\nimport os; open({str(sentinel.marker)!r}, 'w').write('ran')\n#"
    write_record(shared / "runs" / "a", task=payload)
    os.symlink(pth, shared / "report.md")
    code, _, err = run(["report", shared], capsys)
    # Start an interpreter on that site dir: a .pth line starting with `import` would run now.
    subprocess.run([sys.executable, "-c", f"import site; site.addsitedir({str(pth.parent)!r})"], check=True)
    assert not sentinel.marker.exists() and not pth.exists() and sentinel.unchanged()
    assert code == 2 and err.count("\n") == 1 and "haet: error:" in err


@pytest.mark.parametrize("name", ["report.md", "results.csv", "pareto.png"])
@pytest.mark.parametrize("dangling", [False, True])
def test_report_never_writes_through_a_symlinked_output(name, dangling, tmp_path, sentinel, capsys):
    shared = tmp_path / "shared"
    write_record(shared / "runs" / "a")
    target = sentinel.root / "new.txt" if dangling else sentinel.victim(0)
    os.symlink(target, shared / name)
    code, _, err = run(["report", shared], capsys)
    assert code == 2 and "symbolic link" in err and name in err and err.count("\n") == 1
    assert sentinel.unchanged() and not (sentinel.root / "new.txt").exists()


def test_report_never_writes_into_a_symlinked_out_folder_file(tmp_path, sentinel, capsys):
    """--out names a folder whose results.csv links to a victim file: refused, victim intact."""
    write_record(tmp_path / "shared")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(sentinel.victim(1), out / "results.csv")
    assert run(["report", tmp_path / "shared", "--out", out], capsys)[0] == 2
    assert sentinel.unchanged()


@pytest.mark.parametrize("field,value", [
    ("task", "digits\nimport os"), ("model", "mlp\r\n# x"), ("label", "a\u2028b"), ("stopped_by", "<script>"),
])
def test_record_names_outside_the_plain_character_set_are_refused(field, value, tmp_path, capsys):
    write_record(tmp_path / "r", **{field: value})
    code, _, err = run(["report", tmp_path / "r"], capsys)
    assert code == 2 and "record.json is not a valid record" in err and field.replace("_", "") in err.replace("_", "")
    assert err.count("\n") == 1 and not (tmp_path / "r" / "report.md").exists()


def test_csv_cells_from_records_cannot_be_formulas(tmp_path, capsys):
    for i, label in enumerate(["=HYPERLINK(1)", "+1+2", "-2+3", "@SUM(1)"]):
        write_record(tmp_path / "r" / str(i), label=label)
    assert run(["report", tmp_path / "r"], capsys)[0] == 0
    with open(tmp_path / "r" / "results.csv", newline="") as f:
        methods = [row["method"] for row in csv.DictReader(f)]
    assert sorted(methods) == sorted(["'=HYPERLINK(1)", "'+1+2", "'-2+3", "'@SUM(1)"])


def test_markdown_and_csv_writers_escape_every_string(tmp_path):
    """The writers escape on their own (a record built in code is not validated): no newline from
    a string survives, markup is escaped."""
    from haet.report import rows, summarize, write_csv, write_markdown
    from haet.core.record import RunRecord

    evil = "digits\nimport os; os.system('x')\n#"
    rec = RunRecord(task=evil, model="m\r\n| x |", label="[click](javascript:x)", stopped_by="epochs",
                    metrics={"accuracy": 0.5}, cost={"train_s": 1.0, "energy_source": "model\n=1"})
    table = rows([(tmp_path / "record.json", rec)])
    md = write_markdown(table, summarize(table), tmp_path / "report.md", None).read_text()
    assert not any(line.startswith(("import", "#  ", "=", "| x")) for line in md.splitlines()[1:])
    assert "\\[click\\](javascript:x)" in md and "os.system" in md.splitlines()[0]
    text = write_csv(table, tmp_path / "results.csv").read_text()
    assert len(text.splitlines()) == 2 and not any(line.startswith("import") for line in text.splitlines())
