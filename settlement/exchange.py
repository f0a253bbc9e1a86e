"""NHSA-format exchange of booked settlements for a date range (the insurer's reconciliation).

* 2207 ``setlinfo`` of every settlement and cancellation, amounts as decimal yuan strings;
* 3201 totals per (insutype, clearing type): ``medfee_sumamt``, ``fund_pay_sumamt``,
  ``acct_pay``, ``fixmedins_setl_cnt`` (cancellations count negative);
* 3202 detail rows per settlement (compares ``cash_payamt``, where 3201 compares ``acct_pay``).

The formats themselves live in :mod:`settlement.nhsa`; this module reads the booked rows.
"""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import Engine, select

from settlement.nhsa import clr_type_for, detail_rows_3202, export_setlinfo, totals_3201
from settlement.split import SetlInfo
from settlement.schema import settlements


def period_records(engine: Engine, date_from: dt.date, date_to: dt.date, *, fixmedins_code: str = "") -> list[dict]:
    """Reconciliation records (see :class:`settlement.nhsa.SettlementRecord`) of the business
    days ``date_from``..``date_to`` inclusive, in booking order; optionally one clinic's."""
    q = (select(settlements).where(settlements.c.business_date >= date_from, settlements.c.business_date <= date_to)
         .order_by(settlements.c.business_date, settlements.c.created_ts, settlements.c.setl_id))
    if fixmedins_code:
        q = q.where(settlements.c.fixmedins_code == fixmedins_code)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    out = []
    for r in rows:
        info = json.loads(r.setlinfo)
        out.append({"setlinfo": info, "insutype": r.insutype, "clr_type": clr_type_for(r.med_type),
                    "refd_setl_flag": "1" if r.kind == "cancellation" else "0",
                    "fixmedins_code": r.fixmedins_code, "business_date": r.business_date.isoformat()})
    return out


def export_period(engine: Engine, date_from: dt.date, date_to: dt.date, *, fixmedins_code: str = "") -> dict:
    """``{"3201": [...], "3202": [...], "2207": [...]}`` for the period (yuan strings)."""
    records = period_records(engine, date_from, date_to, fixmedins_code=fixmedins_code)
    setlinfos = []
    for rec in records:
        exported = export_setlinfo(SetlInfo(**rec["setlinfo"]))
        setlinfos.append(dict(exported, refd_setl_flag=rec["refd_setl_flag"], fixmedins_code=rec["fixmedins_code"]))
    return {"3201": totals_3201(records), "3202": detail_rows_3202(records), "2207": setlinfos,
            "period": {"from": date_from.isoformat(), "to": date_to.isoformat()}}
