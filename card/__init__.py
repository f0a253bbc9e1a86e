"""Citizens and cards: identity numbers, card keys and EMV cryptograms, virtual QR cards.

* :mod:`card.identity` - GB 11643 citizen identity numbers, ISO/IEC 7812 (Luhn) PANs, synthetic
  test identities;
* :mod:`card.cryptogram` - EMV Book 2 key derivation, ARQC/ARPC and ATC replay checks;
* :mod:`card.cpm` - BER-TLV and the EMVCo Consumer-Presented-Mode QR payload of the virtual card;
* :mod:`card.qr` - rendering QR codes as PNG and for a terminal.
"""
