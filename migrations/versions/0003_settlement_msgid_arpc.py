"""Settlements: a message id is unique per clinic (a unique index instead of a plain one, so two
different visits sent at the same moment with one msgid cannot both settle), and the ARPC a card
payment was answered with is kept, so a replayed answer or a query by msgid carries it too.

Revision ID: 0003_settlement_msgid_arpc
Revises: 0002_app
"""
import sqlalchemy as sa
from alembic import op

revision = "0003_settlement_msgid_arpc"
down_revision = "0002_app"
branch_labels = None
depends_on = None


def upgrade() -> None:
    duplicates = op.get_bind().execute(sa.text(
        "SELECT fixmedins_code, msgid, count(*) FROM settlements GROUP BY fixmedins_code, msgid "
        "HAVING count(*) > 1 ORDER BY 1, 2")).all()
    if duplicates:  # rows an earlier version let through (different visits raced with one msgid)
        shown = ", ".join(f"{org}/{msgid} ×{n}" for org, msgid, n in duplicates[:5])
        raise RuntimeError(f"settlements: {len(duplicates)} (clinic, msgid) pairs are used more than once "
                           f"({shown}); give each of those rows a distinct msgid, then upgrade again")
    op.drop_index("ix_settlements_msgid", table_name="settlements")
    op.create_index("uq_settlements_org_msgid", "settlements", ["fixmedins_code", "msgid"], unique=True)
    op.add_column("settlements", sa.Column("arpc", sa.String(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column("settlements", "arpc")
    op.drop_index("uq_settlements_org_msgid", table_name="settlements")
    op.create_index("ix_settlements_msgid", "settlements", ["fixmedins_code", "msgid"], unique=False)
