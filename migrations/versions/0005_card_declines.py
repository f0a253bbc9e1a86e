"""Card declines: a card (or QR) settlement or merchant payment refused after the card authorised
it (declined for funds, say) is recorded with the counter it spent, so that a resend of the same
message answers the same refusal, and a query by its msgid learns it, instead of
``atc_replayed`` / ``qr_code_already_used``.

Revision ID: 0005_card_declines
Revises: 0004_one_open_business_day
"""
import sqlalchemy as sa
from alembic import op

revision = "0005_card_declines"
down_revision = "0004_one_open_business_day"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "card_declines",
        sa.Column("org_code", sa.String(length=32), nullable=False),
        sa.Column("msgid", sa.String(length=40), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("pan", sa.String(length=19), nullable=False),
        sa.Column("atc", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("extra", sa.Text(), nullable=False),
        sa.Column("created_ts", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("org_code", "msgid"),
    )


def downgrade() -> None:
    op.drop_table("card_declines")
