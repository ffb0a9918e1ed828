"""One job's run, on top of formats and methods: ``pipeline.compress`` is the entry; ``prepare`` loads
and measures the original, ``steps`` runs methods in order, ``search`` tries candidates toward a target,
``report`` measures the result into the report, ``verdict`` adds its warnings."""
