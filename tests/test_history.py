"""reports/history.py: the append-only history.jsonl that regressions are judged against."""

import json

from reports.history import FIELDS, append_entries, load_history, previous_entry


def entry(date="2026-01-01T00:00:00+00:00", commit="aaa", target="x86", precision="fp32", model="micro/10/1x3x64x64",
          device="AMD EPYC (-mcpu=znver5, 2 cores)", median_ms=10.0, **extra):
    machine = {"cpu": "AMD EPYC", "mcpu": "znver5", "cores": 2, "records": "tuning/x86/m/znver5@0123456789ab"}
    return {"date": date, "commit": commit, "target": target, "precision": precision, "model": model,
            "device": device, **machine, "median_ms": median_ms, "p99_ms": None, "top1_agreement": 1.0, "top1": None,
            **extra}


def test_append_dedups_on_the_report_it_came_from(tmp_path):
    path = tmp_path / "history.jsonl"
    history = load_history(path)
    assert history == []

    first = append_entries(path, history, [entry(), entry(precision="int8")])
    again = append_entries(path, load_history(path), [entry(), entry(precision="int8")])
    later = append_entries(path, load_history(path), [entry(date="2026-01-02T00:00:00+00:00", median_ms=11.0)])

    assert len(first) == 2 and again == [] and len(later) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert set(json.loads(lines[0])) == set(FIELDS)
    # Duplicates within one call are dropped too.
    assert append_entries(path, load_history(path), [entry(commit="ccc"), entry(commit="ccc")]) == [entry(commit="ccc")]


def test_previous_entry_is_the_latest_earlier_one_of_the_same_group():
    history = [
        entry(date="2026-01-01T00:00:00+00:00", commit="a", median_ms=1.0),
        entry(date="2026-01-03T00:00:00+00:00", commit="c", median_ms=3.0),
        entry(date="2026-01-02T00:00:00+00:00", commit="b", median_ms=2.0),
        entry(date="2026-01-02T12:00:00+00:00", commit="x", device="Ampere Altra"),
        entry(date="2026-01-02T12:00:00+00:00", commit="y", precision="int8"),
        entry(date="2026-01-02T12:00:00+00:00", commit="z", model="tiny/1000/1x3x224x224"),
    ]
    current = entry(date="2026-01-03T00:00:00+00:00", commit="c", median_ms=3.0)
    assert previous_entry(history, current)["commit"] == "b"
    # Regenerating from an older report compares it with what came before it, not after.
    assert previous_entry(history, entry(date="2026-01-02T00:00:00+00:00", commit="b"))["commit"] == "a"
    assert previous_entry(history, entry(date="2026-01-01T00:00:00+00:00", commit="a")) is None
    # Naive dates are UTC; unreadable dates are never compared.
    assert previous_entry(history, entry(date="2026-01-02T06:00:00", commit="n"))["commit"] == "b"
    assert previous_entry(history, entry(date="yesterday", commit="q")) is None


def test_malformed_lines_are_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(entry()) + "\n{broken\n[1, 2]\n\n" + json.dumps(entry(commit="b")) + "\n")
    history = load_history(path)
    assert [e["commit"] for e in history] == ["aaa", "b"]
    err = capsys.readouterr().err
    assert f"warning: {path}:2: not valid JSON" in err
    assert f"warning: {path}:3: not a history entry" in err


def test_append_after_a_partial_line_starts_a_new_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(entry()) + "\n" + '{"target": "x8')  # an interrupted append
    append_entries(path, load_history(path), [entry(commit="b")])
    assert [e["commit"] for e in load_history(path)] == ["aaa", "b"]


def test_only_the_same_machine_and_records_are_compared():
    later = "2026-01-02T00:00:00+00:00"
    current = entry(date=later, commit="now")
    for other in (dict(mcpu="znver4"), dict(cores=8), dict(cpu="AMD EPYC 9654"),
                  dict(records="tuning/x86/m/znver4@ba9876543210"), dict(records="none")):
        assert previous_entry([entry(**other)], current) is None, other
    assert previous_entry([entry()], current)["commit"] == "aaa"


def test_entries_written_before_the_machine_was_recorded_are_not_compared():
    legacy = {"date": "2026-01-01T00:00:00+00:00", "commit": "old", "target": "x86", "precision": "fp32",
              "model": "micro/10/1x3x64x64", "device": "AMD EPYC", "median_ms": 5.0}
    assert previous_entry([legacy], entry(date="2026-01-02T00:00:00+00:00", device="AMD EPYC")) is None
