"""The jobs: one ``run_<job>(config, ...)`` each, called by the CLI (:mod:`lungseg.cli`)."""
