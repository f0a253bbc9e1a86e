"""Medical settlement, recharges, benefit payouts, withholding and daily reconciliation.

The pure medical-settlement rules live in ``settlement.policy`` (policy tables per region and
year), ``settlement.split`` (the NHSA 2206/2207 and 2303/2304 split of a bill) and
``settlement.nhsa`` (NHSA-format exchange at the edge: 2204 lines, 2207 setlinfo, 3201/3202).
"""
