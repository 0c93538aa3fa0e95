"""Training: declarative YAML tasks, data checks, candidate search and cross-validation.

``spec`` reads the task file, ``data`` loads and cleans the data, ``zoo`` holds the
candidate architectures, ``search`` runs the Optuna study with k-fold cross-validation,
``trainer`` is the torch loop, ``runner`` ties them into one trained model, ``job``
hands that model to the build pipeline and the registry, ``jobs`` runs jobs in the
background for ``POST /jobs``, and ``command`` is ``autodl-hub train``.
"""
