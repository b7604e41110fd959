"""Static HTML dashboards for the top features, from the statistics file.

Everything shown comes from ``feature_stats.safetensors`` (written by ``sae-steer score``),
the SAE's decoder rows and the model's unembedding, so no forward pass is needed:

* top activating contexts (one per sequence) with each token shaded by the feature's
  activation relative to its max;
* the activation histogram (non-zero activations, inline SVG);
* the logit lens (:mod:`~sae_training.features.logit_lens`);
* density, max activation, quantiles, ReasonScore and its parts, the group shares p_ij and,
  when the ranked table has it, the token-dependence ratio;
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
) -> Path:
    """Write ``index.html`` and one ``feature_<i>.html`` per top feature; returns the index.

    ``model_path`` / ``sae_path`` default to the ones the statistics name; ``table`` to
    the ranked table beside the statistics; ``tokenizer`` (already loaded) to the model's.
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
    feats = stats.ranking()[:top_k].tolist()
    out = Path(out_dir)
    lens_top: dict[int, list[str]] = {}
    for rank, f in enumerate(tqdm(feats, desc="dashboard", disable=not progress), 1):
        dec = rows_sae.feature(f)[3]
        lens = logit_lens(dec, W_U, norm_w)
        lens_top[f] = [token_text(tokenizer, tid).strip() or "␣" for tid, _ in lens[0][:5]]
        page = feature_page(stats, f, rank, tokenizer, lens, rows.get(f))
        atomic_write(out / DASHBOARD_FEATURE_PAGE.format(feature=f), page)
    return atomic_write(out / DASHBOARD_INDEX, index_page(stats, feats, rows, lens_top))
