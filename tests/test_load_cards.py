"""The testers' load tools keep the simulated cards' counters between runs.

A real card keeps its ATC in its own memory. The simulated ones keep it in the state file beside
the city's test secrets (:func:`simulators.cards.card_state_path`), which the locust cashiers and
the day simulator both read when they start and merge into when they stop, so that running the
load twice on one city, or ``citizencard day`` after it, never presents a counter the engine has
already accepted (which it answers ``atc_replayed``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.engine import start_engine, stop_engine
from simulators.cards import CardStateError, card_state_path, load_card_state, save_card_state

ROOT = Path(__file__).resolve().parents[1]


def test_state_merges_keeping_each_cards_highest_counter(tmp_path):
    path = card_state_path(tmp_path / "city.db.keys.json")
    assert path.name == "city.db.keys.json.sim-cards.json"
    assert load_card_state(path) == {}
    save_card_state(path, {"6200000000000001": 5, "6200000000000002": 9})
    save_card_state(path, {"6200000000000001": 7, "6200000000000002": 3, "6200000000000003": 1})
    assert load_card_state(path) == {"6200000000000001": 7, "6200000000000002": 9, "6200000000000003": 1}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


@pytest.mark.parametrize("content, reason", [
    ("", "Expecting value"), ("[1, 2]", "expected a JSON object"), ('{"6200": 70000}', "expected a JSON object"),
    ('{"6200": "7"}', "expected a JSON object")])
def test_a_damaged_state_file_is_named_in_one_line(tmp_path, content, reason):
    path = card_state_path(tmp_path / "keys.json")
    path.write_text(content)
    with pytest.raises(CardStateError) as exc:
        load_card_state(path)
    assert str(path) in str(exc.value) and reason in str(exc.value) and "\n" not in str(exc.value)


def test_an_unwritable_state_file_is_named(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(CardStateError) as exc:
        save_card_state(card_state_path(blocker / "keys.json"), {"6200000000000001": 1})
    assert "cannot write the simulated cards' counters" in str(exc.value) and str(blocker) in str(exc.value)


def test_saves_from_several_processes_all_land(tmp_path):
    """Four processes save 50 counters each, one at a time: the file has every card's last one."""
    import multiprocessing

    path = card_state_path(tmp_path / "keys.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(path, f"62000000000000{k:02d}", 50)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert load_card_state(path) == {f"62000000000000{k:02d}": 50 for k in range(4)}


def _save_many(path, pan: str, n: int) -> None:
    for atc in range(1, n + 1):
        save_card_state(path, {pan: atc})


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(CITIZENCARD_DB=f"sqlite:///{tmp_path / 'load.db'}", CITIZENCARD_KEYS=str(tmp_path / "keys.json"),
               CITIZENCARD_CATALOGUE=str(tmp_path / "catalogue.csv"), CITIZENCARD_CITY=str(tmp_path / "city.json"),
               CITIZENCARD_USERS="2")
    return env


def _locust(env: dict, host: str, tmp_path: Path, run: str) -> dict:
    """One headless locust run of the cashiers (2 users, 4 s); its per-request statistics."""
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    done = subprocess.run([locust, "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless", "-u", "2",
                           "-r", "2", "-t", "4s", "--host", host, "--csv", str(tmp_path / run), "--only-summary"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    failures = (tmp_path / f"{run}_failures.csv").read_text()
    stats = {}
    for line in (tmp_path / f"{run}_stats.csv").read_text().splitlines()[1:]:
        cells = line.split(",")
        stats[cells[1]] = (int(cells[2]), int(cells[3]))  # name -> (requests, failures)
    return {"returncode": done.returncode, "failures": failures, "stats": stats, "log": done.stderr[-2000:]}


@pytest.mark.skipif(shutil.which("locust", path=str(Path(sys.executable).parent)) is None
                    and os.environ.get("CI", "").lower() != "true",
                    reason="locust is not installed (the 'load' extra; `make test` installs it, and under "
                           "CI=true its absence fails the test)")
def test_two_load_runs_then_a_day_on_one_city_never_repeat_a_counter(tmp_path):
    env = _env(tmp_path)
    city = subprocess.run([sys.executable, "-m", "api.cli", "city", "--cards", "6", "--out", str(tmp_path / "city.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert city.returncode == 0, city.stderr[-2000:]
    server, host = start_engine(env, tmp_path / "serve.log", cwd=tmp_path, timeout_s=60)
    try:
        first = _locust(env, host, tmp_path, "first")
        saved = load_card_state(card_state_path(tmp_path / "keys.json"))
        assert first["stats"]["settle"][0] > 0 and saved, first
        second = _locust(env, host, tmp_path, "second")
    finally:
        stop_engine(server)
    for run in (first, second):
        assert "atc_replayed" not in run["failures"], run["failures"]
        assert run["stats"]["settle"][0] > 0 and run["stats"]["settle"][1] == 0, run
    cards = json.loads((tmp_path / "city.json").read_text())["citizens"]
    after = load_card_state(card_state_path(tmp_path / "keys.json"))
    assert all(after[z["pan"]] >= saved.get(z["pan"], 0) for z in cards)
    assert sum(after.values()) > sum(saved.values())  # the second run advanced the counters further
    # The day simulator on the same city starts its cards where the load left them.
    day = subprocess.run([sys.executable, "-m", "api.cli", "day", "--cards", "6", "--visits", "30", "--no-progress",
                          "--out", str(tmp_path / "report")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    # (A presented counter the engine had seen would stop the replay with atc_replayed.) The day
    # closes; its terminals' own batch totals then differ from the engine's, rightly: the load's
    # cashiers settled on the same terminals that day, which the day simulator's batches do not
    # count, so the close reports exactly those terminals' batches as out of balance.
    assert "atc_replayed" not in day.stdout + day.stderr, day.stdout[-3000:] + day.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["trial_balance"]["debits_fen"] == report["trial_balance"]["credits_fen"]
    assert report["replay"]["visits_settled"] > 0
    assert {d["kind"] for d in report["discrepancies"]} <= {"batch_out_of_balance"}
