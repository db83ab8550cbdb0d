"""Tariffs and rating: the pure core that turns usage into money.

No I/O, no logging, no clocks: values in, values out (an import-linter contract in
``pyproject.toml`` keeps it so). Files are read by :mod:`collector.tariff_cli`.

- :mod:`~collector.rating.units`: billing units and their base units.
- :mod:`~collector.rating.model`: the validated tariff (prices, versions, plans,
  tax rates, coupons).
- :mod:`~collector.rating.document`: TOML and JSON documents read with key paths.
- :mod:`~collector.rating.tariff`: a tariff document into the model, every problem
  reported with its key path.
- :mod:`~collector.rating.proration`: how much of a licensed price a period charges.
- :mod:`~collector.rating.engine`: quantities to amounts, exactly.
- :mod:`~collector.rating.quote`: one invoice priced from a tariff and a list of items.
"""
