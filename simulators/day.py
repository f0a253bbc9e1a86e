"""A whole day of the city, replayed against a real engine over signed HTTP.

:func:`run_day` is what ``citizencard day`` (and ``make demo``) runs:

1. *Set-up, as the operators would* (through the engine's services, the CLI's face): the HIS
   simulator's catalogue (real national codes, synthetic classes and prices), synthetic
   citizens with valid GB 11643 identity numbers, cards with valid Luhn PANs and wallets,
   clinics, merchants and recharge channels with their terminals (each its own Ed25519 key),
   and the funds' and personal accounts' contributions.
2. *The day, over HTTP*: the engine (``citizencard serve``'s app) runs under uvicorn on a
   loopback port; simulated terminals sign every request (RFC 9421) and verify every answer.
   Channels recharge wallets; each visit's bill comes from the HIS simulator and is
   pre-settled then settled, paid by the physical card (EMV ARQC), the virtual card (CPM QR)
   or cash; a few are cancelled, a few partly refunded, some declined for funds; merchants take
   card payments. Every citizen's transactions run in order on one worker (a card is in one
   place at a time); workers run in parallel, so the engine's group commit sees real
   concurrency.
3. *The close*: every terminal closes its batch with its own counts and totals; finance closes
   the day; the report goes to ``out_dir``.

Everything the day does is derived from ``seed`` and the business date, so an interrupted day
re-run on the same database replays what was done (idempotent keys) and goes on; a finished
day is closed, so the next run books to the next business day.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from card.identity import synthetic_name, synthetic_pan, synthetic_sfz, sex_of, birth_date_of
from settlement import chart
from simulators.cards import SimulatedCard, VirtualCardApp, card_state_path, load_card_state, save_card_state
from simulators.his import SAMPLE_CSV, HisSimulator, generate_catalogue, write_catalogue
from terminals.client import EngineError, TerminalClient
from terminals.close import empty_batch

CLINICS = [("H33030200001", "温州市第一人民医院 (sim)", 3), ("H33030200002", "鹿城区中医院 (sim)", 2),
           ("H33030200003", "五马街道社区卫生服务中心 (sim)", 1), ("H33030200004", "瓯海区人民医院 (sim)", 2)]
MERCHANTS = [("M00000000001", "温州公交 (sim)"), ("M00000000002", "菜篮子市场 (sim)")]
CHANNELS = [("CH0000000001", "银行柜面 (sim)"), ("CH0000000002", "市民卡 App (sim)")]
WORKERS = 8
#: The server keeps idle connections longer than clients reuse them (terminals.client), so a
#: client never sends on a connection the server is closing.
KEEP_ALIVE_S = 30
TERMINAL_PREFIX = {"clinic": "C", "merchant": "M", "channel": "R"}
FUND_SEED_FEN = 50_000_000_00  # 50 million yuan in each pooled fund for the day


@dataclass
class Terminal:
    """One simulated terminal: its id, organisation, key, and its own batch totals."""

    terminal_id: str
    org_code: str
    kind: str
    key: Ed25519PrivateKey
    batch: dict = field(default_factory=empty_batch)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seq: int = 0

    def add(self, group: str, **figures: int) -> None:
        with self.lock:
            self.batch[group]["count"] += 1
            for k, v in figures.items():
                self.batch[group][k] += v

    def msgid(self, day: dt.date, n: int) -> str:
        """NHSA-style message id: terminal (8) + business date (8) + sequence (10)."""
        return f"{self.terminal_id}{day:%Y%m%d}{n:010d}"


@dataclass
class Citizen:
    psn_no: str
    certno: str
    name: str
    insutype: str
    retired: bool
    card: SimulatedCard
    app: VirtualCardApp | None = None
    virtual_pan: str = ""


def derived_key(seed: int, name: str) -> Ed25519PrivateKey:
    """A terminal key derived from the seed, so the same simulated city re-enrols identically."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"citizencard-sim:{seed}:{name}".encode()).digest())


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, port: int):
    """Run ``app`` under uvicorn on 127.0.0.1:``port`` in a thread; stop it on exit."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="engine-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the engine did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def ensure_catalogue(path: Path, seed: int) -> None:
    """Write the HIS simulator's catalogue (real codes, synthetic classes/prices) if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_catalogue(generate_catalogue(SAMPLE_CSV, seed), path, seed=seed)


class Day:
    """One simulated day against a bootstrapped container (see module docstring)."""

    def __init__(self, container, *, visits: int, cards: int, seed: int, progress=None) -> None:
        self.c = container
        self.visits = visits
        self.cards_n = cards
        self.seed = seed
        self.rng = random.Random(seed)
        self.progress = progress
        self.stats: Counter = Counter()
        self.stats_lock = threading.Lock()
        self.terminals: dict[str, Terminal] = {}
        self.citizens: list[Citizen] = []
        self.state_file = card_state_path(container.settings.resolved_keys_file())

    def count(self, name: str, n: int = 1) -> None:
        with self.stats_lock:
            self.stats[name] += n

    # ------------------------------------------------------------------ set-up (operators)
    def setup(self) -> None:
        c = self.c
        for code, name, tier in CLINICS:
            c.registry.add_org(code=code, kind="clinic", name=name, hospital_tier=tier)
        for code, name in MERCHANTS:
            c.registry.add_org(code=code, kind="merchant", name=name)
        for code, name in CHANNELS:
            c.registry.add_org(code=code, kind="channel", name=name)
        n = 0
        for code, kind, per in ([(x[0], "clinic", 2) for x in CLINICS] + [(x[0], "merchant", 1) for x in MERCHANTS]
                                + [(x[0], "channel", 1) for x in CHANNELS]):
            for _ in range(per):
                n += 1
                tid = f"T{TERMINAL_PREFIX[kind]}{n:06d}"
                key = derived_key(self.seed, tid)
                c.registry.enrol(terminal_id=tid, org_code=code, public_key=key.public_key())
                self.terminals[tid] = Terminal(tid, code, kind, key)
        saved = load_card_state(self.state_file)
        rng = random.Random(self.seed * 7919 + 1)
        for i in range(self.cards_n):
            insutype = "310" if rng.random() < 0.6 else "390"
            retired = insutype == "310" and rng.random() < 0.25
            birth = dt.date(1940 + rng.randrange(70), 1 + rng.randrange(12), 1 + rng.randrange(28))
            certno = synthetic_sfz(rng, "330302", birth)
            name = synthetic_name(rng)
            psn_no = f"3303{i + 1:012d}"
            pan = synthetic_pan(rng)
            c.cards.register_citizen(psn_no=psn_no, certno=certno, psn_name=name,
                                     gend="1" if sex_of(certno) == "M" else "2", brdy=birth_date_of(certno),
                                     insutype=insutype, retired=retired)
            c.cards.issue_card(psn_no=psn_no, pan=pan, pan_seq="01", form="physical")
            card = SimulatedCard(issuer_mk=c.keys.issuer_mk, pan=pan, psn="01", card_id=f"{psn_no:0>32}"[:32],
                                 card_number=f"{i + 1:09d}", ssn=certno, name=name, atc=saved.get(pan, 0))
            citizen = Citizen(psn_no, certno, name, insutype, retired, card)
            if rng.random() < 0.5:
                vpan = synthetic_pan(rng)
                c.cards.issue_card(psn_no=psn_no, pan=vpan, pan_seq="00", form="virtual")
                citizen.app = VirtualCardApp(issuer_mk=c.keys.issuer_mk, pan=vpan, psn="00", atc=saved.get(vpan, 0))
                citizen.virtual_pan = vpan
            self.citizens.append(citizen)
        self.save_cards()  # before any payment: a state file that cannot be written stops us here
        # Contributions: the pooled funds and the employees' personal accounts (operator batch).
        day = c.days.current()
        for fund in sorted(set(chart.POOLED_FUND.values()) | set(chart.SECOND_TIER_FUND.values())):
            c.wallet.contribute(key=f"contrib:{day}:{fund}", bank="bank:icbc", account=chart.fund_account(fund),
                                amount_fen=FUND_SEED_FEN)
        for citizen in self.citizens:
            if citizen.insutype == "310":
                amount = rng.randrange(0, 200_000)
                if amount:
                    c.wallet.contribute(key=f"contrib:{day}:{citizen.psn_no}", bank="bank:icbc",
                                        account=chart.personal_account(citizen.psn_no), amount_fen=amount)

    def describe(self) -> dict:
        """The simulated city's test secrets for a load generator: terminal keys and cards
        (synthetic; the issuer master key stays in the engine's keys file)."""
        from cryptography.hazmat.primitives import serialization

        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return {
            "seed": self.seed,
            "terminals": [{"terminal_id": t.terminal_id, "org_code": t.org_code, "kind": t.kind,
                           "private_key_hex": t.key.private_bytes(*raw).hex()} for t in self.terminals.values()],
            "citizens": [{"psn_no": z.psn_no, "pan": z.card.pan, "pan_seq": z.card.psn, "atc": z.card.atc,
                          "certno": z.certno, "name": z.name} for z in self.citizens],
        }

    def fund_wallets(self, amount_fen: int) -> None:
        """Recharge every physical card's wallet through the first channel (operator set-up)."""
        from settlement.service import TerminalContext

        channel = next(t for t in self.terminals.values() if t.kind == "channel")
        ctx = TerminalContext(channel.terminal_id, channel.org_code, "channel")
        day = self.c.days.current()
        for z in self.citizens:
            self.c.wallet.recharge(ctx, {"msgid": f"{channel.terminal_id}{day:%Y%m%d}S{z.card.pan[-9:]}",
                                         "pan": z.card.pan, "amount_fen": amount_fen})

    def save_cards(self) -> None:
        """Persist the simulated cards' ATCs (a real card keeps them in its EEPROM); see
        :func:`simulators.cards.save_card_state`."""
        state = {}
        for z in self.citizens:
            state[z.card.pan] = z.card.atc
            if z.app:
                state[z.app.pan] = z.app.atc
        save_card_state(self.state_file, state)

    # ------------------------------------------------------------------ the day (HTTP)
    def client(self, base_url: str, t: Terminal) -> TerminalClient:
        return TerminalClient(base_url, t.terminal_id, t.key, self.c.keys.engine_key.public_key())

    def run(self, base_url: str) -> dict:
        day = self.c.days.current()
        clinics = [t for t in self.terminals.values() if t.kind == "clinic"]
        merchants = [t for t in self.terminals.values() if t.kind == "merchant"]
        channels = [t for t in self.terminals.values() if t.kind == "channel"]
        his = HisSimulator(_load_items(self.c), self.seed)
        plan_rng = random.Random(self.seed * 31 + day.toordinal())
        # Per-citizen job lists, in order: recharges first, then visits and payments.
        jobs: dict[int, list] = defaultdict(list)
        for i, z in enumerate(self.citizens):
            low = plan_rng.random() < 0.05  # a few wallets stay nearly empty: declines
            amount = plan_rng.randrange(100, 3_000) if low else plan_rng.randrange(50_000, 400_000)
            jobs[i].append(("recharge", channels[0], z.card.pan, amount))
            if z.app:
                jobs[i].append(("recharge", channels[1 % len(channels)], z.app.pan,
                                plan_rng.randrange(100, 2_000) if low else plan_rng.randrange(10_000, 100_000)))
        for v in range(self.visits):
            i = plan_rng.randrange(len(self.citizens))
            z = self.citizens[i]
            t = clinics[plan_rng.randrange(len(clinics))]
            roll = plan_rng.random()
            method = "card" if roll < 0.5 else ("qr" if roll < 0.8 and z.app else "cash")
            after = plan_rng.random()
            follow = "cancel" if after < 0.05 else ("refund" if after < 0.12 else "")
            jobs[i].append(("visit", t, v, method, follow, plan_rng.getrandbits(32)))
        for p in range(max(1, self.visits // 3)):
            i = plan_rng.randrange(len(self.citizens))
            z = self.citizens[i]
            t = merchants[plan_rng.randrange(len(merchants))]
            use_qr = bool(z.app) and plan_rng.random() < 0.5
            jobs[i].append(("pay", t, p, "qr" if use_qr else "card", plan_rng.randrange(200, 3_000)))
        total = sum(len(v) for v in jobs.values())
        task = self.progress.add_task("replaying the day", total=total) if self.progress else None
        clients: dict[str, TerminalClient] = {}
        for t in self.terminals.values():
            clients[t.terminal_id] = self.client(base_url, t)
        worker_jobs: dict[int, list] = defaultdict(list)
        for i, items in jobs.items():
            worker_jobs[i % WORKERS].append((i, items))
        seq_lock = threading.Lock()
        seqs: Counter = Counter()

        def next_msgid(t: Terminal) -> str:
            with seq_lock:
                seqs[t.terminal_id] += 1
                return t.msgid(day, seqs[t.terminal_id])

        def do_worker(items) -> None:
            for i, citizen_jobs in items:
                z = self.citizens[i]
                for job in citizen_jobs:
                    try:
                        self._job(job, z, clients, his, day, next_msgid)
                    except EngineError as exc:
                        self.count(f"refused:{exc.code}")
                    if self.progress:
                        self.progress.advance(task)

        # Message ids must not depend on thread timing: give every job its ids up front.
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(do_worker, [worker_jobs[w] for w in range(WORKERS)]))
        # Batch close: each terminal reports its own figures.
        batch_results = {}
        for t in self.terminals.values():
            report = dict(t.batch, business_date=day.isoformat())
            batch_results[t.terminal_id] = clients[t.terminal_id].close_batch(report)["result"]
        for cl in clients.values():
            cl.close()
        return batch_results

    def _job(self, job, z: Citizen, clients, his: HisSimulator, day: dt.date, next_msgid) -> None:
        kind, t = job[0], job[1]
        cl = clients[t.terminal_id]
        if kind == "recharge":
            _, _, pan, amount = job
            msgid = f"{t.terminal_id}{day:%Y%m%d}R{pan[-9:]}"
            doc = cl.recharge(msgid, pan, amount)
            if not doc.get("replayed"):
                self.count("recharges")
            t.add("recharges", amount_fen=amount)
            return
        if kind == "pay":
            _, _, p, method, amount = job
            msgid = f"{t.terminal_id}{day:%Y%m%d}P{p:08d}"
            payment = self._payment(z, method, amount, t.terminal_id)
            try:
                doc = cl.pay(msgid, amount, payment)
            except EngineError as exc:
                if exc.code == "insufficient_funds":
                    self.count("payments_declined")
                    return
                raise
            self.count("payments")
            t.add("payments", amount_fen=doc["amount_fen"])
            return
        _, _, v, method, follow, bill_seed = job
        mdtrt_id = f"{t.org_code}{day:%Y%m%d}{v:06d}"
        lines = his.make_bill(mdtrt_id, random.Random(bill_seed), lines_max=5)
        visit = {"msgid": f"{t.terminal_id}{day:%Y%m%d}V{v:08d}", "mdtrt_id": mdtrt_id,
                 "chrg_bchno": HisSimulator.charge_batch_no(mdtrt_id), "psn_no": z.psn_no, "med_type": "11",
                 "mdtrt_cert_type": "03" if method == "card" else ("01" if method == "qr" else "02"),
                 "lines": lines}
        pre = cl.presettle(visit)
        due = pre["setlinfo"]["psn_cash_pay"]
        visit["payment"] = self._payment(z, method, due, t.terminal_id) if method != "cash" else {"method": "cash"}
        try:
            doc = cl.settle_safely(visit)
        except EngineError as exc:
            if exc.code == "amount_mismatch":  # the split changed since pre-settlement: present again
                due = exc.problem.get("amount_due_fen", due)
                visit["payment"] = self._payment(z, method, due, t.terminal_id)
                doc = cl.settle_safely(visit)
            elif exc.code == "insufficient_funds":
                self.count("visits_declined")
                return
            else:
                raise
        self.count("visits_settled" if not doc.get("replayed") else "visits_replayed")
        info = doc["setlinfo"]
        t.add("settlements", medfee_sumamt=info["medfee_sumamt"], fund_pay_sumamt=info["fund_pay_sumamt"],
              acct_pay=info["acct_pay"], psn_cash_pay=info["psn_cash_pay"],
              wallet_pay=doc["payment"]["wallet_pay_fen"])
        if follow == "cancel":
            c = cl.cancel(doc["setl_id"], f"{visit['msgid']}C")
            self.count("cancellations")
            t.add("cancellations", medfee_sumamt=c["setlinfo"]["medfee_sumamt"],
                  fund_pay_sumamt=c["setlinfo"]["fund_pay_sumamt"], acct_pay=c["setlinfo"]["acct_pay"],
                  psn_cash_pay=c["setlinfo"]["psn_cash_pay"], wallet_pay=c["payment"]["wallet_pay_fen"])
        elif follow == "refund":
            line = max(doc["lines"], key=lambda x: int(x["cnt"].split(".")[0] or 0))
            if int(line["cnt"].split(".")[0] or 0) < 2:
                return
            r = cl.refund(doc["setl_id"], f"{visit['msgid']}R", [{"feedetl_sn": line["feedetl_sn"], "cnt": "1"}])
            self.count("partial_refunds")
            t.add("cancellations", medfee_sumamt=info["medfee_sumamt"], fund_pay_sumamt=info["fund_pay_sumamt"],
                  acct_pay=info["acct_pay"], psn_cash_pay=info["psn_cash_pay"],
                  wallet_pay=doc["payment"]["wallet_pay_fen"])
            ri = r["setlinfo"]
            t.add("settlements", medfee_sumamt=ri["medfee_sumamt"], fund_pay_sumamt=ri["fund_pay_sumamt"],
                  acct_pay=ri["acct_pay"], psn_cash_pay=ri["psn_cash_pay"], wallet_pay=r["payment"]["wallet_pay_fen"])

    def _payment(self, z: Citizen, method: str, amount_fen: int, terminal_id: str) -> dict:
        """A card or QR authorisation; the card's counter is saved at once, as a card keeps it
        in its own memory, so a crash never makes a card reuse a counter."""
        if method == "qr" and z.app:
            payload = z.app.make_qr(int(time.time()), random.SystemRandom())
            self.save_cards()
            return {"method": "qr", "payload": payload}
        un = random.SystemRandom().getrandbits(32).to_bytes(4, "big")
        today = terminal_date()  # the terminal's own calendar date (EMV 9A), not the business day
        data, arqc = z.card.generate_ac(amount_fen, terminal_id, today, un)
        self.save_cards()
        return {"method": "card", "pan": z.card.pan, "pan_seq": z.card.psn, "atc": data.atc, "arqc": arqc.hex(),
                "un": un.hex(), "txn_date": today.isoformat(), "amount_fen": amount_fen}


def terminal_date() -> dt.date:
    """A terminal's calendar date by its own clock in Asia/Shanghai: the transaction date a
    card covers (EMV tag 9A), which the business date may run ahead of."""
    from card.service import local_date

    return local_date(time.time_ns() // 1000)


def _load_items(container):
    from settlement.catalogue import load_catalogue
    return list(load_catalogue(container.settings.catalogue))


def run_day(container, *, visits: int, cards: int, seed: int, out_dir: Path, progress=None) -> dict:
    """Set up, replay and close one business day; returns the day's report (also written to
    ``out_dir``). ``progress`` is a rich Progress (or None)."""
    day_sim = Day(container, visits=visits, cards=cards, seed=seed, progress=progress)
    started = time.monotonic()
    day_sim.setup()
    try:
        with serve_in_thread(_app(container), free_port()) as base_url:
            batch_results = day_sim.run(base_url)
    finally:
        day_sim.save_cards()
    report = container.closer.close_day(
        out_dir, synthetic_note=("citizens, cards, prices, classes and ceilings are synthetic (seed "
                                 f"{seed}); item codes, names and restrictions are real NHSA catalogue "
                                 "entries (simulators/data/README.md)"))
    report["replay"] = dict(sorted(day_sim.stats.items()))
    report["replay"]["seconds"] = round(time.monotonic() - started, 2)
    report["batches_reported"] = batch_results
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, sort_keys=True))
    return report


def _app(container):
    from api.app import create_app
    return create_app(container)
