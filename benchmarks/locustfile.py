"""Locust load for testers: cashiers settling visits with cards, over signed HTTP.

Use with a running engine whose city was set up by ``citizencard city`` (it writes the test
secrets this file reads)::

    citizencard city --db sqlite:///var/load.db --out var/city.json
    citizencard serve --db sqlite:///var/load.db --port 8000 &
    CITIZENCARD_CITY=var/city.json CITIZENCARD_KEYS=var/load.db.keys.json \\
        locust -f benchmarks/locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:8000

``python -m benchmarks.load`` does all of that in one bounded run on loopback. Each simulated
cashier owns a disjoint slice of the city's cards (a card is in one place at a time), builds a
bill with the HIS simulator, pre-settles (NHSA 2206) and settles (2207) with an EMV ARQC.

* The cards are shared out among the run's users (``-u``; or ``CITIZENCARD_USERS``). Run locust
  as one process (no ``--processes``): its worker processes would each clone the same users,
  with the same cards and message ids.
* The cards' counters (ATC) are kept in ``<keys file>.sim-cards.json`` and merged back when the
  users stop (SIGINT/SIGTERM included), so the next run, or ``citizencard day``, continues them.
  A run killed with SIGKILL loses its counters: the engine then answers ``atc_replayed``.
* ``citizencard day`` after a load on the same city closes that day with the load's (and the
  city's set-up recharges') terminals reported as ``batch_out_of_balance``: those terminals'
  own batch totals, which the day simulator keeps, do not count that traffic.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import threading
import time

from locust import User, constant, task

_COUNTER = itertools.count()
logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
_LOCK = threading.Lock()
_CITY: dict = {}


def city() -> dict:
    """The city's test secrets, keys and catalogue, loaded once per process."""
    with _LOCK:
        if not _CITY:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from settlement.catalogue import load_catalogue

            doc = json.loads(open(os.environ.get("CITIZENCARD_CITY", "var/city.json")).read())
            keys = json.loads(open(os.environ.get("CITIZENCARD_KEYS", "var/citizencard.db.keys.json")).read())
            engine_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keys["engine_key_hex"]))
            from simulators.cards import card_state_path, load_card_state, save_card_state

            state_file = card_state_path(os.environ.get("CITIZENCARD_KEYS", "var/citizencard.db.keys.json"))
            save_card_state(state_file, {})  # fails now, naming the file, if it cannot be kept
            _CITY.update(doc=doc, issuer_mk=bytes.fromhex(keys["issuer_mk_hex"]),
                         state_file=state_file, saved_atcs=load_card_state(state_file),
                         engine_public=engine_key.public_key(),
                         catalogue=list(load_catalogue(os.environ.get("CITIZENCARD_CATALOGUE", "var/catalogue.csv"))))
        return _CITY


class Cashier(User):
    """A clinic cashier settling visits back to back (closed loop)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from simulators.cards import SimulatedCard
        from simulators.his import HisSimulator
        from terminals.client import TerminalClient

        c = city()
        n = next(_COUNTER)
        # The cards are shared out among this many users (each card in one place at a time):
        # CITIZENCARD_USERS, or the number of users this run spawns (locust's -u).
        users = int(os.environ.get("CITIZENCARD_USERS") or self.environment.runner.target_user_count or 1)
        clinics = [t for t in c["doc"]["terminals"] if t["kind"] == "clinic"]
        self.terminal = clinics[n % len(clinics)]
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.terminal["private_key_hex"]))
        self.client = TerminalClient(self.host, self.terminal["terminal_id"], key, c["engine_public"])
        # Each card starts from the last ATC any simulator used on it (not the city's first one),
        # so that a second run, or `citizencard day` after this one, never repeats a counter.
        self.cards = [(z, SimulatedCard(issuer_mk=c["issuer_mk"], pan=z["pan"], psn=z["pan_seq"], card_id="0" * 32,
                                        card_number="000000000", ssn=z["certno"], name=z["name"],
                                        atc=max(z["atc"], c["saved_atcs"].get(z["pan"], 0))))
                      for z in c["doc"]["citizens"][n::users]]
        self.his = HisSimulator(c["catalogue"], n)
        self.rng = random.Random(n)
        self.seq = 0
        self.worker = n

    def on_stop(self) -> None:
        from simulators.cards import CardStateError, save_card_state

        self.client.close()
        try:
            save_card_state(city()["state_file"], {card.pan: card.atc for _, card in self.cards})
        except CardStateError as exc:  # one line, not a traceback per user
            logging.getLogger(__name__).error("%s", exc)

    def _timed(self, name: str, call):
        """Run ``call`` and report it to locust as request ``name``. A decline for insufficient
        funds is a correct answer, reported as ``name (declined)``, not as a failure."""
        from terminals.client import EngineError

        start = time.perf_counter()
        result, exception = None, None
        try:
            result = call()
        except EngineError as exc:
            if exc.code == "insufficient_funds":
                name = f"{name} (declined)"
            else:
                exception = exc
        except Exception as exc:  # a transport failure or an untrusted answer: a failure to report
            exception = exc
        self.environment.events.request.fire(request_type="POST", name=name, response_length=0,
                                             response_time=(time.perf_counter() - start) * 1000,
                                             exception=exception, context={})
        return result

    @task
    def settle_a_visit(self) -> None:
        if not self.cards:
            time.sleep(0.1)
            return
        z, card = self.cards[self.rng.randrange(len(self.cards))]
        self.seq += 1
        mdtrt_id = f"L{self.worker:04d}{int(time.time())}{self.seq:08d}"[:40]
        visit = {"msgid": f"{self.terminal['terminal_id']}L{self.worker:04d}{self.seq:010d}{int(time.time())}",
                 "mdtrt_id": mdtrt_id, "chrg_bchno": "1", "psn_no": z["psn_no"], "med_type": "11",
                 "lines": self.his.make_bill(mdtrt_id, self.rng, lines_max=4)}
        pre = self._timed("presettle", lambda: self.client.presettle(visit))
        if pre is None:
            return
        due = pre["setlinfo"]["psn_cash_pay"]
        if due:
            from simulators.day import terminal_date
            un = random.SystemRandom().getrandbits(32).to_bytes(4, "big")
            today = terminal_date()  # the terminal's calendar date (EMV 9A), not the business date
            data, arqc = card.generate_ac(due, self.terminal["terminal_id"], today, un)
            visit["payment"] = {"method": "card", "pan": card.pan, "pan_seq": card.psn, "atc": data.atc,
                                "arqc": arqc.hex(), "un": un.hex(), "txn_date": today.isoformat(), "amount_fen": due}
        self._timed("settle", lambda: self.client.settle(visit))
