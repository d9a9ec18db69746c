"""UI logic of the Merge Studio app, kept out of ``app.py`` so it is testable without a browser.

* :mod:`studio.ui.controls`: hyperparameter schema -> control descriptions, UI values -> validated hparams.
* :mod:`studio.ui.plots`: the plotly figures (spectra, energy, interference heatmap, layer curves, accuracy).
* :mod:`studio.ui.session`: per-session run history (leaderboard) keyed by the Gradio session hash.
* :mod:`studio.ui.backend`: the :class:`~studio.ui.backend.Studio` service (suite, pool cache, merge, evaluate,
  diagnostics, optimisation, export) that both the UI handlers and the API endpoints call.
"""
