"""Application tables: citizens and cards, organisations and terminals, batch closes,
settlements, payments, recharges and business days.

Revision ID: 0002_app
Revises: 0001_ledger
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_app"
down_revision = "0001_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('business_days',
    sa.Column('business_date', sa.Date(), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('opened_ts', sa.BigInteger(), nullable=False),
    sa.Column('closed_ts', sa.BigInteger(), nullable=True),
    sa.Column('report', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('business_date')
    )
    op.create_table('citizens',
    sa.Column('psn_no', sa.String(length=32), nullable=False),
    sa.Column('certno', sa.String(length=18), nullable=False),
    sa.Column('psn_name', sa.String(length=64), nullable=False),
    sa.Column('gend', sa.String(length=1), nullable=False),
    sa.Column('brdy', sa.Date(), nullable=False),
    sa.Column('insutype', sa.String(length=3), nullable=False),
    sa.Column('retired', sa.Boolean(), nullable=False),
    sa.Column('created_ts', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('psn_no'),
    sa.UniqueConstraint('certno')
    )
    op.create_table('orgs',
    sa.Column('code', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=12), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('hospital_tier', sa.Integer(), nullable=True),
    sa.Column('created_ts', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('code')
    )
    op.create_table('payments',
    sa.Column('payment_id', sa.String(length=40), nullable=False),
    sa.Column('msgid', sa.String(length=40), nullable=False),
    sa.Column('org_code', sa.String(length=32), nullable=False),
    sa.Column('terminal_id', sa.String(length=32), nullable=False),
    sa.Column('pan', sa.String(length=19), nullable=False),
    sa.Column('pay_method', sa.String(length=8), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('business_date', sa.Date(), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_key', sa.String(length=128), nullable=False),
    sa.Column('created_ts', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('payment_id'),
    sa.UniqueConstraint('entry_key'),
    sa.UniqueConstraint('org_code', 'msgid', name='uq_payments_org_msgid')
    )
    op.create_index('ix_payments_day', 'payments', ['business_date'], unique=False)
    op.create_table('recharges',
    sa.Column('recharge_id', sa.String(length=40), nullable=False),
    sa.Column('msgid', sa.String(length=40), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('terminal_id', sa.String(length=32), nullable=False),
    sa.Column('pan', sa.String(length=19), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('business_date', sa.Date(), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_key', sa.String(length=128), nullable=False),
    sa.Column('created_ts', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('recharge_id'),
    sa.UniqueConstraint('entry_key'),
    sa.UniqueConstraint('channel', 'msgid', name='uq_recharges_channel_msgid')
    )
    op.create_index('ix_recharges_day', 'recharges', ['business_date'], unique=False)
    op.create_table('settlements',
    sa.Column('setl_id', sa.String(length=40), nullable=False),
    sa.Column('fixmedins_code', sa.String(length=32), nullable=False),
    sa.Column('mdtrt_id', sa.String(length=40), nullable=False),
    sa.Column('chrg_bchno', sa.String(length=40), nullable=False),
    sa.Column('msgid', sa.String(length=40), nullable=False),
    sa.Column('psn_no', sa.String(length=32), nullable=False),
    sa.Column('terminal_id', sa.String(length=32), nullable=False),
    sa.Column('insutype', sa.String(length=3), nullable=False),
    sa.Column('med_type', sa.String(length=4), nullable=False),
    sa.Column('insu_year', sa.Integer(), nullable=False),
    sa.Column('business_date', sa.Date(), nullable=False),
    sa.Column('pay_method', sa.String(length=8), nullable=False),
    sa.Column('pan', sa.String(length=19), nullable=True),
    sa.Column('medfee_sumamt', sa.BigInteger(), nullable=False),
    sa.Column('fund_pay_sumamt', sa.BigInteger(), nullable=False),
    sa.Column('hifp_pay', sa.BigInteger(), nullable=False),
    sa.Column('acct_pay', sa.BigInteger(), nullable=False),
    sa.Column('psn_cash_pay', sa.BigInteger(), nullable=False),
    sa.Column('wallet_pay', sa.BigInteger(), nullable=False),
    sa.Column('setlinfo', sa.Text(), nullable=False),
    sa.Column('lines', sa.Text(), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_key', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=12), nullable=False),
    sa.Column('original_setl_id', sa.String(length=40), nullable=True),
    sa.Column('created_ts', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('setl_id'),
    sa.UniqueConstraint('entry_key'),
    sa.UniqueConstraint('fixmedins_code', 'mdtrt_id', 'chrg_bchno', 'kind', name='uq_settlement_visit_batch')
    )
    op.create_index('ix_settlements_day', 'settlements', ['business_date'], unique=False)
    op.create_index('ix_settlements_msgid', 'settlements', ['fixmedins_code', 'msgid'], unique=False)
    op.create_index('ix_settlements_original', 'settlements', ['original_setl_id'], unique=False)
    op.create_table('cards',
    sa.Column('pan', sa.String(length=19), nullable=False),
    sa.Column('psn_no', sa.String(length=32), nullable=False),
    sa.Column('pan_seq', sa.String(length=2), nullable=False),
    sa.Column('form', sa.String(length=8), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('last_atc', sa.Integer(), nullable=True),
    sa.Column('issued_ts', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['psn_no'], ['citizens.psn_no'], ),
    sa.PrimaryKeyConstraint('pan')
    )
    op.create_index('ix_cards_psn', 'cards', ['psn_no'], unique=False)
    op.create_table('terminals',
    sa.Column('terminal_id', sa.String(length=32), nullable=False),
    sa.Column('org_code', sa.String(length=32), nullable=False),
    sa.Column('public_key', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('enrolled_ts', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['org_code'], ['orgs.code'], ),
    sa.PrimaryKeyConstraint('terminal_id')
    )
    op.create_table('batch_closes',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
    sa.Column('terminal_id', sa.String(length=32), nullable=False),
    sa.Column('business_date', sa.Date(), nullable=False),
    sa.Column('reported', sa.Text(), nullable=False),
    sa.Column('computed', sa.Text(), nullable=False),
    sa.Column('result', sa.String(length=16), nullable=False),
    sa.Column('closed_ts', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['terminal_id'], ['terminals.terminal_id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('terminal_id', 'business_date', name='uq_batch_close_terminal_day')
    )


def downgrade() -> None:
    op.drop_table('batch_closes')
    op.drop_table('terminals')
    op.drop_index('ix_cards_psn', table_name='cards')
    op.drop_table('cards')
    op.drop_index('ix_settlements_original', table_name='settlements')
    op.drop_index('ix_settlements_msgid', table_name='settlements')
    op.drop_index('ix_settlements_day', table_name='settlements')
    op.drop_table('settlements')
    op.drop_index('ix_recharges_day', table_name='recharges')
    op.drop_table('recharges')
    op.drop_index('ix_payments_day', table_name='payments')
    op.drop_table('payments')
    op.drop_table('orgs')
    op.drop_table('citizens')
    op.drop_table('business_days')
