"""Terminals: the signed transaction protocol (RFC 9421 + RFC 9530) and single-use stores.

``terminals.signing`` signs and verifies requests and responses between card terminals and the
engine; ``terminals.nonce`` remembers nonces and QR codes so that each is accepted once.
"""
