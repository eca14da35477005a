"""Domain core: settings, tiers, ledger, pressure and policy. No Flask or Celery imports here."""
