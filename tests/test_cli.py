"""The command line as a user runs it: ``citizencard split``, ``day``, ``ledger verify``, finance's
``close-day`` and the operators' ``terminal block`` and ``card block`` / ``unblock``, also against
an engine serving meanwhile."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

VECTOR = Path(__file__).parent / "vectors" / "settlement-outpatient-01.json"


def cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=_env(env))


def _env(extra: dict | None = None) -> dict:
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CITIZENCARD_DB", None)
    env.update(extra or {})
    return env


def one_line_error(run: subprocess.CompletedProcess, code: int, text: str) -> bool:
    """The command failed with exit status ``code`` and one line on stderr saying ``text``."""
    return (run.returncode == code and text in run.stderr and run.stderr.count("\n") == 1
            and "Traceback" not in run.stderr)


def test_split_reproduces_every_figure_of_the_shared_vector():
    vector = json.loads(VECTOR.read_text())
    run = cli("split", str(VECTOR))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    by_sn = {line["feedetl_sn"]: line for line in out["lines"]}
    for expected in vector["expected_lines"]:
        got = by_sn[expected["feedetl_sn"]]
        for k, v in expected.items():
            assert got[k] == v, (expected["feedetl_sn"], k)
    for k, v in vector["expected_setlinfo"].items():
        assert out["setlinfo"][k] == v, k
    variants = {v["name"]: v for v in out.get("variants", [])}
    for variant in vector["variants"]:
        if "expected_setlinfo" not in variant:
            continue
        got = variants[variant["name"]]["setlinfo"]
        for k, v in variant["expected_setlinfo"].items():
            assert got[k] == v, (variant["name"], k)
    # The rounding guard (variant D): line 3's first self-pay is 11.045 yuan -> 1105 fen.
    assert by_sn["3"]["preselfpay_amt"] == 1105


@pytest.mark.parametrize("content, message", [
    ("{", "malformed JSON"),
    ("[]", "must be a JSON object"),
    ('{"policy": {}}', "bill"),
    ('{"policy": {"fund_ratio": 0.7}, "bill": []}', "decimal string"),
])
def test_split_refuses_bad_input_with_one_line(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    run = cli("split", str(f))
    assert run.returncode == 2
    assert message in run.stderr and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def _bad_vector(tmp_path: Path, mutate) -> Path:
    doc = json.loads(VECTOR.read_text())
    mutate(doc)
    f = tmp_path / "v.json"
    f.write_text(json.dumps(doc))
    return f


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["bill"][0].update(cnt="-1"), "cnt"),
    (lambda d: d["bill"][0].update(chrgitm_lv="X"), "chrgitm_lv"),
    (lambda d: d["bill"][0].update(pric="1" + "0" * 25), "pric"),
    (lambda d: d["policy"].pop("fund_ratio"), "fund_ratio"),
])
def test_split_names_the_bad_field(tmp_path, mutate, field):
    run = cli("split", str(_bad_vector(tmp_path, mutate)))
    assert run.returncode == 2 and field in run.stderr, run.stderr


def test_day_closes_clean_twice_and_ledger_verify_catches_an_edit(tmp_path):
    db = tmp_path / "city.db"
    args = ("day", "--visits", "24", "--cards", "12", "--seed", "3", "--db", f"sqlite:///{db}",
            "--no-progress")
    first = cli(*args, "--out", str(tmp_path / "r1"), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    r1 = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert r1["discrepancies"] == [] and r1["trial_balance"]["debits_fen"] == r1["trial_balance"]["credits_fen"]
    assert r1["settlements"]["count"] > 0 and r1["settlements"]["medfee_sumamt"] > 0
    for name in ("per_clinic.csv", "per_fund.csv", "per_channel.csv", "settlements_3202.csv"):
        assert (tmp_path / "r1" / name).exists()
    second = cli(*args, "--out", str(tmp_path / "r2"), cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    r2 = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert r2["business_date"] > r1["business_date"]  # a fresh business day, nothing mixed in
    assert r2["discrepancies"] == []
    # The insurer's 3201 totals for the first day agree with the day's report, to the fen.
    exported = cli("nhsa", "export", "--from", r1["business_date"], "--to", r1["business_date"],
                   "--out", str(tmp_path / "nhsa"), "--db", f"sqlite:///{db}")
    assert exported.returncode == 0, exported.stderr
    import csv
    from ledger.money import parse_yuan
    with open(tmp_path / "nhsa" / "3201.csv") as f:
        rows = {(r["insutype"], r["clr_type"]): r for r in csv.DictReader(f)}
    for group in r1["nhsa_3201"]:
        row = rows[(group["insutype"], group["clr_type"])]
        assert parse_yuan(row["medfee_sumamt"]) == group["medfee_sumamt"]
        assert parse_yuan(row["fund_pay_sumamt"]) == group["fund_pay_sumamt"]
        assert int(row["fixmedins_setl_cnt"]) == group["fixmedins_setl_cnt"]
    ok = cli("ledger", "verify", "--db", f"sqlite:///{db}")
    assert ok.returncode == 0, ok.stderr
    with sqlite3.connect(db) as conn:  # someone edits history behind the ledger's back
        conn.execute("UPDATE ledger_transfers SET amount = amount + 1 WHERE id = (SELECT min(id) FROM ledger_transfers)")
    bad = cli("ledger", "verify", "--db", f"sqlite:///{db}")
    assert bad.returncode == 1 and "mismatch" in bad.stderr


def test_day_summary_never_cuts_a_code_or_an_amount_on_a_narrow_terminal(tmp_path):
    """At 80 columns the per-clinic table is wider than the terminal: it is printed at its own
    width, every code and amount whole on its line (a tester saw them cut short with '…')."""
    import io

    from rich.console import Console

    from api.cli import print_report

    clinic = {"hospital_tier": 3, "count": 123456, "cancellations": 1234, "medfee_sumamt": 20_114_654_802,
              "fund_pay_sumamt": 14_080_258_361, "acct_pay": 2_011_465_480, "wallet_pay": 1_005_732_740,
              "psn_cash_pay": 4_022_930_961}
    report = {"business_date": "2026-12-07", "settlements": {"count": 1, "cancellations": 0, "medfee_sumamt": 1},
              "per_clinic": {"H33030200101": clinic, "H33030200102": clinic},
              "per_fund": {"fund:employee_pooled": 14_080_258_361}, "per_channel": {"CH0000000101": {
                  "count": 99999, "amount_fen": 99_999_999_999}},
              "trial_balance": {"debits_fen": 5, "credits_fen": 5, "balanced": True},
              "payments": {"count": 0}, "recharges": {"count": 0}, "replay": {}, "discrepancies": []}
    out = io.StringIO()
    print_report(Console(file=out, width=80, color_system=None), report, tmp_path)
    text = out.getvalue()
    assert "…" not in text, text
    for figure in ("H33030200101", "201146548.02", "140802583.61", "30171982.21", "999999999.99"):
        assert figure in text, figure


# ---------------------------------------------------------------------- operators and finance
def a_city(tmp_path: Path) -> tuple[str, dict]:
    """A synthetic city set up by ``citizencard city`` (its wallets' recharges are booked to the
    open business day); returns its database URL and its test secrets."""
    url = f"sqlite:///{tmp_path / 'city.db'}"
    run = cli("city", "--cards", "2", "--db", url, "--out", str(tmp_path / "city.json"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    return url, json.loads((tmp_path / "city.json").read_text())


def close_every_batch(tmp_path: Path, url: str) -> str:
    """Every terminal that transacted closes its batch with the engine's own figures (as the
    terminals would, over HTTP); returns the open business day."""
    from sqlalchemy import select

    from api.bootstrap import bootstrap
    from api.settings import Settings
    from terminals.schema import terminals

    container = bootstrap(Settings(db_url=url, catalogue=str(tmp_path / "var" / "catalogue.csv")))
    try:
        day = container.days.current()
        with container.engine.connect() as conn:
            ids = conn.scalars(select(terminals.c.terminal_id)).all()
        for tid in ids:
            figures = container.closer.computed_batch(tid, day)
            if any(any(group.values()) for group in figures.values()):
                ctx = container.registry.lookup(tid)[1]
                doc = container.closer.close_batch(ctx, dict(figures, business_date=day.isoformat()))
                assert doc["result"] == "balanced"
        return day.isoformat()
    finally:
        container.close()


def ledger_entries(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0]


def test_close_day_closes_the_open_day_once_and_then_answers_with_its_stored_report(tmp_path):
    url, _city = a_city(tmp_path)
    day = close_every_batch(tmp_path, url)
    out = tmp_path / "reports"
    first = cli("close-day", "--db", url, "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"Day {day} closed" in first.stdout and "discrepancies: none" in first.stdout
    report = json.loads((out / day / "report.json").read_text())
    assert report["business_date"] == day and report["discrepancies"] == []
    assert report["recharges"]["count"] == 2 and report["clearing"]
    assert (out / day / "settlements_3202.csv").exists()
    entries = ledger_entries(tmp_path / "city.db")
    with sqlite3.connect(tmp_path / "city.db") as conn:
        assert conn.execute("SELECT status FROM business_days WHERE business_date = ?", (day,)).fetchone() == ("closed",)

    for again in (cli("close-day", "--db", url, "--out", str(out), cwd=tmp_path),  # no day open: the last one
                  cli("close-day", "--date", day, "--db", url, "--out", str(out), cwd=tmp_path)):
        assert again.returncode == 0, again.stderr
        assert f"business day {day} was closed already" in again.stdout
        assert json.loads((out / day / "report.json").read_text()) == report
    assert ledger_entries(tmp_path / "city.db") == entries  # nothing cleared twice, no day opened
    with sqlite3.connect(tmp_path / "city.db") as conn:
        assert conn.execute("SELECT count(*) FROM business_days").fetchone() == (1,)


def test_close_day_refuses_bad_input_with_one_line(tmp_path):
    url, _city = a_city(tmp_path)
    assert one_line_error(cli("close-day", "--date", "2099-01-01", "--db", url, cwd=tmp_path), 2,
                          "business_day_unknown: business day 2099-01-01 was never opened")
    assert one_line_error(cli("close-day", "--date", "16.3.2026", "--db", url, cwd=tmp_path), 2, "--date")
    assert one_line_error(cli("close-day", "--db", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path), 2,
                          "no database")
    assert not (tmp_path / "none.db").exists()
    with sqlite3.connect(tmp_path / "city.db") as conn:
        assert conn.execute("SELECT status FROM business_days").fetchall() == [("open",)]  # nothing closed


def test_operators_block_terminals_and_block_and_unblock_cards(tmp_path):
    url, city = a_city(tmp_path)
    tid, pan = city["terminals"][0]["terminal_id"], city["citizens"][0]["pan"]

    def status(table: str, key: str, value: str) -> str:
        with sqlite3.connect(tmp_path / "city.db") as conn:
            return conn.execute(f"SELECT status FROM {table} WHERE {key} = ?", (value,)).fetchone()[0]

    run = cli("terminal", "block", tid, "--db", url, cwd=tmp_path)
    assert run.returncode == 0 and f"terminal {tid} blocked" in run.stdout, run.stderr
    assert status("terminals", "terminal_id", tid) == "blocked"
    run = cli("terminal", "block", tid, "--db", url, cwd=tmp_path)
    assert run.returncode == 0 and "was blocked already" in run.stdout, run.stderr
    assert one_line_error(cli("terminal", "block", "TX999999", "--db", url, cwd=tmp_path), 2,
                          "terminal_not_found: no terminal TX999999")

    run = cli("card", "block", pan, "--db", url, cwd=tmp_path)
    assert run.returncode == 0 and f"card {pan} blocked" in run.stdout, run.stderr
    assert status("cards", "pan", pan) == "blocked"
    run = cli("card", "unblock", pan, "--db", url, cwd=tmp_path)
    assert run.returncode == 0 and f"card {pan} active" in run.stdout, run.stderr
    assert status("cards", "pan", pan) == "active"
    run = cli("card", "unblock", pan, "--db", url, cwd=tmp_path)
    assert run.returncode == 0 and "was active already" in run.stdout, run.stderr
    for command in ("block", "unblock"):
        assert one_line_error(cli("card", command, "6200000000000000", "--db", url, cwd=tmp_path), 2,
                              "card_not_found: no card 6200000000000000")


def test_blocks_and_the_day_close_from_the_cli_take_effect_in_a_running_engine(db_url, tmp_path):
    """Operators and finance act from the command line on the database of an engine that is
    serving: a blocked card is declined and an unblocked one pays again, the day closes with
    what was booked and the engine books on the next day, and a blocked terminal's requests
    are refused (its cached key is re-read: at once here, within terminal_cache_s by default)."""
    from terminals.client import EngineError
    from tests.engine_fixture import a_bill, running_engine

    env = {"CITIZENCARD_KEYS": str(tmp_path / "keys.json"), "CITIZENCARD_CATALOGUE": str(tmp_path / "catalogue.csv")}
    with running_engine(db_url, tmp_path) as eng:
        eng.container.registry.cache_s = 0.0
        eng.channel.recharge("TH000001R0001", eng.card.pan, 10_000)

        def visit(n: int) -> dict:
            return {"msgid": f"TC000001{n:020d}", "mdtrt_id": f"MD{n:08d}", "chrg_bchno": f"B{n:04d}",
                    "psn_no": eng.psn_no, "med_type": "11", "lines": a_bill(), "payment": {"method": "cash"}}

        assert cli("card", "block", eng.card.pan, "--db", db_url, env=env).returncode == 0
        with pytest.raises(EngineError) as exc:
            eng.merchant.pay("TM000001P0001", 100, eng.card_payment(100, "TM000001"))
        assert exc.value.code == "card_blocked"
        assert cli("card", "unblock", eng.card.pan, "--db", db_url, env=env).returncode == 0
        assert eng.merchant.pay("TM000001P0002", 100, eng.card_payment(100, "TM000001"))["amount_fen"] == 100
        first = eng.clinic.settle(visit(1))

        day = first["business_date"]
        for client in (eng.clinic, eng.channel, eng.merchant):
            figures = eng.container.closer.computed_batch(client.terminal_id, eng.container.days.current())
            assert client.close_batch(dict(figures, business_date=day))["result"] == "balanced"
        closed = cli("close-day", "--db", db_url, "--out", str(tmp_path / "reports"), env=env)
        assert closed.returncode == 0, closed.stdout[-3000:] + closed.stderr[-3000:]
        report = json.loads((tmp_path / "reports" / day / "report.json").read_text())
        assert (report["settlements"]["count"], report["payments"]["count"], report["recharges"]["count"]) == (1, 1, 1)
        assert report["discrepancies"] == []
        assert eng.container.days.status(dt.date.fromisoformat(day))[0] == "closed"
        later = eng.clinic.settle(visit(2))
        assert later["business_date"] > day  # the engine went on, on the next day

        assert cli("terminal", "block", "TC000001", "--db", db_url, env=env).returncode == 0
        with pytest.raises(EngineError) as exc:
            eng.clinic.settle(visit(3))
        assert exc.value.status == 401 and exc.value.code == "unknown_key"
        assert eng.merchant.pay("TM000001P0003", 100, eng.card_payment(100, "TM000001"))["amount_fen"] == 100
