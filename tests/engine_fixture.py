"""A real engine for end-to-end tests: bootstrapped on a test database, served by uvicorn on a
loopback port, with one clinic, one merchant and one channel, their terminals and one insured
citizen holding a physical card and a virtual card."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.app import create_app
from api.bootstrap import Container, bootstrap
from api.settings import Settings
from card.identity import birth_date_of, synthetic_pan, synthetic_sfz
from settlement import chart
from simulators.cards import SimulatedCard, VirtualCardApp
from simulators.day import ensure_catalogue, free_port, serve_in_thread
from terminals.client import TerminalClient

CLINIC = "H33030200009"
MERCHANT = "M00000000009"
CHANNEL = "CH0000000009"
PSN = "330300000000042"


@dataclass
class Engine:
    container: Container
    base_url: str
    clinic: TerminalClient
    merchant: TerminalClient
    channel: TerminalClient
    clinic_key: Ed25519PrivateKey
    card: SimulatedCard
    app: VirtualCardApp
    psn_no: str
    catalogue_path: Path

    def card_payment(self, amount_fen: int, terminal_id: str = "TC000001") -> dict:
        """A fresh ARQC authorisation from the physical card for ``amount_fen``."""
        day = self.container.days.local_date()  # the terminal's calendar date, as the clock's
        un = random.SystemRandom().getrandbits(32).to_bytes(4, "big")
        data, arqc = self.card.generate_ac(amount_fen, terminal_id, day, un)
        return {"method": "card", "pan": self.card.pan, "pan_seq": self.card.psn, "atc": data.atc,
                "arqc": arqc.hex(), "un": un.hex(), "txn_date": day.isoformat(), "amount_fen": amount_fen}

    def balance(self, name: str) -> int:
        return self.container.ledger.balance(name).net_posted


def a_bill() -> list[dict]:
    """The shared vector's bill, as a HIS would send it (codes outside the catalogue carry
    their class: lines 1-4 take the catalogue's class when the code is known)."""
    return [
        {"feedetl_sn": "1", "hilist_code": "", "name": "consultation fee", "pric": "25.00", "cnt": "1",
         "chrgitm_lv": "C"},
        {"feedetl_sn": "2", "hilist_code": "", "name": "self-paid drug", "pric": "45.80", "cnt": "2",
         "chrgitm_lv": "C"},
    ]


@contextlib.contextmanager
def running_engine(db_url: str, tmp_path: Path, *, nonce_url: str = "memory://", insutype: str = "310"):
    """Yield an :class:`Engine`; stop the server and dispose of everything afterwards."""
    catalogue = tmp_path / "catalogue.csv"
    ensure_catalogue(catalogue, seed=42)
    settings = Settings(db_url=db_url, nonce_url=nonce_url, keys_file=str(tmp_path / "keys.json"),
                        catalogue=str(catalogue), create_keys=True)
    container = bootstrap(settings)
    try:
        reg = container.registry
        reg.add_org(code=CLINIC, kind="clinic", name="test clinic", hospital_tier=2)
        reg.add_org(code=MERCHANT, kind="merchant", name="test merchant")
        reg.add_org(code=CHANNEL, kind="channel", name="test channel")
        keys = {tid: Ed25519PrivateKey.generate() for tid in ("TC000001", "TM000001", "TH000001")}
        reg.enrol(terminal_id="TC000001", org_code=CLINIC, public_key=keys["TC000001"].public_key())
        reg.enrol(terminal_id="TM000001", org_code=MERCHANT, public_key=keys["TM000001"].public_key())
        reg.enrol(terminal_id="TH000001", org_code=CHANNEL, public_key=keys["TH000001"].public_key())
        rng = random.Random(7)
        certno = synthetic_sfz(rng, "330302", dt.date(1980, 5, 17), sex="M")  # gend "1"
        container.cards.register_citizen(psn_no=PSN, certno=certno, psn_name="测试", gend="1",
                                         brdy=birth_date_of(certno), insutype=insutype, retired=False)
        pan, vpan = synthetic_pan(rng), synthetic_pan(rng)
        container.cards.issue_card(psn_no=PSN, pan=pan, pan_seq="01")
        container.cards.issue_card(psn_no=PSN, pan=vpan, pan_seq="00", form="virtual")
        for fund in ("310100", "330100", "390100", "390200"):
            container.wallet.contribute(key=f"seed:{fund}", bank="bank:test", account=chart.fund_account(fund),
                                        amount_fen=100_000_000)
        if insutype == "310":
            container.wallet.contribute(key="seed:acct", bank="bank:test", account=chart.personal_account(PSN),
                                        amount_fen=30_000)
        card = SimulatedCard(issuer_mk=container.keys.issuer_mk, pan=pan, psn="01", card_id="0" * 32,
                             card_number="000000001", ssn=certno, name="测试")
        app = VirtualCardApp(issuer_mk=container.keys.issuer_mk, pan=vpan, psn="00")
        engine_pub = container.keys.engine_key.public_key()
        with serve_in_thread(create_app(container), free_port()) as base:
            clients = [TerminalClient(base, tid, keys[tid], engine_pub) for tid in ("TC000001", "TM000001", "TH000001")]
            try:
                yield Engine(container, base, *clients, keys["TC000001"], card, app, PSN, catalogue)
            finally:
                for c in clients:
                    c.close()
    finally:
        container.close()
