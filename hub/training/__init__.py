"""Training: declarative YAML tasks, data checks, candidate search and cross-validation.

``spec`` reads the task file, ``data`` loads and cleans the data, ``zoo`` holds the
candidate architectures, ``search`` runs the Optuna study with k-fold cross-validation,
``trainer`` is the torch loop, ``runner`` ties them into one trained model, ``job``
hands that model to the build pipeline and the registry, ``jobs`` runs jobs in the
background for ``POST /jobs``.

Text generation (``task: text-generation``): ``corpus`` reads, checks, cleans and splits the
documents, ``lm_tokenizer`` trains the byte-level BPE (or takes a checkpoint's own),
``lm_zoo`` builds the transformers families at a size preset, ``checkpoints`` loads local
Hugging Face folders, GGUF files and Baichuan 7B (converted to Llama), ``lm_trainer`` is the
causal-LM loop and perplexity, and ``lm_runner`` scores the candidates, tunes the winner
(``search.run_lm_search``) and writes it as a Hugging Face folder for ``hub.build.textgen``.
"""
