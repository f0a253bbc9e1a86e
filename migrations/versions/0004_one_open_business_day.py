"""Business days: at most one day is open at a time (a partial unique index), so engine threads
or processes that all find no open day at the same moment — right after a close moved it to
``closing`` — open the same next day instead of two different ones (the second insert fails and
its retry reads the day the first one opened).

Revision ID: 0004_one_open_business_day
Revises: 0003_settlement_msgid_arpc
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_one_open_business_day"
down_revision = "0003_settlement_msgid_arpc"
branch_labels = None
depends_on = None


def upgrade() -> None:
    open_days = [r[0] for r in op.get_bind().execute(sa.text(
        "SELECT business_date FROM business_days WHERE status = 'open' ORDER BY business_date")).all()]
    if len(open_days) > 1:  # what an earlier version could leave behind
        raise RuntimeError(f"business_days: {len(open_days)} days are open ({', '.join(map(str, open_days))}); "
                           "reconcile and close all but the latest, then upgrade again")
    op.create_index("uq_business_days_one_open", "business_days", ["status"], unique=True,
                    postgresql_where=sa.text("status = 'open'"), sqlite_where=sa.text("status = 'open'"))


def downgrade() -> None:
    op.drop_index("uq_business_days_one_open", table_name="business_days")
