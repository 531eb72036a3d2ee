"""The local certificate authority: minting, certificate files, renewal, the ledger, invites, enrollment."""
