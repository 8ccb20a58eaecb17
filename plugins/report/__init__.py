"""The HTML report plugin: ``saelab report RUN`` writes a static site of a run (``results/<name>/report/``).

- :mod:`saelab.plugins.report.command`: the ``report`` command (the entry point; ``-p no:report`` disables it,
  and with it ``saelab run --enable_visualization``, which invokes this command).
- :mod:`saelab.plugins.report.run_data`: reads a run directory (records, explanations, scores, evaluations).
- :mod:`saelab.plugins.report.html`: renders and writes the pages; ``assets/`` holds their CSS and JavaScript.
"""
