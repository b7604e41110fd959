"""Feature finding: SAE + corpus -> statistics -> ReasonScore -> ranked table -> dashboards.

Read in that order: :mod:`.vocabulary` and :mod:`.masks` (which tokens are reasoning
words), :mod:`.stats_pass` (the one streaming pass) into :mod:`.stats_accumulator`
(bounded per-feature sums, with :mod:`.reasonscore`'s formula, and :mod:`.context_sample`'s
held-out and non-activating samples, read back by :mod:`.contexts`) giving a
:mod:`.feature_stats` object and file; :mod:`.token_dependence` (is a feature just a word
detector?); :mod:`.ranked_table`; :mod:`.dashboard` (pages from :mod:`.dashboard_html`
and :mod:`.logit_lens`; both show :mod:`.explanations` when that file exists). :mod:`.score` runs them all for one SAE; the ``*_cli`` modules
are the ``sae-steer score / dashboard / vocab`` commands. Public names are re-exported by
:mod:`sae_training`.
"""
