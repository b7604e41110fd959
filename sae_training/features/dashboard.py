"""Static HTML dashboards for the top features, from the statistics file.

Everything shown comes from ``feature_stats.safetensors`` (written by ``sae-steer score``),
the SAE's decoder rows and the model's unembedding, so no forward pass is needed:

* top activating contexts (one per sequence) with each token shaded by the feature's
  activation relative to its max;
* the activation histogram (non-zero activations, inline SVG);
* the logit lens (:mod:`~sae_training.features.logit_lens`);
* density, max activation, quantiles, ReasonScore and its parts, the group shares p_ij and,
  when the ranked table has it, the token-dependence ratio;
* when ``sae-steer explain`` has written ``explanations.json``: the feature's explanation and
  its detection and fuzzing balanced accuracies with 95% intervals, beside the
  token-dependence verdict (pages without that file are unchanged);
* an index page sorted by ReasonScore.

Pages are self-contained (:mod:`~sae_training.features.dashboard_html`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_steer_vllm.constants import DASHBOARD_FEATURE_PAGE, DASHBOARD_INDEX
from sae_steer_vllm.files import atomic_write
from sae_steer_vllm.sae import SAEFormatError, SAERows
from sae_training.features.dashboard_html import feature_page, index_page, token_text
from sae_training.features.explanations import FeatureExplanation, read_explanations
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.logit_lens import load_unembedding, logit_lens
from sae_training.features.ranked_table import rows_by_feature


def build_dashboard(
    stats_path: str | Path,
    out_dir: str | Path,
    *,
    top_k: int = 30,
    model_path: str | Path | None = None,
    sae_path: str | Path | None = None,
    table: str | Path | None = None,
    tokenizer: Any = None,
    progress: bool = False,
    explanations: str | Path | None = None,
) -> Path:
    """Write ``index.html`` and one ``feature_<i>.html`` per top feature; returns the index.

    ``model_path`` / ``sae_path`` default to the ones the statistics name; ``table`` to
    the ranked table beside the statistics; ``tokenizer`` (already loaded) to the model's;
    ``explanations`` (file or folder) to ``explanations.json`` in the SAE folder, then
    beside the statistics (none there: the pages show no explanations).
    """
    from tqdm import tqdm

    stats = FeatureStats.load(stats_path)
    sp = Path(stats_path)
    stats_dir = sp if sp.is_dir() else sp.parent
    sae_dir = Path(sae_path or stats.meta.get("sae") or stats_dir)
    model_dir = model_path or stats.meta.get("model")
    if not model_dir:
        raise SAEFormatError("the statistics file names no model: pass model_path / --model")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    W_U, norm_w = load_unembedding(model_dir)
    stats.check_weights(sae_dir)
    rows_sae = SAERows(sae_dir)
    if rows_sae.cfg.d_sae != stats.d_sae:
        raise SAEFormatError(
            f"{sae_dir} has {rows_sae.cfg.d_sae} features but the statistics have {stats.d_sae}"
        )
    rows = rows_by_feature(table if table else stats_dir)
    explained: dict[int, FeatureExplanation] | None = None
    found = (
        read_explanations(explanations)
        if explanations is not None
        else read_explanations(sae_dir) or read_explanations(stats_dir)
    )
    if explanations is not None and found is None:
        raise SAEFormatError(f"{explanations}: no explanations file (run `sae-steer explain`)")
    if found is not None:
        explained = found.by_feature()
    feats = stats.ranking()[:top_k].tolist()
    out = Path(out_dir)
    lens_top: dict[int, list[str]] = {}
    for rank, f in enumerate(tqdm(feats, desc="dashboard", disable=not progress), 1):
        dec = rows_sae.feature(f)[3]
        lens = logit_lens(dec, W_U, norm_w)
        lens_top[f] = [token_text(tokenizer, tid).strip() or "␣" for tid, _ in lens[0][:5]]
        expl = None if explained is None else explained.get(f)
        page = feature_page(
            stats, f, rank, tokenizer, lens, rows.get(f), expl, explained is not None
        )
        atomic_write(out / DASHBOARD_FEATURE_PAGE.format(feature=f), page)
    return atomic_write(out / DASHBOARD_INDEX, index_page(stats, feats, rows, lens_top, explained))
