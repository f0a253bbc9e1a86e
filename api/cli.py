"""``citizencard``: the command line (typer + rich).

* ``citizencard day``     — set up a city, replay a day over signed HTTP, close it, report
* ``citizencard serve``   — run the engine's HTTP API (uvicorn)
* ``citizencard close-day`` — close the open (or a given) business day of a served engine
* ``citizencard terminal block`` / ``card block`` / ``card unblock`` — operators' blocks
* ``citizencard split``   — split a settlement vector file (policy, person state, bill) to JSON
* ``citizencard ledger verify`` — recompute every balance and check the hash chain
* ``citizencard catalogue generate`` — write the HIS simulator's catalogue
* ``citizencard db upgrade`` — run the migrations

Errors are one line on stderr (``error: code: detail``) with exit status 2 for bad input and 1
for a failed check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ledger.errors import DomainError
from ledger.money import format_yuan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Citizen-card payment and medical settlement engine.")
ledger_app = typer.Typer(no_args_is_help=True, help="Ledger checks.")
catalogue_app = typer.Typer(no_args_is_help=True, help="The item catalogue.")
db_app = typer.Typer(no_args_is_help=True, help="Database maintenance.")
terminal_app = typer.Typer(no_args_is_help=True, help="Enrolled terminals.")
card_app = typer.Typer(no_args_is_help=True, help="Citizens' cards.")
nhsa_app = typer.Typer(no_args_is_help=True, help="NHSA-format exchange with the insurer.")
app.add_typer(nhsa_app, name="nhsa")
app.add_typer(ledger_app, name="ledger")
app.add_typer(catalogue_app, name="catalogue")
app.add_typer(db_app, name="db")
app.add_typer(terminal_app, name="terminal")
app.add_typer(card_app, name="card")

err = Console(stderr=True)
DbOption = Annotated[Optional[str], typer.Option("--db", help="Database URL (sqlite:///… or postgresql://…).")]


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _settings(db: str | None, **extra):
    """The settings (environment, then ``--db``); a bad one is one line on stderr, exit 2."""
    from api.settings import Settings
    try:
        return Settings.from_env(db_url=db, **extra)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")


def _existing_db(db: str | None) -> str:
    """The database URL of a command that only reads: a SQLite file must already exist."""
    url = _settings(db).db_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        fail(f"no database at {url[len('sqlite:///'):]} (run `citizencard day` first, or give --db)")
    return url


@app.command()
def day(visits: Annotated[int, typer.Option(min=1, max=100_000, help="Clinic visits to settle.")] = 300,
        cards: Annotated[int, typer.Option(min=1, max=100_000, help="Citizens with cards.")] = 120,
        seed: Annotated[int, typer.Option(help="Seed of the synthetic city.")] = 1,
        db: DbOption = None,
        out: Annotated[Path, typer.Option(help="Folder for the day's report.")] = Path("var/report"),
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True) -> None:
    """Replay a day of clinic visits and card payments, then close the day (the main job)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from api.bootstrap import bootstrap
    from simulators.day import ensure_catalogue, run_day

    settings = _settings(db, create_keys=True)
    try:
        ensure_catalogue(Path(settings.catalogue), seed=42)
        container = bootstrap(settings)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    console = Console()
    try:
        day_date = container.days.current()
        console.print(f"business day [bold]{day_date}[/bold] on {settings.db_url} "
                      f"(visits {visits}, cards {cards}, seed {seed})")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not progress) as bar:
            report = run_day(container, visits=visits, cards=cards, seed=seed, out_dir=out, progress=bar)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    finally:
        container.close()
    print_report(console, report, out)
    if report["discrepancies"] or not report["trial_balance"]["balanced"]:
        raise typer.Exit(1)


def print_report(console: Console, report: dict, out: Path) -> None:
    """The day's summary as readable tables. A table wider than the terminal is printed at its
    own width (the terminal wraps the lines): no code or amount is ever cut short or split."""

    def show(table: Table) -> None:
        natural = console.measure(table, options=console.options.update_width(1_000)).maximum
        width = console.width
        console.width = max(width, natural)  # (print's own width= cannot exceed the console's)
        try:
            console.print(table)
        finally:
            console.width = width

    s = report["settlements"]
    console.print(f"\n[bold]Day {report['business_date']} closed[/bold] (Asia/Shanghai); report in {out}/")
    t = Table(title="Per clinic, net of cancellations (yuan)")
    for col in ("clinic", "tier", "settled", "cancelled", "medfee", "funds", "account", "wallet", "cash"):
        t.add_column(col, justify="left" if col == "clinic" else "right", no_wrap=True)
    for code, c in report["per_clinic"].items():
        t.add_row(code, str(c.get("hospital_tier", "")), str(c["count"]), str(c["cancellations"]),
                  format_yuan(c["medfee_sumamt"]), format_yuan(c["fund_pay_sumamt"]), format_yuan(c["acct_pay"]),
                  format_yuan(c["wallet_pay"]), format_yuan(c["psn_cash_pay"] - c["wallet_pay"]))
    show(t)
    f = Table(title="Per payer (yuan)")
    f.add_column("payer", no_wrap=True)
    f.add_column("net paid", justify="right", no_wrap=True)
    for name, amount in report["per_fund"].items():
        f.add_row(name, format_yuan(amount))
    show(f)
    ch = Table(title="Recharges per channel (yuan)")
    ch.add_column("channel", no_wrap=True)
    ch.add_column("count", justify="right", no_wrap=True)
    ch.add_column("amount", justify="right", no_wrap=True)
    for code, c in report["per_channel"].items():
        ch.add_row(code, str(c["count"]), format_yuan(c["amount_fen"]))
    show(ch)
    tb = report["trial_balance"]
    console.print(f"settlements {s['count']} (cancellations {s['cancellations']}), medfee {format_yuan(s['medfee_sumamt'])}"
                  f" yuan; payments {report['payments']['count']}; recharges {report['recharges']['count']}")
    if "replay" in report:
        console.print(f"replay: {json.dumps(report['replay'], sort_keys=True)}")
    console.print(f"trial balance: debits {format_yuan(tb['debits_fen'])} = credits {format_yuan(tb['credits_fen'])}"
                  f" → {'[green]balanced[/green]' if tb['balanced'] else '[red]NOT balanced[/red]'}")
    n = len(report["discrepancies"])
    console.print(f"discrepancies: {'[green]none[/green]' if n == 0 else f'[red]{n}[/red]'}")
    for d in report["discrepancies"][:20]:
        console.print(f"  - {d['kind']}: {d['detail']}", highlight=False)
    if report.get("synthetic_data"):
        console.print(f"[dim]{report['synthetic_data']}[/dim]")


@app.command()
def city(cards: Annotated[int, typer.Option(min=1, max=100_000, help="Citizens with cards.")] = 200,
         seed: Annotated[int, typer.Option(help="Seed of the synthetic city.")] = 1,
         wallet_fen: Annotated[int, typer.Option(min=1, max=500_000, help="Recharge per card (fen).")] = 500_000,
         db: DbOption = None,
         out: Annotated[Path, typer.Option(help="Where to write the city's test secrets (JSON).")] = Path("var/city.json")) -> None:
    """Set up a synthetic city (clinics, terminals, citizens, cards, funds, wallets) for a load
    test, and write its terminals' keys and cards for the load generator."""
    from api.bootstrap import bootstrap
    from simulators.day import Day, ensure_catalogue

    settings = _settings(db, create_keys=True)
    try:
        ensure_catalogue(Path(settings.catalogue), seed=42)
        container = bootstrap(settings)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    try:
        sim = Day(container, visits=0, cards=cards, seed=seed)
        sim.setup()
        sim.fund_wallets(wallet_fen)
        out.parent.mkdir(parents=True, exist_ok=True)
        # The terminals' private keys are in it: readable by its owner only, as the keys file is.
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(sim.describe(), indent=1))
        os.chmod(tmp, 0o600)
        tmp.replace(out)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    finally:
        container.close()
    Console().print(f"city of {cards} cardholders ready; test secrets in {out}")


@app.command()
def serve(db: DbOption = None,
          host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=1, max=65535)] = 8000) -> None:
    """Run the engine's HTTP API under uvicorn (keys, policy and catalogue from the settings)."""
    import uvicorn

    from api.app import create_app
    from api.bootstrap import bootstrap

    try:
        container = bootstrap(_settings(db))
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    try:
        uvicorn.run(create_app(container), host=host, port=port, log_level="info", timeout_keep_alive=30)
    finally:
        container.close()


def _engine_container(db: str | None):
    """The engine wired as ``serve`` wires it, on an existing database; a bad setting or a
    missing keys file or catalogue is one line on stderr, exit 2."""
    from api.bootstrap import bootstrap

    _existing_db(db)
    try:
        return bootstrap(_settings(db))
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")


@app.command("close-day")
def close_day(date: Annotated[Optional[str], typer.Option("--date", help="Business date to close (ISO); "
                                                          "default: the open one.")] = None,
              db: DbOption = None,
              out: Annotated[Path, typer.Option(help="Folder for the reports: each day's in OUT/<business date>/.")]
              = Path("var/report")) -> None:
    """Close the open business day (or --date) of the engine on --db, as finance does at day end.

    Closing a day that is closed already answers with the report stored when it closed and
    does nothing again. Exit status 1 when the report has a discrepancy or the trial balance
    does not balance."""
    import datetime as dt

    wanted = None
    if date is not None:
        try:
            wanted = dt.date.fromisoformat(date)
        except ValueError:
            fail(f"--date: {date!r} is not an ISO date (YYYY-MM-DD)")
    container = _engine_container(db)
    try:
        done = container.closer.close_business_day(wanted)
        for report in [*done["finished_first"], done["report"]]:
            container.closer.write_day_report(report, out / report["business_date"])
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    finally:
        container.close()
    console = Console()
    for earlier in done["finished_first"]:
        console.print(f"finished first the close of business day {earlier['business_date']}, left closing by a "
                      f"close that stopped; report in {out / earlier['business_date']}/", highlight=False)
    report = done["report"]
    if done["replayed"]:
        console.print(f"business day {report['business_date']} was closed already: its stored report "
                      "(nothing done again)", highlight=False)
    print_report(console, report, out / report["business_date"])
    console.print(f"report stored with business day {report['business_date']} in the database", highlight=False)
    if report["discrepancies"] or not report["trial_balance"]["balanced"]:
        raise typer.Exit(1)


@terminal_app.command("block")
def terminal_block(terminal_id: Annotated[str, typer.Argument(help="The terminal's id (8 characters).")],
                   db: DbOption = None) -> None:
    """Block a terminal: its signed requests are refused (by a running engine within
    CITIZENCARD_TERMINAL_CACHE_S, 5 s by default)."""
    container = _engine_container(db)
    try:
        changed = container.registry.block(terminal_id)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    finally:
        container.close()
    Console().print(f"terminal {terminal_id} {'blocked' if changed else 'was blocked already'}", highlight=False)


def _set_card_status(pan: str, db: str | None, status: str) -> None:
    container = _engine_container(db)
    try:
        before = container.cards.card(pan).status
        if before != status:
            container.cards.set_status(pan, status)
    except DomainError as exc:
        fail(f"{exc.code}: {exc.detail}")
    finally:
        container.close()
    word = "blocked" if status == "blocked" else "active"
    Console().print(f"card {pan} {word if before != status else f'was {word} already'}", highlight=False)


@card_app.command("block")
def card_block(pan: Annotated[str, typer.Argument(help="The card's PAN.")], db: DbOption = None) -> None:
    """Block a card (lost, stolen): its payments and settlements by card are refused."""
    _set_card_status(pan, db, "blocked")


@card_app.command("unblock")
def card_unblock(pan: Annotated[str, typer.Argument(help="The card's PAN.")], db: DbOption = None) -> None:
    """Make a blocked card active again."""
    _set_card_status(pan, db, "active")


@app.command()
def split(file: Annotated[Path, typer.Argument(help="Settlement vector JSON (policy, person state, bill).")]) -> None:
    """Split a bill as NHSA 2206 does and print JSON with ``lines`` and ``setlinfo`` (int fen)."""
    from settlement.policy import PolicyError
    from settlement.split import SplitInputError, split_vector_document

    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text")
    try:
        doc = json.loads(text, parse_float=_no_float, parse_constant=_no_float)
    except ValueError as exc:
        fail(f"{file}: malformed JSON: {exc}")
    if not isinstance(doc, dict):
        fail(f"{file}: the document must be a JSON object")
    try:
        result = split_vector_document(doc)
    except (SplitInputError, PolicyError) as exc:
        fail(f"{file}: {exc}")
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _no_float(text: str):
    raise ValueError(f"number {text} must be written as a decimal string (\"{text}\"): prices and ratios "
                     "are decimal strings, amounts of fen are integers")


@ledger_app.command("verify")
def ledger_verify(db: DbOption = None) -> None:
    """Recompute every balance from the journal and check the hash chain; exit 1 on a mismatch."""
    from ledger.db import make_engine
    from ledger.store import Ledger

    settings = _settings(db)
    engine = make_engine(_existing_db(db))
    try:
        ledger = Ledger(engine)
        problems = ledger.verify()
        tb = ledger.trial_balance()
    except Exception as exc:  # a missing table or unreachable database: one line, not a traceback
        fail(f"cannot verify {settings.db_url}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        engine.dispose()
    for p in problems:
        err.print(f"mismatch: {p}", highlight=False)
    accounts = len(tb.accounts)
    if problems:
        raise typer.Exit(1)
    Console().print(f"ledger verified: {accounts} accounts, trial balance "
                    f"{'balanced' if tb.balanced else 'NOT balanced'}, hash chain intact")
    if not tb.balanced:
        raise typer.Exit(1)


@catalogue_app.command("generate")
def catalogue_generate(out: Annotated[Path, typer.Option(help="Where to write the catalogue CSV.")] = Path("var/catalogue.csv"),
                       seed: Annotated[int, typer.Option(help="Seed of the synthetic classes and prices.")] = 42) -> None:
    """Write the HIS simulator's catalogue: real codes and names, synthetic classes and prices."""
    from simulators.his import SAMPLE_CSV, generate_catalogue, write_catalogue

    write_catalogue(generate_catalogue(SAMPLE_CSV, seed), out, seed=seed)
    Console().print(f"wrote {out}")


@nhsa_app.command("export")
def nhsa_export(date_from: Annotated[str, typer.Option("--from", help="First business date (ISO).")],
                date_to: Annotated[str, typer.Option("--to", help="Last business date (ISO).")],
                out: Annotated[Path, typer.Option(help="Folder for 3201.csv, 3202.csv and 2207.jsonl.")] = Path("var/nhsa"),
                clinic: Annotated[str, typer.Option(help="Only this clinic (fixmedins_code).")] = "",
                db: DbOption = None) -> None:
    """Export booked settlements for a date range: 3201 totals, 3202 details, 2207 setlinfo."""
    import csv
    import datetime as dt

    from ledger.db import make_engine
    from settlement.exchange import export_period

    try:
        first, last = dt.date.fromisoformat(date_from), dt.date.fromisoformat(date_to)
    except ValueError as exc:
        fail(f"--from/--to: {exc}")
    if last < first:
        fail("--to is before --from")
    engine = make_engine(_existing_db(db))
    try:
        doc = export_period(engine, first, last, fixmedins_code=clinic)
    except Exception as exc:  # an unreachable or empty database: one line, not a traceback
        fail(f"cannot read settlements: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("3201", "3202"):
        rows = doc[name]
        with open(out / f"{name}.csv", "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    (out / "2207.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in doc["2207"]))
    Console().print(f"{len(doc['3202'])} settlement records, {len(doc['3201'])} 3201 groups → {out}/")


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None) -> None:
    """Run the Alembic migrations up to the latest revision."""
    import migrations
    from ledger.db import make_engine

    engine = make_engine(_settings(db).db_url)
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()
    Console().print("database is at the latest revision")


def main() -> None:
    """Entry point of the ``citizencard`` script. An unexpected error (an unreachable database,
    an unwritable folder) is one line on stderr and exit status 1; set ``CITIZENCARD_DEBUG=1``
    for the traceback."""
    import os

    try:
        app()
    except Exception as exc:
        if os.environ.get("CITIZENCARD_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        err.print(f"[red]error:[/red] {type(exc).__name__}: {first}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
