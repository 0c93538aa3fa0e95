"""Training: declarative YAML tasks, data checks, candidate search and cross-validation.

``spec`` reads the task file, ``data`` loads and cleans the data, ``zoo`` holds the
candidate architectures, ``search`` runs the Optuna study with k-fold cross-validation,
``trainer`` is the torch loop, ``runner`` ties them into one trained model, ``job``
hands that model to the build pipeline and the registry, ``jobs`` is the job queue in the
hub database (``POST /jobs``), ``worker`` is ``autodl-hub worker`` that runs it, and
``archive`` checks and unpacks uploaded data archives.
"""
